"""The label job's CPU stage: read one shard and decode its images (one Ray task per shard), and
the typed Arrow columns every stage passes on.

Rows between stages are Arrow tables with typed columns (no JSON, no pandas): whole-shard events
travel as rows too (``status`` SHARD_FAILED / SHARD_EMPTY, ``index`` -1), so every stage keeps
the shard's accounting without a side channel. Errors are data: a row whose ``status`` is "error"
carries its message to the output.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from ovsam_ray import storage
from ovsam_ray.data.decode import DEFAULT_MAX_PIXELS, DEFAULT_MAX_PROMPTS, DecodedSample, decode_sample
from ovsam_ray.data.shards import ShardRead, read_shard, shard_name

log = logging.getLogger(__name__)

# Marker rows for whole-shard events (no image): an unreadable shard, an empty one.
SHARD_FAILED = "shard_failed"
SHARD_EMPTY = "shard_empty"
# I/O errors (a storage outage, a dropped connection) are retried with exponential backoff.
READ_ATTEMPTS = 4
READ_BACKOFF_S = 1.0

_FLOATS = pa.list_(pa.float32())
#: What the decode stage emits, one row per image (or one marker row per failed/empty shard).
#: Prompts are flat per image: ``boxes`` 4 values per box (original pixels, XYXY), ``points`` 2
#: per point, ``point_boxes`` 4 per point (NaN = none; null when the JSON has none); ``image`` is
#: the uint8 (in_h, in_w, 3) image when the model needs pixels, else empty: as decoded (in_h, in_w
#: = height, width; the model's device resizes it) or already resized (``resize_on_cpu``, or an
#: image above ``DEVICE_RESIZE_MAX_FACTOR`` x the model input's pixels). Per shard (the
#: same on each of its rows, a few bytes): ``shard_damage`` (why the tar ended early, or "") and
#: ``shard_skipped`` (JSON ``{reason: count}`` of the members that gave no row, or "").
DECODED_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("index", pa.int32()),
        ("shard_total", pa.int32()),
        ("shard_damage", pa.string()),
        ("shard_skipped", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("image_id", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("in_h", pa.int32()),
        ("in_w", pa.int32()),
        ("image", pa.binary()),
        ("boxes", _FLOATS),
        ("box_scores", _FLOATS),
        ("box_labels", pa.list_(pa.string())),
        ("points", _FLOATS),
        ("point_boxes", _FLOATS),
        ("prompt_warnings", pa.list_(pa.string())),
    ]
)
#: Images up to this many times the model input's pixels travel as decoded and are resized on the
#: model's device (an antialiased float resize costs ~18 ms of CPU per 640x480 image, next to
#: nothing on a GPU); larger ones are resized here, so a row's image stays within 4 x S x S x 3
#: bytes in the object store.
DEVICE_RESIZE_MAX_FACTOR = 4
#: The columns every stage carries through unchanged.
PASS_COLUMNS = ("key", "shard", "index", "shard_total", "shard_damage", "shard_skipped", "image_id", "width", "height")


def encode_url(url: str) -> bytes:
    """A shard URL as the bytes the job's first dataset holds: Arrow strings must be UTF-8, and a
    local file name need not be (it arrives with surrogate escapes, :func:`list_shards`)."""
    return url.encode("utf-8", "surrogateescape")


def decode_url(data: bytes | str) -> str:
    """Inverse of :func:`encode_url` (the very name ``open()`` needs)."""
    return data if isinstance(data, str) else data.decode("utf-8", "surrogateescape")


def _read_with_retries(url: str, s3_endpoint: str | None) -> ShardRead:
    damage = None
    for attempt in range(READ_ATTEMPTS):
        try:
            return read_shard(url, s3_endpoint=s3_endpoint)
        except Exception as e:  # noqa: BLE001 - a shard we cannot open is reported, never fatal
            damage = f"{type(e).__name__}: {storage.redact(storage.safe_text(str(e)))}"
            log.warning(
                "reading shard %s failed (attempt %d/%d): %s",
                storage.safe_for_log(storage.redact(url)),
                attempt + 1,
                READ_ATTEMPTS,
                storage.safe_for_log(damage),
            )
            if attempt + 1 < READ_ATTEMPTS:
                time.sleep(READ_BACKOFF_S * 2**attempt)
    return ShardRead(url=url, shard=shard_name(url), damage=damage)


def read_and_decode(
    batch: pa.Table,
    *,
    image_size: int | None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_prompts: int = DEFAULT_MAX_PROMPTS,
    chunk: int = 64,
    s3_endpoint: str | None = None,
    resize_on_cpu: bool = False,
) -> Iterator[pa.Table]:
    """map_batches (CPU task, one shard URL per batch, as :func:`encode_url` bytes): read the
    shard, decode and resize its images, yield DECODED_SCHEMA tables of ``chunk`` rows, numbered
    in shard order. ``max_prompts``: prompts kept per image (the rest dropped with a warning).

    ``image_size``: the model's input side (the longest side is resized to it, on the model's
    device unless ``resize_on_cpu`` or the image is large: ``DEVICE_RESIZE_MAX_FACTOR``), or None
    for a model that needs no pixels (the image is still decoded: a bad image must be an error row).
    A damaged tar yields the samples read before the damage, each carrying ``shard_damage``; a
    shard with nothing readable yields one SHARD_FAILED row, an empty shard one SHARD_EMPTY row.
    """
    for raw in batch.column("url").to_pylist():
        read = _read_with_retries(decode_url(raw), s3_endpoint)
        name, samples, damage = read.shard, read.samples, read.damage or ""
        skipped = json.dumps(read.skipped, sort_keys=True) if read.skipped else ""
        if not samples:
            yield _marker_table(name, SHARD_FAILED if damage else SHARD_EMPTY, damage, skipped)
            continue
        for start in range(0, len(samples), chunk):
            part = samples[start : start + chunk]
            yield _decode_chunk(
                part, (name, start, len(samples), damage, skipped), image_size, max_pixels, max_prompts, resize_on_cpu
            )


def _marker_table(name: str, kind: str, message: str, skipped: str) -> pa.Table:
    row: dict[str, Any] = {f.name: None for f in DECODED_SCHEMA}
    row.update(
        key="",
        shard=name,
        index=-1,
        shard_total=0,
        shard_damage=message,
        shard_skipped=skipped,
        status=kind,
        error=message,
    )
    return pa.Table.from_pylist([row], schema=DECODED_SCHEMA)


def _decode_chunk(
    samples: list[dict[str, Any]],
    shard: tuple[str, int, int, str, str],
    image_size: int | None,
    max_pixels: int,
    max_prompts: int,
    resize_on_cpu: bool = False,
) -> pa.Table:
    """``shard``: (name, index of the first sample, samples in the shard, damage, skipped)."""
    name, start, total, damage, skipped = shard
    cols: dict[str, list[Any]] = {f.name: [] for f in DECODED_SCHEMA}
    for i, sample in enumerate(samples):
        try:
            decoded = decode_sample({**sample, "shard": name}, max_pixels=max_pixels, max_prompts=max_prompts)
        except Exception as e:  # noqa: BLE001 - decode_sample should not raise; never crash the job
            decoded = DecodedSample(key=sample["key"], shard=name, error=f"decode failed: {type(e).__name__}: {e}")
        _append_decoded(cols, decoded, image_size, resize_on_cpu)
        cols["index"].append(start + i)
    n = len(samples)
    cols.update(shard=[name] * n, shard_total=[total] * n, shard_damage=[damage] * n, shard_skipped=[skipped] * n)
    return pa.Table.from_pydict(cols, schema=DECODED_SCHEMA)


def _append_decoded(
    cols: dict[str, list[Any]], d: DecodedSample, image_size: int | None, resize_on_cpu: bool = False
) -> None:
    cols["key"].append(d.key)
    if not d.ok:
        for k in (
            "image_id",
            "width",
            "height",
            "in_h",
            "in_w",
            "image",
            "boxes",
            "box_scores",
            "box_labels",
            "points",
            "point_boxes",
            "prompt_warnings",
        ):
            cols[k].append(None)
        cols["status"].append("error")
        cols["error"].append(d.error or "unknown error")
        return
    image = d.image
    assert image is not None and d.prompts is not None, "a decoded (ok) sample has an image and prompts"
    large = image.shape[0] * image.shape[1] > DEVICE_RESIZE_MAX_FACTOR * image_size**2 if image_size else False
    if image_size is not None and (resize_on_cpu or large):
        import torch  # only where pixels are resized: the other workers of the job never load torch

        from ovsam_ray.model.functional import resize_image

        image = resize_image(torch.from_numpy(image), image_size).numpy()
    p = d.prompts
    cols["status"].append("ok")
    cols["error"].append(None)
    cols["image_id"].append(p.image_id)
    cols["width"].append(d.width)
    cols["height"].append(d.height)
    cols["in_h"].append(int(image.shape[0]))
    cols["in_w"].append(int(image.shape[1]))
    # a view, not bytes: Arrow copies the pixels once into the column
    if image_size is not None:
        # numpy's stubs make an ndarray a Buffer only from Python 3.12 on
        cols["image"].append(memoryview(np.ascontiguousarray(image)).cast("B"))  # type: ignore[arg-type]
    else:
        cols["image"].append(b"")
    cols["boxes"].append(p.boxes.reshape(-1))
    cols["box_scores"].append(p.box_scores)
    cols["box_labels"].append(p.box_labels)
    cols["points"].append(p.points.reshape(-1))
    cols["point_boxes"].append(None if p.point_boxes is None else p.point_boxes.reshape(-1))
    cols["prompt_warnings"].append(p.warnings)


def image_of(table: pa.Table, i: int) -> np.ndarray:
    """Row ``i``'s (in_h, in_w, 3) uint8 image, as decoded or resized (a writable copy)."""
    data = table.column("image")[i].as_buffer()
    h, w = table.column("in_h")[i].as_py(), table.column("in_w")[i].as_py()
    return np.frombuffer(data, np.uint8).reshape(h, w, 3).copy()
