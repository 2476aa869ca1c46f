"""Label output -> SA-1B-style per-image json: ``<output>/<shard>/<key>.json`` (made a safe file
name by :func:`~ovsam_ray.export.paths.data_file_name`; the record keeps the original key).

Same layout as SA-1B's own files — ``{"image": {image_id, width, height, file_name},
"annotations": [{id, segmentation (RLE), bbox (xywh), area, point_coords, crop_box, ...}]}`` —
plus the open-vocabulary fields per mask (``label``, ``label_id``, ``label_score``,
``topk_labels``, ``topk_scores``, ``prompt_type``, ``prompt_box``, ``source``). ``image_id`` is an
integer as in SA-1B: the rows' own ids when every one is an integer, else 1..N in output order
(the COCO export's ids; the original key is in ``key``); annotation ``id`` runs 1..M over the
export. Every SA-1B annotation field is present: ``predicted_iou`` and ``stability_score`` come
from the instance's fields of those names when the labels have them, else null (OV-SAM has no IoU
head); ``point_coords`` is the point prompt, or the prompt box's centre.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

from ovsam_ray import storage
from ovsam_ray.export.coco import coco_image_ids, ok_rows
from ovsam_ray.export.images import ImageExts
from ovsam_ray.export.output import write_file
from ovsam_ray.export.paths import data_file_name
from ovsam_ray.labels.reader import iter_label_rows
from ovsam_ray.written import writing

__all__ = ["export_sa1b", "sa1b_record"]

log = logging.getLogger(__name__)


def _point(inst: dict[str, Any]) -> list[list[float]]:
    if inst.get("point") is not None:
        return [[float(v) for v in inst["point"]]]
    box = inst.get("prompt_box") or inst.get("bbox") or [0, 0, 0, 0]
    return [[(float(box[0]) + float(box[2])) / 2, (float(box[1]) + float(box[3])) / 2]]


def sa1b_record(
    row: dict[str, Any], *, min_score: float = 0.0, ext: str = "jpg", image_id: int | None = None, first_id: int = 0
) -> dict[str, Any]:
    """The SA-1B-style json of one ``ok`` label row (``file_name`` = ``<key>.<ext>`` as a safe file
    name: the image's path below ``images/<shard>/`` in a COCO or YOLO export ``with_images``);
    ``image_id``: its integer id (default: the row's, when an integer); annotation ids count from
    ``first_id``."""
    width, height = int(row["width"]), int(row["height"])
    anns: list[dict[str, Any]] = []
    for inst in row["instances"] or []:
        if (inst.get("label_score") or 0.0) < min_score:
            continue
        x0, y0, x1, y1 = (float(v) for v in inst["bbox"])
        anns.append(
            {
                "id": first_id + len(anns),
                "segmentation": {"size": [int(v) for v in inst["rle"]["size"]], "counts": inst["rle"]["counts"]},
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": int(inst["area"]),
                "predicted_iou": inst.get("predicted_iou"),
                "point_coords": _point(inst),
                "crop_box": [0, 0, width, height],
                "stability_score": inst.get("stability_score"),
                "label": inst.get("label"),
                "label_id": inst.get("label_id"),
                "label_score": inst.get("label_score"),
                "topk_labels": inst.get("topk_labels"),
                "topk_scores": inst.get("topk_scores"),
                "prompt_type": inst.get("prompt_type"),
                "prompt_box": inst.get("prompt_box"),
                "source": inst.get("source"),
            }
        )
    image = {
        "image_id": image_id if image_id is not None else _int_or_none(row.get("image_id")),
        "width": width,
        "height": height,
        "file_name": data_file_name(None, row["key"], ext),
        "shard": row["shard"],
        "key": row["key"],
    }
    return {"image": image, "annotations": anns}


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value is not None and str(int(value)) == str(value).strip() else None
    except (TypeError, ValueError):
        return None


def _sa1b_names(labels: str, s3_endpoint: str | None) -> Iterator[str]:
    for row in iter_label_rows(labels, columns=("shard", "key", "status"), s3_endpoint=s3_endpoint):
        if row["status"] == "ok":
            yield data_file_name(row["shard"], row["key"], "json")


def export_sa1b(
    labels: str,
    output: str,
    *,
    min_score: float = 0.0,
    shards: str | None = None,
    overwrite: bool = False,
    s3_endpoint: str | None = None,
) -> dict[str, int]:
    """Write one json per ``ok`` row under ``output``; returns counts. ``file_name`` takes the image's extension in its
    input shard (``shards`` or the run record's input; ``jpg`` when they are unknown). Files of the same names
    already there are refused unless an earlier export wrote them (see :mod:`ovsam_ray.written`)."""
    with writing(output, "export sa1b", _sa1b_names(labels, s3_endpoint), overwrite=overwrite, s3_endpoint=s3_endpoint):
        return _export_sa1b(labels, output, min_score=min_score, shards=shards, s3_endpoint=s3_endpoint)


def _export_sa1b(
    labels: str, output: str, *, min_score: float, shards: str | None, s3_endpoint: str | None
) -> dict[str, int]:
    stats = {"images": 0, "annotations": 0, "error_rows": 0}
    exts = ImageExts(labels, shards, s3_endpoint=s3_endpoint)
    stats["error_rows"] = sum(
        1 for r in iter_label_rows(labels, columns=("status",), s3_endpoint=s3_endpoint) if r["status"] != "ok"
    )
    policy = coco_image_ids(labels, s3_endpoint=s3_endpoint)
    for image_id, row in ok_rows(labels, None, policy, s3_endpoint):
        target = storage.join(output, data_file_name(row["shard"], row["key"], "json"))
        record = sa1b_record(
            row,
            min_score=min_score,
            ext=exts(row["shard"], row["key"]) or "jpg",
            image_id=image_id,
            first_id=stats["annotations"] + 1,
        )
        write_file(target, json.dumps(record, separators=(",", ":")).encode(), s3_endpoint=s3_endpoint)
        stats["images"] += 1
        stats["annotations"] += len(record["annotations"])
    return stats
