"""Prompted-segmentation metrics against the ground truth in shards (the demo's acceptance check).

For every box prompt: IoU of the predicted mask with the ground-truth mask of the object the box
came from, whether the label is right, and the IoU of the prompt box itself filled as a mask
(the *box-fill* baseline); for every point prompt: the mask IoU with the object the point lies
in. ``evaluate_label_output`` scores the label job's Parquet rows (``labels.schema``
schema); ``evaluate_model`` runs a predictor in-process with the same prompts the demo uses:
each object's box and one interior point (``interior_point``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ovsam_ray import io
from ovsam_ray.data.decode import decode_image
from ovsam_ray.data.rle import boxes_from_binary_masks, decode_rle
from ovsam_ray.data.shards import list_shards, read_shard
from ovsam_ray.model.text_embedding import clean_class_name

log = logging.getLogger(__name__)


@dataclass
class GroundTruth:
    """One image: masks (N, H, W) bool, boxes (N, 4) XYXY of the masks, class names (N,)."""

    masks: np.ndarray
    boxes: np.ndarray
    names: list[str]
    image_bytes: bytes | None = None


def load_ground_truth(shards: str | Sequence[str], *, s3_endpoint: str | None = None, keep_images: bool = False
                      ) -> dict[tuple[str, str], GroundTruth]:
    """(shard name, key) -> GroundTruth from the COCO-style ``annotations`` (RLE masks, ``category_name``)."""
    out: dict[tuple[str, str], GroundTruth] = {}
    for url in list_shards(shards, s3_endpoint=s3_endpoint):
        shard = read_shard(url, s3_endpoint=s3_endpoint)
        for sample in shard.samples:
            if sample["error"] or not sample["json_bytes"]:
                continue
            anns = [a for a in json.loads(sample["json_bytes"]).get("annotations", []) if not a.get("iscrowd")]
            masks = np.stack([decode_rle(a["segmentation"]) for a in anns]) if anns else None
            if masks is None:
                continue
            names = [str(a.get("category_name", a.get("category_id"))) for a in anns]
            out[(shard.shard, sample["key"])] = GroundTruth(
                masks, boxes_from_binary_masks(masks), names, sample["image_bytes"] if keep_images else None
            )
    return out


def interior_point(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) of a pixel deepest inside ``mask`` (last survivor of repeated 4-neighbour erosion;
    the one nearest the survivors' centroid)."""
    current = np.asarray(mask, bool)
    if not current.any():
        return 0.0, 0.0
    while True:
        eroded = current.copy()
        eroded[1:] &= current[:-1]
        eroded[:-1] &= current[1:]
        eroded[:, 1:] &= current[:, :-1]
        eroded[:, :-1] &= current[:, 1:]
        eroded[0, :] = eroded[-1, :] = eroded[:, 0] = eroded[:, -1] = False
        if not eroded.any():
            break
        current = eroded
    ys, xs = np.nonzero(current)
    k = int(np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2))
    return float(xs[k]), float(ys[k])


def demo_prompts(gt: GroundTruth) -> dict[str, list]:
    """The prompt JSON the demo labels with: every object's box and one interior point."""
    return {"boxes": gt.boxes.tolist(), "points": [list(interior_point(m)) for m in gt.masks]}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def _box_mask(box: Sequence[float], hw: tuple[int, int]) -> np.ndarray:
    h, w = hw
    x0, y0 = int(np.clip(np.floor(box[0] + 1e-6), 0, w)), int(np.clip(np.floor(box[1] + 1e-6), 0, h))
    x1, y1 = int(np.clip(np.ceil(box[2] - 1e-6), 0, w)), int(np.clip(np.ceil(box[3] - 1e-6), 0, h))
    out = np.zeros(hw, bool)
    out[y0:y1, x0:x1] = True
    return out


def _match_point(point: Sequence[float], gt: GroundTruth) -> int:
    h, w = gt.masks.shape[1:]
    x, y = int(np.clip(round(point[0]), 0, w - 1)), int(np.clip(round(point[1]), 0, h - 1))
    inside = np.nonzero(gt.masks[:, y, x])[0]
    if len(inside):
        return int(inside[0])
    b = gt.boxes
    holds = np.nonzero((b[:, 0] <= x) & (x < b[:, 2]) & (b[:, 1] <= y) & (y < b[:, 3]))[0]
    if len(holds):
        return int(holds[np.argmin(gt.masks[holds].sum(axis=(1, 2)))])
    return -1


def score_instances(images: Iterable[tuple[tuple[str, str], list[dict[str, Any]]]],
                    truth: dict[tuple[str, str], GroundTruth]) -> dict[str, float]:
    """Metrics over (image id, instance records) pairs; see the module docstring."""
    box_iou, point_iou, fill_iou, correct = [], [], [], []
    unmatched = images_scored = 0
    for ident, instances in images:
        gt = truth.get(ident)
        if gt is None:
            continue
        images_scored += 1
        hw = gt.masks.shape[1:]
        for inst in instances:
            mask = decode_rle(inst["rle"]) if inst.get("rle") else np.zeros(hw, bool)
            if inst["prompt_type"] == "box":
                ious = _box_iou(np.asarray(inst["prompt_box"], np.float64), gt.boxes.astype(np.float64))
                j = int(np.argmax(ious)) if len(ious) and ious.max() > 0.5 else -1
                if j < 0:
                    unmatched += 1
                    continue
                box_iou.append(_iou(mask, gt.masks[j]))
                fill_iou.append(_iou(_box_mask(inst["prompt_box"], hw), gt.masks[j]))
                correct.append(clean_class_name(str(inst.get("label") or "")) == clean_class_name(gt.names[j]))
            elif inst["prompt_type"] == "point":
                j = _match_point(inst["point"], gt)
                if j < 0:
                    unmatched += 1
                    continue
                point_iou.append(_iou(mask, gt.masks[j]))

    def mean(values: list) -> float:
        return float(np.mean(values)) if values else float("nan")

    return {
        "box_miou": mean(box_iou), "point_miou": mean(point_iou), "box_accuracy": mean(correct),
        "box_fill_miou": mean(fill_iou), "num_images": images_scored, "num_box_prompts": len(box_iou),
        "num_point_prompts": len(point_iou), "unmatched_prompts": unmatched,
    }


def _read_rows(source: str | Sequence[dict[str, Any]], s3_endpoint: str | None) -> list[dict[str, Any]]:
    if not isinstance(source, str):
        return list(source)
    import pyarrow.parquet as pq

    fs, path = io.get_filesystem(source, s3_endpoint=s3_endpoint)
    return pq.read_table(path, filesystem=fs).to_pylist()


def evaluate_label_output(parquet_url_or_rows: str | Sequence[dict[str, Any]], shards: str | Sequence[str], *,
                          s3_endpoint: str | None = None) -> dict[str, float]:
    """Metrics of label-job output (a Parquet file/folder URL, or its rows as dicts) against the
    shards' ground truth: ``box_miou``, ``point_miou``, ``box_accuracy``, ``box_fill_miou`` plus
    counts (``error_rows`` counts rows with status "error")."""
    rows = _read_rows(parquet_url_or_rows, s3_endpoint)
    truth = load_ground_truth(shards, s3_endpoint=s3_endpoint)
    ok = [r for r in rows if r.get("status", "ok") == "ok"]
    metrics = score_instances((((r["shard"], r["key"]), r.get("instances") or []) for r in ok), truth)
    metrics["error_rows"] = len(rows) - len(ok)
    return metrics


def evaluate_model(predictor: Any, vocab: Any, shards: str | Sequence[str], *, batch_size: int = 8,
                   s3_endpoint: str | None = None) -> dict[str, float]:
    """Metrics of an ``OVSAMPredictor`` run in-process with the demo's prompts (each object's box
    and one interior point, no point boxes)."""
    from ovsam_ray.labels.records import prediction_to_instances
    from ovsam_ray.model.predictor import ImagePrompts

    truth = load_ground_truth(shards, s3_endpoint=s3_endpoint, keep_images=True)
    idents = sorted(truth)
    scored = []
    for start in range(0, len(idents), batch_size):
        chunk = idents[start : start + batch_size]
        images = [decode_image(truth[i].image_bytes) for i in chunk]
        prompts = []
        for i in chunk:
            p = demo_prompts(truth[i])
            prompts.append(ImagePrompts(boxes=np.asarray(p["boxes"], np.float32).reshape(-1, 4),
                                        points=np.asarray(p["points"], np.float32).reshape(-1, 2)))
        for ident, pred, prompt in zip(chunk, predictor(images, prompts), prompts):
            scored.append((ident, prediction_to_instances(pred, prompt, vocab)))
    return score_instances(scored, truth)


def evaluate_weights(weights: str, shards: str | Sequence[str], *, preset: str = "ovsam_tiny",
                     train_vocab: str = "shapes", device: str = "cpu") -> dict[str, float]:
    """Load exported weights as the label job does (``inference.build_predictor``) and evaluate them."""
    from ovsam_ray.inference import ModelConfig, build_predictor

    predictor, vocab, _ = build_predictor(ModelConfig(preset=preset, weights=weights, train_vocab=train_vocab),
                                          device)
    return evaluate_model(predictor, vocab, shards)
