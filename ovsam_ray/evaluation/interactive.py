"""Interactive evaluation (the paper's Table 1 protocol) on label-job output.

Each image was labelled with its ground-truth objects as prompts: first one box per object,
then one interior point per object, both in annotation order. Per prompt: mask IoU against the
ground-truth mask and whether the label equals the ground-truth class; the "box-fill" baseline
is the IoU of the prompt box filled as a mask.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import numpy as np

from ovsam_ray.data.rle import decode_rle
from ovsam_ray.data.shards import iter_shard_samples


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two (H, W) bool masks; two empty masks give 1.0."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def box_fill_mask(box: Iterable[float], height: int, width: int) -> np.ndarray:
    """(H, W) bool mask of the pixels whose centres lie inside an XYXY box."""
    x0, y0, x1, y1 = box
    xs = np.arange(width) + 0.5
    ys = np.arange(height) + 0.5
    return ((ys[:, None] >= y0) & (ys[:, None] <= y1)) & ((xs[None, :] >= x0) & (xs[None, :] <= x1))


def _ground_truth(shards: list[str]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    from ovsam_ray.data.shards import shard_name

    gt = {}
    for url in shards:
        for s in iter_shard_samples(url):
            if s.get("key") and s.get("json_bytes"):
                gt[(shard_name(url), s["key"])] = json.loads(s["json_bytes"]).get("annotations", [])
    return gt


def _category(ann: dict[str, Any]) -> str:
    return str(ann.get("category_name", ann.get("category_id")))


def _metrics(records: list[dict[str, Any]]) -> dict:
    def mean(key: str) -> float:
        values = [r[key] for r in records if key in r]
        return float(np.mean(values)) if values else float("nan")

    return {"box_miou": mean("box_iou"), "point_miou": mean("point_iou"), "box_accuracy": mean("box_ok"),
            "point_accuracy": mean("point_ok"), "box_fill_miou": mean("fill_iou"),
            "num_objects": sum(1 for r in records if "box_iou" in r)}


def evaluate_rows(rows: Iterable[dict[str, Any]], gt: dict[tuple[str, str], list[dict[str, Any]]],
                  seen: set[str] | None = None) -> dict:
    """Metrics over label rows: box_miou, point_miou, box_accuracy, point_accuracy, box_fill_miou,
    num_objects; with ``seen`` (the classes the model was trained on) also each of them over the
    objects of seen and of unseen classes, suffixed ``_seen`` / ``_unseen``."""
    records = []
    for row in rows:
        anns = gt.get((row["shard"], row["key"]))
        if row["status"] != "ok" or not anns:
            continue
        instances = list(row["instances"])
        boxes = [i for i in instances if i["prompt_type"] == "box"]
        points = [i for i in instances if i["prompt_type"] == "point"]
        for j, ann in enumerate(anns):
            target = decode_rle(ann["segmentation"])
            h, w = target.shape
            rec: dict[str, Any] = {"category": _category(ann)}
            if j < len(boxes):
                inst = boxes[j]
                rec.update(box_iou=mask_iou(decode_rle(inst["rle"]), target), box_ok=inst["label"] == rec["category"],
                           fill_iou=mask_iou(box_fill_mask(inst["prompt_box"], h, w), target))
            if j < len(points):
                inst = points[j]
                rec.update(point_iou=mask_iou(decode_rle(inst["rle"]), target),
                           point_ok=inst["label"] == rec["category"])
            records.append(rec)
    out = _metrics(records)
    if seen is not None:
        for split, keep in (("seen", True), ("unseen", False)):
            part = _metrics([r for r in records if (r["category"] in seen) == keep])
            out.update({f"{k}_{split}": v for k, v in part.items()})
    return out


def evaluate_label_output(labels_url: str, shards: list[str], seen: set[str] | None = None) -> dict:
    """Read a label job's committed Parquet files and score them against the shards' annotations
    (per seen / unseen class too, given the seen classes)."""
    import pyarrow.dataset as pds

    table = pds.dataset(labels_url, format="parquet").to_table()
    return evaluate_rows(table.to_pylist(), _ground_truth(shards), seen)
