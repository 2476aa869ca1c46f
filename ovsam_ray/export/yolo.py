"""Label output -> YOLO segmentation labels (Ultralytics format), streamed.

``<output>/labels/<shard>/<key>.txt``: one line per instance, ``<class> x1 y1 x2 y2 ...`` with the
polygon normalised to [0, 1] by the image size (the outline of the mask's largest 4-connected
part; see :mod:`ovsam_ray.export.polygons`); an image without instances gets an empty file (a
background image). With ``shards`` the images are extracted next to them
(``<output>/images/<shard>/<key>.<ext>``: Ultralytics finds labels by replacing ``/images/``
with ``/labels/``). ``<output>/data.yaml`` (written last) lists the class names. Class indices:
the position in ``classes`` (a vocabulary or a COCO json's categories; other labels are dropped
and counted), else the label's ``label_id``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ovsam_ray import io
from ovsam_ray.data.rle import decode_rle
from ovsam_ray.data.shards import iter_shard_samples
from ovsam_ray.export.categories import load_categories
from ovsam_ray.export.polygons import mask_to_polygons
from ovsam_ray.export.reader import iter_label_batches, source_shards, write_file
from ovsam_ray.model.text_embedding import clean_class_name

__all__ = ["export_yolo", "yolo_lines"]

log = logging.getLogger(__name__)


def yolo_lines(instances: list[dict[str, Any]], width: int, height: int, class_of: Any, *,
               tolerance: float = 1.0, min_score: float = 0.0) -> tuple[list[str], int]:
    """YOLO segmentation lines for one image; ``class_of(instance)`` gives the class index or
    ``None`` (dropped). Returns the lines and how many instances were dropped (no class, below
    ``min_score``, or an empty/degenerate mask)."""
    lines, dropped = [], 0
    for inst in instances:
        cls = class_of(inst)
        if cls is None or (inst.get("label_score") or 0.0) < min_score:
            dropped += 1
            continue
        polys = mask_to_polygons(decode_rle(inst["rle"]), tolerance=tolerance)
        if not polys:
            dropped += 1
            continue
        coords = " ".join(f"{x / width:.6f} {y / height:.6f}" for x, y in polys[0])
        lines.append(f"{cls} {coords}")
    return lines, dropped


def _yaml(names: dict[int, str]) -> str:
    # JSON strings are valid YAML scalars: no YAML library needed
    body = "\n".join(f"  {k}: {json.dumps(v)}" for k, v in sorted(names.items()))
    return f"path: .\ntrain: images\nval: images\nnames:\n{body}\n"


def export_yolo(labels: str, output: str, *, classes: str | None = None, shards: str | None = None,
                tolerance: float = 1.0, min_score: float = 0.0, with_images: bool = False,
                s3_endpoint: str | None = None) -> dict[str, int]:
    """Write YOLO segmentation labels (and, with ``with_images``, the images from the shards —
    ``shards`` or the run record's input) under ``output``; returns counts."""
    if classes:
        cats = load_categories(classes, s3_endpoint=s3_endpoint)
        index = {clean_class_name(str(c["name"])): i for i, c in enumerate(cats)}
        names = {i: str(c["name"]) for i, c in enumerate(cats)}

        def class_of(inst: dict[str, Any]) -> int | None:
            return index.get(clean_class_name(str(inst.get("label"))))
    else:
        names = {}

        def class_of(inst: dict[str, Any]) -> int | None:
            if inst.get("label_id") is None:
                return None
            names.setdefault(int(inst["label_id"]), str(inst.get("label")))
            return int(inst["label_id"])

    urls = source_shards(labels, shards, s3_endpoint=s3_endpoint) if with_images else {}
    stats = {"images": 0, "instances": 0, "dropped": 0, "error_rows": 0, "images_written": 0}
    pending: dict[str, set[str]] = {}  # rows come shard by shard: copy a shard's images once it is done

    def flush(keep: str | None = None) -> None:
        for shard in [s for s in pending if s != keep]:
            stats["images_written"] += _copy_images(urls.get(shard), pending.pop(shard),
                                                    io.join(output, "images", shard), s3_endpoint)

    for batch in iter_label_batches(labels, s3_endpoint=s3_endpoint):
        for row in batch:
            if row["status"] != "ok":
                stats["error_rows"] += 1
                continue
            lines, dropped = yolo_lines(row["instances"] or [], row["width"], row["height"], class_of,
                                        tolerance=tolerance, min_score=min_score)
            write_file(io.join(output, "labels", row["shard"], f"{row['key']}.txt"),
                       ("\n".join(lines) + ("\n" if lines else "")).encode(), s3_endpoint=s3_endpoint)
            stats["images"] += 1
            stats["instances"] += len(lines)
            stats["dropped"] += dropped
            if with_images:
                flush(keep=row["shard"])
                pending.setdefault(row["shard"], set()).add(row["key"])
    flush()
    write_file(io.join(output, "data.yaml"), _yaml(names).encode(), s3_endpoint=s3_endpoint)
    return stats


def _copy_images(shard_url: str | None, keys: set[str], folder: str, s3_endpoint: str | None) -> int:
    if shard_url is None:
        log.warning("no input shard for %s: images not copied", folder)
        return 0
    n = 0
    for s in iter_shard_samples(shard_url, s3_endpoint=s3_endpoint):
        if s["key"] in keys and s["image_bytes"] is not None:
            write_file(io.join(folder, f"{s['key']}.{s['image_ext']}"), s["image_bytes"], s3_endpoint=s3_endpoint)
            n += 1
    return n
