"""Segment everything: ``OVSAMAutomaticMaskGenerator`` prompts an N x N point grid over an image
and keeps the stable, non-duplicate masks, each with its open-vocabulary label and score; it sits
beside ``OVSAMPredictor`` as segment-anything's ``SamAutomaticMaskGenerator`` sits beside
``SamPredictor``.

The selection rule is two functions over one image's ``ImagePrediction``, so that the label
job's grid mode (``--prompts grid``, whose grid points share a decoder call with box and point
prompts) applies exactly the same rule: :func:`mask_quality` (each mask on its own: area,
stability, score) and :func:`remove_duplicates` (mask NMS of the grid masks, then optional
de-duplication of all masks).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ovsam_ray.errors import ConfigError
from ovsam_ray.model.amg import grid_points, mask_nms, stability_scores
from ovsam_ray.model.predictor import ImagePrediction, ImagePrompts, OVSAMPredictor

# SAM's SamAutomaticMaskGenerator defaults, the label job's grid mode's too.
POINTS_PER_SIDE = 32
STABILITY_THRESH = 0.95
MASK_NMS_IOU = 0.7


def mask_quality(
    pred: ImagePrediction,
    is_grid: np.ndarray,
    *,
    min_area: int = 0,
    stability_thresh: float = STABILITY_THRESH,
    stability_offset: float = 1.0,
    score_thresh: float = 0.0,
) -> np.ndarray:
    """(N,) bool: the predictions that pass the per-mask filters.

    Every mask needs ``min_area`` pixels; a grid prompt's mask (``is_grid`` (N,) bool) must also
    be non-empty, have a stability score (``amg.stability_scores`` of its low-res logits at
    ``stability_offset``) >= ``stability_thresh`` and a label probability >= ``score_thresh`` (when > 0).
    Each mask is judged alone, so the result for a subset of prompts is the subset of the result.
    """
    if len(is_grid) == 0:
        return np.zeros(0, bool)
    areas = pred.mask_areas()
    keep = areas >= min_area
    if is_grid.any():
        low = torch.from_numpy(pred.low_res_logits[is_grid, 0])
        stable = stability_scores(low, stability_offset).numpy() >= stability_thresh
        good = np.ones(len(keep), bool)
        good[is_grid] = stable & (areas[is_grid] > 0)
        if score_thresh > 0:
            good[is_grid] &= pred.scores[is_grid] >= score_thresh
        keep &= good
    return keep


def remove_duplicates(
    pred: ImagePrediction,
    keep: np.ndarray,
    is_grid: np.ndarray,
    *,
    nms_iou: float = MASK_NMS_IOU,
    dedup_iou: float | None = None,
    dedup_containment: float | None = None,
    dedup_class_aware: bool = False,
) -> np.ndarray:
    """(N,) bool: ``keep`` (N,) bool less the duplicates.

    First mask NMS among the kept grid masks (IoU > ``nms_iou`` with a higher-scored one drops a
    mask); then, when ``dedup_iou`` or ``dedup_containment`` is set, ``amg.mask_nms`` over every
    kept mask (per label with ``dedup_class_aware``). Masks are the low-res logits > 0; the
    score is the label probability.
    """
    keep = keep.copy()
    low = torch.from_numpy(pred.low_res_logits[:, 0])
    grid_idx = np.nonzero(is_grid & keep)[0]
    if len(grid_idx):
        kept = mask_nms(low[grid_idx] > 0, torch.from_numpy(pred.scores[grid_idx]), iou_threshold=nms_iou)
        keep[grid_idx] = False
        keep[grid_idx[kept.numpy()]] = True
    if dedup_iou is not None or dedup_containment is not None:
        idx = np.nonzero(keep)[0]
        labels = torch.from_numpy(pred.labels[idx]) if dedup_class_aware else None
        kept = mask_nms(
            low[idx] > 0,
            torch.from_numpy(pred.scores[idx]),
            iou_threshold=1.0 if dedup_iou is None else dedup_iou,
            containment_threshold=dedup_containment,
            labels=labels,
        )
        keep[:] = False
        keep[idx[kept.numpy()]] = True
    return keep


@dataclass
class GeneratedMasks:
    """What ``OVSAMAutomaticMaskGenerator.predict`` returns for one image: the K kept masks in
    grid order (row by row from the top left), as the predictor gives them.

    prediction: an ``ImagePrediction`` of the K masks (every field as the predictor documents it,
    original-image pixels); points: (K, 2) XY original pixels, the grid point of each mask;
    stability_scores: (K,) float32.
    """

    prediction: ImagePrediction
    points: np.ndarray
    stability_scores: np.ndarray

    @property
    def prompts(self) -> ImagePrompts:
        """The K masks' prompts (points only), for ``records.prediction_to_instances``."""
        return ImagePrompts(points=self.points)

    def __len__(self) -> int:
        return len(self.points)


class OVSAMAutomaticMaskGenerator:
    """Masks and open-vocabulary labels for everything in an image, from a point grid.

    Prompts a ``points_per_side`` x ``points_per_side`` grid of points (cell centres, original-
    image pixels), ``points_per_batch`` points per ``predictor.predict`` call on one image
    embedding (which bounds the memory of full-size masks), drops the masks that fail
    :func:`mask_quality` after each batch and the duplicates of :func:`remove_duplicates` at the
    end: the same masks as one call with every point. The defaults are SAM's automatic mask generator's
    (stability 0.95 at offset 1.0, NMS IoU 0.7). OV-SAM's decoder has no IoU head, so SAM's
    ``pred_iou_thresh`` becomes ``score_thresh``, a floor on the label probability (0: off).

    Example::

        generator = OVSAMAutomaticMaskGenerator(predictor, points_per_side=16)
        for record in generator.generate(image):  # (H, W, 3) uint8 RGB
            record["segmentation"], record["label"], record["score"]
    """

    def __init__(
        self,
        predictor: OVSAMPredictor,
        *,
        points_per_side: int = POINTS_PER_SIDE,
        points_per_batch: int = 128,
        stability_score_thresh: float = STABILITY_THRESH,
        stability_score_offset: float = 1.0,
        score_thresh: float = 0.0,
        mask_nms_thresh: float = MASK_NMS_IOU,
        min_mask_area: int = 0,
        dedup_iou: float | None = None,
        dedup_containment: float | None = None,
        dedup_class_aware: bool = False,
    ) -> None:
        if points_per_side < 1 or points_per_batch < 1:
            raise ConfigError(f"points_per_side={points_per_side}, points_per_batch={points_per_batch}: need >= 1")
        self.predictor = predictor
        self.points_per_side = points_per_side
        self.points_per_batch = points_per_batch
        self.quality: dict[str, Any] = {
            "min_area": min_mask_area,
            "stability_thresh": stability_score_thresh,
            "stability_offset": stability_score_offset,
            "score_thresh": score_thresh,
        }
        self.duplicates: dict[str, Any] = {
            "nms_iou": mask_nms_thresh,
            "dedup_iou": dedup_iou,
            "dedup_containment": dedup_containment,
            "dedup_class_aware": dedup_class_aware,
        }

    def predict(self, image: np.ndarray) -> GeneratedMasks:
        """image: (H, W, 3) uint8 RGB (grayscale and RGBA are converted) -> the kept masks."""
        embedded = self.predictor.embed([image])
        height, width = embedded.original_sizes[0]
        points = grid_points(self.points_per_side, height, width)
        parts, part_points = [], []
        for start in range(0, len(points), self.points_per_batch):
            batch = points[start : start + self.points_per_batch]
            pred = self.predictor.predict(embedded, [ImagePrompts(points=batch)])[0]
            good = np.nonzero(mask_quality(pred, np.ones(len(batch), bool), **self.quality))[0]
            parts.append(_take(pred, good))
            part_points.append(batch[good])
        pred = _concat(parts)
        keep = np.nonzero(
            remove_duplicates(pred, np.ones(len(pred.labels), bool), np.ones(len(pred.labels), bool), **self.duplicates)
        )[0]
        pred = _take(pred, keep)
        low = torch.from_numpy(pred.low_res_logits[:, 0])
        stability = stability_scores(low, self.quality["stability_offset"]).numpy().astype(np.float32)
        return GeneratedMasks(prediction=pred, points=np.concatenate(part_points)[keep], stability_scores=stability)

    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """image: (H, W, 3) uint8 RGB -> one record per kept mask, in grid order:

        segmentation (H, W) bool; area int (pixels); bbox [x0, y0, x1, y1] XYXY of the mask
        (unlike SAM's XYWH); point_coords [[x, y]] the grid point; stability_score float; label
        int (the vocabulary's class index) and score float (its fused probability); topk_ids and
        topk_scores lists. All coordinates in original-image pixels.
        """
        out = self.predict(image)
        pred = out.prediction
        masks = pred.masks if pred.masks is not None else [_rle_to_mask(r) for r in pred.rles or []]
        areas = pred.mask_areas()
        return [
            {
                "segmentation": masks[i],
                "area": int(areas[i]),
                "bbox": pred.mask_boxes[i].tolist(),
                "point_coords": [out.points[i].tolist()],
                "stability_score": float(out.stability_scores[i]),
                "label": int(pred.labels[i]),
                "score": float(pred.scores[i]),
                "topk_ids": pred.topk_ids[i].tolist(),
                "topk_scores": pred.topk_scores[i].tolist(),
            }
            for i in range(len(out))
        ]


def _take(pred: ImagePrediction, idx: np.ndarray) -> ImagePrediction:
    """The predictions ``idx`` of ``pred``."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(ImagePrediction):
        v = getattr(pred, f.name)
        values[f.name] = None if v is None else [v[i] for i in idx.tolist()] if f.name == "rles" else v[idx]
    return ImagePrediction(**values)


def _concat(preds: list[ImagePrediction]) -> ImagePrediction:
    """One prediction of all of ``preds`` (one image's batches), in order."""
    if len(preds) == 1:
        return preds[0]
    values: dict[str, Any] = {}
    for f in dataclasses.fields(ImagePrediction):
        vs = [getattr(p, f.name) for p in preds]
        values[f.name] = None if vs[0] is None else sum(vs, []) if f.name == "rles" else np.concatenate(vs)
    return ImagePrediction(**values)


def _rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """An uncompressed RLE of ``ImagePrediction.rles`` (column-major run lengths, zeros first)
    -> (H, W) bool."""
    height, width = rle["size"]
    counts = np.asarray(rle["counts"], np.int64)
    return np.repeat(np.arange(len(counts)) % 2 == 1, counts).reshape(width, height).T
