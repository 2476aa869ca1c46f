"""Write samples into WebDataset shards of N images: the shared back end of every converter.

A sample is a key, an image (bytes, or a URL read when its shard is built) and the DESIGN §4
JSON. Samples are cut into shards in the order given (``<prefix>-000000.tar``, ...), each shard
is built in memory and written atomically, several at once on a thread pool (reading images from
object storage is I/O-bound); at most ``2 * workers`` shards are held in memory. Same input,
same arguments -> byte-identical shards.

Beside the shards go ``_convert.json`` (the summary) and, when the samples carry classed
annotations, ``_image_classes.parquet``: one row per written image (``shard``, ``key``) with the
distinct ``category_name`` / ``category_id`` pairs of its non-crowd annotations. Training reads it to
count one epoch's images after its class filter (an open-vocabulary split drops the images left
without a trained class) without reading the shards.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ovsam_ray import storage
from ovsam_ray.data.shards import IMAGE_CLASSES_FILE, IMAGE_EXTENSIONS
from ovsam_ray.data.synthetic import tar_bytes
from ovsam_ray.errors import ConfigError

__all__ = [
    "IMAGE_CLASSES_SCHEMA",
    "MAX_LISTED_SKIPS",
    "ConvertSummary",
    "Sample",
    "image_classes",
    "image_extension",
    "sample_key",
    "write_shards",
]

log = logging.getLogger(__name__)

_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
#: Skipped samples listed by name in the summary (the count is always complete).
MAX_LISTED_SKIPS = 50
IMAGE_CLASSES_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("key", pa.string()),
        ("category_names", pa.list_(pa.string())),  # aligned with category_ids; null where the annotation had none
        ("category_ids", pa.list_(pa.int64())),
    ]
)


def sample_key(*parts: Any) -> str:
    """A WebDataset key from source identifiers: characters other than letters, digits, ``_`` and
    ``-`` become ``_`` (a dot would end the key, a slash would make a folder); parts joined by ``_``.
    ``sample_key("n01440764", "n01440764_10026")`` -> ``"n01440764_n01440764_10026"``."""
    text = "_".join(str(p) for p in parts)
    key = _UNSAFE_KEY_CHARS.sub("_", text).strip("_")
    if not key:
        raise ValueError(f"cannot make a sample key from {parts!r}")
    return key


def image_extension(name: str) -> str | None:
    """Lower-case image extension of a file name (``"a/B.JPEG"`` -> ``"jpeg"``), ``None`` if not an image."""
    ext = name.rsplit("/", 1)[-1].rpartition(".")[2].lower()
    return ext if ext in IMAGE_EXTENSIONS else None


@dataclass
class Sample:
    """One image to write: ``image`` is its bytes or ``None`` with ``image_url`` to read later;
    ``meta`` is the JSON, or ``load_meta`` builds it later (on the writer's threads), or
    ``meta_bytes`` is the JSON as stored in an input shard (copied as it is by ``reshard``)."""

    key: str
    image_ext: str
    meta: dict[str, Any] = field(default_factory=dict)
    image: bytes | None = None
    image_url: str | None = None
    load_meta: Callable[[], dict[str, Any]] | None = None
    meta_bytes: bytes | None = None


@dataclass
class ConvertSummary:
    """What a conversion wrote and what it skipped. ``skipped`` counts images (``skipped_examples``: the
    first few, with why); ``skipped_records`` counts the other records left out as malformed, by kind
    (``annotations``, ``categories``, ``detections``), with the first few in ``skipped_record_examples``.
    Written images + ``skipped`` = every image record read."""

    shards: list[str] = field(default_factory=list)
    images: int = 0
    annotations: int = 0
    skipped: int = 0
    skipped_examples: list[dict[str, str]] = field(default_factory=list)
    skipped_records: dict[str, int] = field(default_factory=dict)
    skipped_record_examples: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # skip_record is also called from the shard-building threads (per-image json read there)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def skip(self, what: str, why: str) -> None:
        self.skipped += 1
        if len(self.skipped_examples) < MAX_LISTED_SKIPS:
            self.skipped_examples.append({"sample": what, "reason": why})
        log.warning("skipped %s: %s", storage.safe_for_log(storage.redact(what)), storage.safe_for_log(why))

    def skip_record(self, kind: str, what: str, why: str) -> None:
        """Count a malformed record that is not an image (an annotation, a category, a detection)."""
        with self._lock:
            self.skipped_records[kind] = self.skipped_records.get(kind, 0) + 1
            if len(self.skipped_record_examples) < MAX_LISTED_SKIPS:
                self.skipped_record_examples.append({"record": what, "kind": kind, "reason": why})
        log.warning("skipped %s: %s", storage.safe_for_log(what), storage.safe_for_log(why))

    def to_dict(self) -> dict[str, Any]:
        return {
            "shards": len(self.shards),
            "images": self.images,
            "annotations": self.annotations,
            "skipped": self.skipped,
            "skipped_examples": self.skipped_examples,
            "skipped_records": dict(sorted(self.skipped_records.items())),
            "skipped_record_examples": self.skipped_record_examples,
            "notes": self.notes,
            "first_shard": self.shards[0] if self.shards else None,
        }


def _chunks(samples: Iterable[Sample], size: int) -> Iterator[list[Sample]]:
    chunk: list[Sample] = []
    for s in samples:
        chunk.append(s)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _unique_keys(samples: Iterable[Sample], summary: ConvertSummary) -> Iterator[Sample]:
    """Samples whose key no earlier sample had: one key is one image across all shards."""
    seen: set[str] = set()
    for s in samples:
        if s.key in seen:
            summary.skip(s.image_url or s.key, f"sample key {s.key} is also an earlier image's")
            continue
        seen.add(s.key)
        yield s


def image_classes(annotations: Any) -> list[tuple[str | None, int | None]]:
    """The distinct (category_name, category_id) pairs of the non-crowd annotations, in first-seen order."""
    pairs: dict[tuple[str | None, int | None], None] = {}
    for ann in annotations if isinstance(annotations, list) else []:
        if not isinstance(ann, dict) or ann.get("iscrowd"):
            continue
        name, cid = ann.get("category_name"), ann.get("category_id")
        name = name if isinstance(name, str) else None
        cid = cid if isinstance(cid, int) and not isinstance(cid, bool) else None
        if name is not None or cid is not None:
            pairs[(name, cid)] = None
    return list(pairs)


def _build_shard(
    url: str, chunk: list[Sample], s3_endpoint: str | None
) -> tuple[int, int, list[tuple[str, str]], list[tuple[str, list]]]:
    members: list[tuple[str, bytes]] = []
    seen: set[str] = set()
    skipped: list[tuple[str, str]] = []
    classes: list[tuple[str, list]] = []
    annotations = 0
    for s in chunk:
        try:
            data = s.image if s.image is not None else storage.read_bytes(s.image_url or "", s3_endpoint=s3_endpoint)
            meta = s.load_meta() if s.load_meta is not None else s.meta
        except (FileNotFoundError, OSError, ValueError) as e:
            skipped.append((s.image_url or s.key, f"not readable: {type(e).__name__}: {e}"))
            continue
        try:  # strict JSON: a NaN or inf the record checks missed skips the image instead of writing "NaN"
            meta_bytes = json.dumps(meta, separators=(",", ":"), allow_nan=False).encode()
        except ValueError as e:
            skipped.append((s.image_url or s.key, f"JSON not writable: {e}"))
            continue
        seen.add(s.key)
        annotations += len(meta.get("annotations") or [])
        classes.append((s.key, image_classes(meta.get("annotations"))))
        members.append((f"{s.key}.{s.image_ext}", data))
        members.append((f"{s.key}.json", meta_bytes))
    storage.atomic_write_bytes(url, tar_bytes(members), s3_endpoint=s3_endpoint)
    return len(seen), annotations, skipped, classes


def write_shards(
    samples: Iterable[Sample],
    output: str,
    *,
    images_per_shard: int = 1000,
    prefix: str = "shard",
    workers: int = 4,
    s3_endpoint: str | None = None,
    summary: ConvertSummary | None = None,
) -> ConvertSummary:
    """Write ``samples`` as ``<output>/<prefix>-%06d.tar`` with ``images_per_shard`` each and a
    ``_convert.json`` summary; return the summary. An unreadable image is skipped and counted
    (its shard then holds fewer images); a sample whose key an earlier one had is skipped too."""
    if images_per_shard < 1 or workers < 1:
        raise ConfigError("images_per_shard and workers must be >= 1")
    summary = summary or ConvertSummary()
    pending: list[tuple[str, Future]] = []
    rows: dict[str, list] = {name: [] for name in IMAGE_CLASSES_SCHEMA.names}

    def drain(limit: int) -> None:
        while len(pending) > limit:
            shard, future = pending.pop(0)
            images, anns, skipped, classes = future.result()
            summary.images += images
            summary.annotations += anns
            for what, why in skipped:
                summary.skip(what, why)
            for key, pairs in classes:
                rows["shard"].append(shard)
                rows["key"].append(key)
                rows["category_names"].append([n for n, _ in pairs])
                rows["category_ids"].append([c for _, c in pairs])

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for index, chunk in enumerate(_chunks(_unique_keys(samples, summary), images_per_shard)):
            url = storage.join(output, f"{prefix}-{index:06d}.tar")
            summary.shards.append(url)
            pending.append((url.rsplit("/", 1)[-1], pool.submit(_build_shard, url, chunk, s3_endpoint)))
            drain(2 * workers)
        drain(0)
    if any(rows["category_ids"]):  # classed annotations somewhere: training counts its epochs from this
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pydict(rows, schema=IMAGE_CLASSES_SCHEMA), sink, compression="zstd")
        storage.atomic_write_bytes(
            storage.join(output, IMAGE_CLASSES_FILE), sink.getvalue().to_pybytes(), s3_endpoint=s3_endpoint
        )
    storage.atomic_write_bytes(
        storage.join(output, "_convert.json"), json.dumps(summary.to_dict(), indent=1).encode(), s3_endpoint=s3_endpoint
    )
    log.info(
        "wrote %d images (%d annotations) into %d shards under %s; %d images skipped, malformed records "
        "skipped: %s (reasons in _convert.json)",
        summary.images,
        summary.annotations,
        len(summary.shards),
        storage.redact(output),
        summary.skipped,
        summary.skipped_records or "none",
    )
    return summary
