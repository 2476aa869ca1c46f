"""Label output -> labelled WebDataset shards: the images and their labels together, for training.

``<output>/<shard>.tar`` per label shard; each sample is the original image bytes as
``<key>.<ext>`` (the bytes of its member in the input shard) and ``<key>.json``, names made safe
by :func:`~ovsam_ray.export.paths.data_file_name` (``key`` in the json is the original)::

    {"key", "shard", "image_id", "width", "height",
     "instances": [{"rle": {"size": [h, w], "counts"}, "bbox": [x0, y0, x1, y1], "area", "label",
                    "label_id", "label_score", "topk_labels", "topk_scores", "prompt_type",
                    "prompt_box", "point", "detector_label", "detector_score", "source",
                    "shard_label" (these two when known)}]}

(``bbox`` is XYXY in original-image pixels, the label output's convention; ``rle`` is COCO RLE,
``pycocotools.mask.decode`` reads it). Written shard by shard in the input shard's sample order:
memory holds one shard's label rows and one image; each tar appears complete or not at all.
Error rows and instances below ``min_score`` are left out; so are rows whose image is not in the
shard (counted). Read them with ``webdataset.WebDataset(urls).decode("rgb")`` or
``ray.data.read_webdataset(output)``. Every sample of a tar has the same image extension, as Ray
Data's reader needs (its rows of one tar share columns): in a shard that mixes formats (JPEG and
PNG) every image that is not PNG is re-encoded as PNG, losslessly (its decoded pixels are the
same; counted as ``transcoded``).
"""

from __future__ import annotations

import io as _io
import json
import logging
import tarfile
from collections.abc import Iterator
from typing import IO, Any

from ovsam_ray import storage
from ovsam_ray.data.shards import iter_shard_samples
from ovsam_ray.export.images import shard_image_exts
from ovsam_ray.export.output import open_output
from ovsam_ray.export.paths import data_file_name
from ovsam_ray.labels.reader import iter_label_rows, label_files, read_label_file, source_shards
from ovsam_ray.written import writing

__all__ = ["export_wds", "wds_labels"]

log = logging.getLogger(__name__)

_FIELDS = (
    "rle",
    "bbox",
    "area",
    "label",
    "label_id",
    "label_score",
    "topk_labels",
    "topk_scores",
    "prompt_type",
    "prompt_box",
    "point",
    "detector_label",
    "detector_score",
)
#: Written only when not null: the export of an output written before these fields stays as it was.
_NEWER_FIELDS = ("source", "shard_label")


def wds_labels(row: dict[str, Any], *, min_score: float = 0.0) -> dict[str, Any]:
    """The ``<key>.json`` of one ``ok`` label row."""
    instances = [
        {k: inst.get(k) for k in _FIELDS} | {k: inst[k] for k in _NEWER_FIELDS if inst.get(k) is not None}
        for inst in row["instances"] or []
        if (inst.get("label_score") or 0.0) >= min_score
    ]
    return {
        "key": row["key"],
        "shard": row["shard"],
        "image_id": row.get("image_id"),
        "width": row["width"],
        "height": row["height"],
        "instances": instances,
    }


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tf.addfile(info, _io.BytesIO(data))


def _write_shard(
    f: IO[bytes],
    rows: dict[str, dict[str, Any]],
    shard_url: str,
    min_score: float,
    s3_endpoint: str | None,
    stats: dict[str, int],
    as_png: bool = False,
) -> None:
    found = set()
    with tarfile.open(fileobj=f, mode="w|") as tf:
        for s in iter_shard_samples(shard_url, s3_endpoint=s3_endpoint):
            row = rows.get(s["key"]) if s["key"] is not None else None
            if row is None or s["image_bytes"] is None or s["key"] in found:
                continue
            found.add(s["key"])
            labels = wds_labels(row, min_score=min_score)
            data, ext = s["image_bytes"], s["image_ext"]
            if as_png and ext != "png":
                data, ext = _png(data), "png"
                stats["transcoded"] += 1
            _add(tf, data_file_name(None, s["key"], ext), data)
            _add(tf, data_file_name(None, s["key"], "json"), json.dumps(labels, separators=(",", ":")).encode())
            stats["samples"] += 1
            stats["instances"] += len(labels["instances"])
    if len(rows) > len(found):
        first = min(set(rows) - found)
        log.warning(
            "%d labelled images not found in %s, left out (first: %s)",
            len(rows) - len(found),
            storage.redact(shard_url),
            storage.safe_for_log(first, limit=80),
        )
    stats["missing_images"] += len(rows) - len(found)


def _png(data: bytes) -> bytes:
    """An image's bytes re-encoded as PNG (lossless: the decoded pixels are unchanged)."""
    from PIL import Image

    out = _io.BytesIO()
    with Image.open(_io.BytesIO(data)) as im:
        im.save(out, format="PNG")
    return out.getvalue()


def _wds_names(labels: str, s3_endpoint: str | None) -> Iterator[str]:
    """``<shard>.tar`` for every shard with an ``ok`` row (one missing from the input shards is
    not written, but is claimed all the same: a rerun may find it)."""
    seen: set[str] = set()
    for row in iter_label_rows(labels, columns=("shard", "status"), s3_endpoint=s3_endpoint):
        if row["status"] == "ok" and row["shard"] not in seen:
            seen.add(row["shard"])
            yield data_file_name(row["shard"], None, "tar")


def export_wds(
    labels: str,
    output: str,
    *,
    shards: str | None = None,
    min_score: float = 0.0,
    overwrite: bool = False,
    s3_endpoint: str | None = None,
) -> dict[str, int]:
    """Write ``<output>/<shard>.tar`` for every label shard, reading the images from the input
    shards (``shards`` or the run record's input); returns counts (``missing_images``: labelled
    images not in their shard; ``missing_shards``: shards not found, their images left out).
    Tars of the same names already there are refused unless an earlier export wrote them (see
    :mod:`ovsam_ray.written`)."""
    with writing(output, "export wds", _wds_names(labels, s3_endpoint), overwrite=overwrite, s3_endpoint=s3_endpoint):
        return _export_wds(labels, output, shards=shards, min_score=min_score, s3_endpoint=s3_endpoint)


def _export_wds(
    labels: str, output: str, *, shards: str | None, min_score: float, s3_endpoint: str | None
) -> dict[str, int]:
    urls = source_shards(labels, shards, s3_endpoint=s3_endpoint)
    stats = {
        "shards": 0,
        "samples": 0,
        "instances": 0,
        "error_rows": 0,
        "missing_images": 0,
        "missing_shards": 0,
        "transcoded": 0,
    }
    for url in label_files(labels, s3_endpoint=s3_endpoint):
        by_shard: dict[str, dict[str, dict[str, Any]]] = {}
        for row in read_label_file(url, s3_endpoint=s3_endpoint):
            if row["status"] != "ok":
                stats["error_rows"] += 1
                continue
            by_shard.setdefault(row["shard"], {})[row["key"]] = row
        for shard in sorted(by_shard):
            rows = by_shard[shard]
            if shard not in urls:
                log.warning(
                    "no input shard %s: its %d labelled images are left out", storage.safe_for_log(shard), len(rows)
                )
                stats["missing_shards"] += 1
                stats["missing_images"] += len(rows)
                continue
            target = storage.join(output, data_file_name(shard, None, "tar"))
            exts = shard_image_exts(urls[shard], s3_endpoint=s3_endpoint)
            mixed = len({exts[k] for k in rows if k in exts}) > 1
            if mixed:
                log.info("%s mixes image formats: its images are written as PNG", storage.safe_for_log(shard))
            with open_output(target, "wb", s3_endpoint=s3_endpoint) as f:
                _write_shard(f, rows, urls[shard], min_score, s3_endpoint, stats, as_png=mixed)
            stats["shards"] += 1
    return stats
