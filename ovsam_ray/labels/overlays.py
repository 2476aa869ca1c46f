"""Review corrections: append-only overlays beside a label output, applied when it is read.

A reviewer's verdicts (``ovsam-ray review import``) are never written into a committed shard: each
import adds one file ``<labels>/_corrections/<time>-<digest>.parquet`` of :data:`OVERLAY_SCHEMA`
rows, one per reviewed instance, and never changes it afterwards. ``kind`` says what the reviewer
did: ``accepted`` (kept as predicted), ``relabelled`` (a new label, maybe a new mask too),
``mask_edited`` (same label, new mask), ``deleted`` (not an object worth a label) or ``added`` (an
object the model missed; ``instance`` is null). Readers apply every overlay, oldest first (a later
review of the same instance wins), to the rows they return (:func:`apply_corrections`): deleted
instances go, edited ones take the reviewer's label and mask, added ones come last, and each
reviewed instance's ``review`` field holds its kind (and its ``label_score`` is 1: a person's).
Overlays are small (one row per reviewed instance), so they are held in memory while a label
output is read.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ovsam_ray import storage
from ovsam_ray.labels.schema import RLE_TYPE, timestamp

__all__ = [
    "CORRECTIONS_FOLDER",
    "KINDS",
    "OVERLAY_SCHEMA",
    "Corrections",
    "apply_corrections",
    "correction_counts",
    "load_corrections",
    "overlay_name",
    "write_overlay",
]

CORRECTIONS_FOLDER = "_corrections"
KINDS = ("accepted", "relabelled", "mask_edited", "deleted", "added")

#: One reviewed instance. ``instance`` indexes the row's instances as committed (null for
#: ``added``); ``label``/``rle``/``bbox``/``area`` are the reviewed ones (null for ``deleted``);
#: ``mask_changed`` also marks a relabelled instance whose mask was edited; ``tool`` and
#: ``source`` name where the review came from (``labelstudio``/``cvat`` and the export file).
OVERLAY_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("instance", pa.int32()),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("rle", RLE_TYPE),
        pa.field("bbox", pa.list_(pa.float32(), 4)),
        pa.field("area", pa.int64()),
        pa.field("mask_changed", pa.bool_()),
        pa.field("tool", pa.string()),
        pa.field("source", pa.string()),
        pa.field("reviewed_at", pa.string()),
    ],
    metadata={"ovsam_ray.overlay_version": "1"},
)

#: (shard, key) -> that image's corrections, oldest first.
Corrections = dict[tuple[str, str], list[dict[str, Any]]]


def overlay_name(digest_of: bytes) -> str:
    """``<time>-<digest>.parquet``: sorts oldest first; the digest of the reviewed export makes a
    second import of the same export recognisable (:func:`write_overlay`)."""
    stamp = timestamp().replace(":", "").replace("-", "").replace("+0000", "Z")
    return f"{stamp}-{hashlib.sha256(digest_of).hexdigest()[:16]}.parquet"


def _folder(labels: str) -> str:
    return storage.join(labels.rstrip("/"), CORRECTIONS_FOLDER)


def _overlay_files(labels: str, s3_endpoint: str | None) -> list[str]:
    folder = _folder(labels)
    if not storage.exists(folder, s3_endpoint=s3_endpoint):
        return []
    return sorted(storage.list_files(folder, suffix=".parquet", s3_endpoint=s3_endpoint))


def write_overlay(
    labels: str, rows: list[dict[str, Any]], *, digest_of: bytes, s3_endpoint: str | None = None
) -> tuple[str, bool]:
    """Add one overlay file of ``rows`` (:data:`OVERLAY_SCHEMA` dicts) to ``labels``; returns (its
    URL, True), or (the earlier file's URL, False) when an overlay of the same ``digest_of`` (the
    same reviewed export) is already there: importing twice changes nothing."""
    name = overlay_name(digest_of)
    digest = name.rsplit("-", 1)[1]
    for url in _overlay_files(labels, s3_endpoint):
        if url.endswith("-" + digest):
            return url, False
    table = pa.Table.from_pylist(rows, schema=OVERLAY_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    url = storage.join(_folder(labels), name)
    storage.atomic_write_bytes(url, sink.getvalue().to_pybytes(), s3_endpoint=s3_endpoint)
    return url, True


def load_corrections(labels: str, *, s3_endpoint: str | None = None) -> Corrections:
    """Every overlay of ``labels``, oldest first, by image (empty when there is none)."""
    out: Corrections = {}
    for url in _overlay_files(labels, s3_endpoint):
        with storage.open_url(url, "rb", s3_endpoint=s3_endpoint) as f:
            for row in pq.read_table(f).to_pylist():
                out.setdefault((row["shard"], row["key"]), []).append(row)
    return out


def correction_counts(labels: str, *, s3_endpoint: str | None = None) -> dict[str, int]:
    """Reviewed instances by kind, over every overlay (the latest verdict per instance)."""
    counts: Counter[str] = Counter({k: 0 for k in KINDS})
    for items in load_corrections(labels, s3_endpoint=s3_endpoint).values():
        latest: dict[Any, str] = {}
        for n, c in enumerate(items):
            latest[c["instance"] if c["instance"] is not None else ("added", n)] = c["kind"]
        counts.update(latest.values())
    return dict(counts)


def apply_corrections(row: dict[str, Any], corrections: list[dict[str, Any]] | None) -> dict[str, Any]:
    """``row`` (a label row dict with ``instances``) as the reviewer left it (see the module doc);
    ``row`` itself when there is nothing to apply."""
    if not corrections or row.get("instances") is None and not any(c["kind"] == "added" for c in corrections):
        return row
    instances = [dict(inst) for inst in row.get("instances") or []]
    gone: set[int] = set()
    added: list[dict[str, Any]] = []
    for c in corrections:
        kind, i = c["kind"], c["instance"]
        if kind == "added":
            added.append(_added_instance(c))
            continue
        if i is None or not 0 <= i < len(instances):
            continue  # an instance this row does not have (the row was relabelled since): ignored
        if kind == "deleted":
            gone.add(i)
            continue
        gone.discard(i)
        inst = instances[i]
        if c["label"] is not None and kind == "relabelled":
            inst["label"] = c["label"]
            if inst.get("label_id") is not None:
                inst["label_id"] = None  # the reviewer's name; its id in the vocabulary is not known here
        if c["rle"] is not None and (kind == "mask_edited" or c.get("mask_changed")):
            inst["rle"], inst["bbox"], inst["area"] = c["rle"], c["bbox"], c["area"]
        inst["review"] = kind
        inst["label_score"] = 1.0  # a person's verdict
    out = dict(row)
    out["instances"] = [inst for i, inst in enumerate(instances) if i not in gone] + added
    return out


def _added_instance(c: dict[str, Any]) -> dict[str, Any]:
    return {
        "prompt_type": "review",
        "bbox": c["bbox"],
        "area": c["area"],
        "rle": c["rle"],
        "label": c["label"],
        "label_score": 1.0,
        "review": "added",
    }
