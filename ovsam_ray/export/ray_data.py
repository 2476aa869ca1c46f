"""Ray Data recipe: a label output joined with its input shards by (shard, key), without a shuffle.

Both sides are already partitioned the same way — one label Parquet file per input shard — so the
join is a map over shard pairs: each task reads one Parquet file and streams its tar, and emits the
``ok`` label rows that have an image, with the image bytes added (``image``, ``image_ext``), in
batches of ``rows_per_batch``. No all-to-all exchange, and memory per task is one shard's labels
plus one batch of images::

    ds = read_labelled_images("s3://bucket/labels", shards="s3://bucket/shards/shard-{000000..000099}.tar")
    for batch in ds.iter_batches(batch_size=32, batch_format="pyarrow"):
        ...  # batch["image"]: encoded bytes; batch["instances"]: the label rows' instances

Columns: every label column (``key``, ``shard``, ``image_id``, ``width``, ``height``,
``instances`` with COCO RLE masks, ...) plus ``image`` and ``image_ext``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ovsam_ray import storage
from ovsam_ray.data.shards import iter_shard_samples
from ovsam_ray.labels.overlays import Corrections, apply_corrections
from ovsam_ray.labels.reader import corrections_of, label_files, source_shards
from ovsam_ray.labels.schema import rows_to_table

__all__ = ["join_shard", "read_labelled_images"]


def _take(table: pa.Table, rows: list[int], images: list[bytes], exts: list[str]) -> pa.Table:
    out = table.take(pa.array(rows, pa.int64()))
    return out.append_column("image", pa.array(images, pa.binary())).append_column("image_ext", pa.array(exts))


def join_shard(
    labels_url: str,
    shard_url: str,
    *,
    rows_per_batch: int = 64,
    s3_endpoint: str | None = None,
    corrections: Corrections | None = None,
) -> Iterator[pa.Table]:
    """The ``ok`` rows of one label file that have an image in ``shard_url``, with the image's
    bytes and extension, in the shard's order, ``rows_per_batch`` rows per table; ``corrections``
    (review overlays, :func:`~ovsam_ray.labels.reader.corrections_of`) applied to its rows."""
    fs, path = storage.get_filesystem(labels_url, s3_endpoint=s3_endpoint)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    if corrections and any((s, k) in corrections for s, k in zip(table["shard"].to_pylist(), table["key"].to_pylist())):
        corrected = [apply_corrections(r, corrections.get((r["shard"], r["key"]))) for r in table.to_pylist()]
        table = rows_to_table(corrected)
    table = table.filter(pc.equal(table["status"], "ok"))
    index = {k: i for i, k in enumerate(table["key"].to_pylist())}
    rows: list[int] = []
    images: list[bytes] = []
    exts: list[str] = []
    for s in iter_shard_samples(shard_url, s3_endpoint=s3_endpoint):
        i = index.pop(s["key"], None) if s["key"] is not None else None
        if i is None or s["image_bytes"] is None:
            continue
        rows.append(i)
        images.append(s["image_bytes"])
        exts.append(s["image_ext"])
        if len(rows) == rows_per_batch:
            yield _take(table, rows, images, exts)
            rows, images, exts = [], [], []
    if rows:
        yield _take(table, rows, images, exts)


def read_labelled_images(
    labels: str,
    shards: str | None = None,
    *,
    rows_per_batch: int = 64,
    s3_endpoint: str | None = None,
    corrections: bool = True,
) -> Any:
    """A ``ray.data.Dataset`` of the labelled images: the label rows joined with their images
    (see the module doc); ``shards`` defaults to the run record's input; review corrections are
    applied unless ``corrections=False``."""
    import ray

    fixes = corrections_of(labels, corrections, s3_endpoint=s3_endpoint)

    urls = source_shards(labels, shards, s3_endpoint=s3_endpoint)
    pairs = [
        {"labels_url": u, "shard_url": urls[name]}
        for u in label_files(labels, s3_endpoint=s3_endpoint)
        if (name := u.rsplit("/", 1)[-1][: -len(".parquet")]) in urls
    ]

    def join(batch: dict[str, Any]) -> Iterator[pa.Table]:
        for labels_url, shard_url in zip(batch["labels_url"], batch["shard_url"]):
            yield from join_shard(
                str(labels_url),
                str(shard_url),
                rows_per_batch=rows_per_batch,
                s3_endpoint=s3_endpoint,
                corrections=fixes,
            )

    ds = ray.data.from_items(pairs, override_num_blocks=max(1, len(pairs)))
    return ds.map_batches(join, batch_size=1)
