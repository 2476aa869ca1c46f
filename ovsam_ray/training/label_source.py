"""A label output as a co-training dataset (``DatasetSpec.corrections``): train on what people reviewed.

``--dataset 'labels/|corrections=only'`` trains on a label output (``ovsam-ray label``) with its
review corrections (``ovsam-ray review import``, :mod:`ovsam_ray.labels.overlays`) applied: the
images come from the input shards its run record names (``details.config.input``; or the
dataset's ``images``), the targets are its instances' RLE masks and class names. ``only`` keeps
the instances a reviewer accepted, relabelled, edited or added (``review`` set; deleted ones are
gone); ``all`` keeps every instance of the output as reviewed (the model's own labels where no
one looked). No shard is written: each work item's part is one input shard plus its label
Parquet file, read in that order (the label file's annotations, then the shard's images, keeping
those with a target), so memory holds one shard's annotations, never the output.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow.parquet as pq

from ovsam_ray import storage
from ovsam_ray.data.shards import ShardSpecError
from ovsam_ray.errors import ConfigError, MissingInputError
from ovsam_ray.labels.reader import corrections_of, label_files, read_label_file, source_shards
from ovsam_ray.training.config import DatasetSpec

__all__ = ["REVIEWED", "label_annotations", "label_dataset_images", "label_dataset_shards"]

log = logging.getLogger(__name__)

#: The review verdicts (``instances.review``) that make an instance a ``corrections=only`` target.
REVIEWED = ("accepted", "relabelled", "mask_edited", "added")


def _labels_url(spec: DatasetSpec) -> str:
    if not isinstance(spec.shards, str):
        raise ConfigError(f"dataset {spec.name!r}: corrections=... names one label output, not a list of shards")
    return spec.shards.rstrip("/")


def _shard_name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".parquet")


def _reviewed_images(labels: str, s3_endpoint: str | None) -> set[tuple[str, str]]:
    """(shard, key) of the images whose latest verdicts keep a reviewed instance."""
    out = set()
    for ident, items in corrections_of(labels, s3_endpoint=s3_endpoint).items():
        latest: dict[Any, str] = {}
        for n, c in enumerate(items):
            latest[c["instance"] if c["instance"] is not None else ("added", n)] = c["kind"]
        if any(kind in REVIEWED for kind in latest.values()):
            out.add(ident)
    return out


def label_dataset_shards(spec: DatasetSpec, *, s3_endpoint: str | None = None) -> list[tuple[str, str]]:
    """(input shard URL, label Parquet URL) of a label-output dataset, in shard order: its committed
    shards whose input shard is known (with ``corrections=only``: those holding a reviewed
    instance). A ``ConfigError`` naming the fix when none is left."""
    labels = _labels_url(spec)
    files = label_files(labels, s3_endpoint=s3_endpoint)
    try:
        sources = source_shards(labels, spec.images, s3_endpoint=s3_endpoint)
    except (ShardSpecError, MissingInputError, ConfigError) as e:
        raise ConfigError(
            f"dataset {spec.name!r}: the images of label output {storage.redact(labels)} are not found ({e}); "
            "pass images=SHARDS (its input shards)"
        ) from None
    wanted = None
    if spec.corrections == "only":
        wanted = {shard for shard, _ in _reviewed_images(labels, s3_endpoint)}
    pairs, unknown = [], []
    for url in files:
        name = _shard_name(url)
        if wanted is not None and name not in wanted:
            continue
        if name not in sources:
            unknown.append(name)
            continue
        pairs.append((sources[name], url))
    if unknown:
        log.warning(
            "dataset %r: %d label shards have no input shard among %d listed (e.g. %s): skipped; pass "
            "images=SHARDS if they moved",
            spec.name,
            len(unknown),
            len(sources),
            unknown[0],
        )
    if not pairs:
        what = "no reviewed instance (run `ovsam-ray review import` first)" if wanted is not None else "no shard"
        raise ConfigError(f"dataset {spec.name!r}: label output {storage.redact(labels)} has {what} to train on")
    return pairs


def label_annotations(label_url: str, mode: str, *, s3_endpoint: str | None = None) -> dict[str, list[dict]]:
    """Key -> COCO-style annotations (``segmentation`` RLE, ``category_name``, ``bbox`` xywh) of one
    label shard, review corrections applied; with ``mode="only"`` the reviewed instances alone.
    Images without any are left out."""
    out: dict[str, list[dict]] = {}
    columns = ["shard", "key", "status", "instances"]
    for row in read_label_file(label_url, columns=columns, s3_endpoint=s3_endpoint):
        if row["status"] != "ok":
            continue
        anns = []
        for inst in row["instances"] or []:
            if mode == "only" and inst.get("review") not in REVIEWED:
                continue
            if not inst.get("label") or not inst.get("rle"):
                continue
            x0, y0, x1, y1 = (float(v) for v in inst.get("bbox") or (0, 0, 0, 0))
            anns.append(
                {
                    "segmentation": {"size": list(inst["rle"]["size"]), "counts": inst["rle"]["counts"]},
                    "category_name": inst["label"],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "iscrowd": 0,
                }
            )
        if anns:
            out[row["key"]] = anns
    return out


def label_dataset_images(spec: DatasetSpec, *, s3_endpoint: str | None = None) -> int:
    """Images in one pass over a label-output dataset: the images with a reviewed instance
    (``only``), or the label rows with status ok (``all``)."""
    labels = _labels_url(spec)
    shards = {_shard_name(p) for _, p in label_dataset_shards(spec, s3_endpoint=s3_endpoint)}
    if spec.corrections == "only":
        return max(1, sum(1 for shard, _ in _reviewed_images(labels, s3_endpoint) if shard in shards))
    images = 0
    for url in label_files(labels, s3_endpoint=s3_endpoint):
        if _shard_name(url) in shards:
            with storage.open_url(url, "rb", s3_endpoint=s3_endpoint) as f:
                status = pq.read_table(f, columns=["status"]).column("status").to_pylist()
            images += sum(1 for s in status if s == "ok")
    return max(1, images)
