"""Where prompts come from (``--prompts``) and which predictions survive (grid filtering, dedup).

Sources, combinable with commas: ``shard`` (boxes/points of the shard JSON), ``detector:NAME``
(boxes from a detector actor pool, added to the JSON by the detector stage), ``grid`` (an N x N
point grid: segment everything). ``A|B`` takes an image's prompts from ``A`` and, for an image
where ``A`` gives none, from ``B`` (``shard|grid``, ``shard|detector:NAME``): for shards where only
some images carry boxes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ovsam_ray.model.amg import grid_points
from ovsam_ray.model.automatic_mask_generator import mask_quality, remove_duplicates
from ovsam_ray.model.predictor import ImagePrediction, ImagePrompts


@dataclass(frozen=True)
class PromptSources:
    """Where an image's prompts come from; ``fallback``: the sources of an image for which these
    give no prompt (``A|B``)."""

    shard: bool = True
    detector: str | None = None
    grid: bool = False
    fallback: PromptSources | None = None

    @property
    def detector_name(self) -> str | None:
        """The detector whose boxes any alternative uses (the job runs its stage), or None."""
        return self.detector or (self.fallback.detector if self.fallback else None)

    @classmethod
    def parse(cls, spec: str) -> PromptSources:
        if "|" in spec:
            first, _, second = spec.partition("|")
            if "|" in second or not first.strip() or not second.strip():
                raise ValueError(f"--prompts {spec!r}: use one fallback, A|B (e.g. shard|grid or shard|detector:NAME)")
            primary, fallback = cls.parse(first), cls.parse(second)
            if primary.detector and fallback.detector and primary.detector != fallback.detector:
                raise ValueError(f"--prompts {spec!r}: both alternatives name a detector; use one")
            return dataclasses.replace(primary, fallback=fallback)
        shard, detector, grid = False, None, False
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            if part == "shard":
                shard = True
            elif part == "grid":
                grid = True
            elif part.startswith("detector:") and len(part) > len("detector:"):
                detector = part[len("detector:"):]
            else:
                raise ValueError(f"--prompts {spec!r}: use shard, grid, detector:NAME (torchvision name or "
                                 "my_pkg.module:MyDetector), several joined by commas, or A|B (B where A gives "
                                 "an image no prompt)")
        if not (shard or detector or grid):
            raise ValueError(f"--prompts {spec!r} names no prompt source")
        return cls(shard=shard, detector=detector, grid=grid)


@dataclass
class SelectConfig:
    """Post-filters. Grid prompts: stability >= grid_stability and mask NMS at grid_nms_iou
    (SAM's automatic mask generator defaults). All prompts: masks smaller than min_mask_area are
    dropped, and dedup_iou / dedup_containment (None = off) remove duplicate masks, per class
    when dedup_class_aware."""

    grid_size: int = 32
    grid_stability: float = 0.95
    grid_nms_iou: float = 0.7
    min_mask_area: int = 0
    dedup_iou: float | None = None
    dedup_containment: float | None = None
    dedup_class_aware: bool = False


@dataclass
class ImagePromptSet:
    """One image's prompts plus what each one is: prompt types ("box", "point", "grid") in
    prompt order, and detector score/label per box (None for shard boxes)."""

    prompts: ImagePrompts
    types: list[str]
    detector_scores: list[float | None] = field(default_factory=list)
    detector_labels: list[str | None] = field(default_factory=list)


def image_prompt_set(spec: dict[str, Any], sources: PromptSources, *, width: int, height: int,
                     grid_size: int) -> ImagePromptSet:
    """Combine the JSON's prompts (shard and/or detector boxes) and grid points for one image;
    when they are none and ``sources`` has a fallback, the fallback's prompts."""
    out = _combine(spec, sources, width=width, height=height, grid_size=grid_size)
    if not out.types and sources.fallback is not None:
        return image_prompt_set(spec, sources.fallback, width=width, height=height, grid_size=grid_size)
    return out


def _combine(spec: dict[str, Any], sources: PromptSources, *, width: int, height: int,
             grid_size: int) -> ImagePromptSet:
    boxes, scores, labels = [], [], []
    if sources.shard:
        boxes += spec.get("boxes") or []
        scores += spec.get("scores") or [None] * len(spec.get("boxes") or [])
        labels += spec.get("labels") or [None] * len(spec.get("boxes") or [])
    if sources.detector:
        det = spec.get("detector") or {}
        boxes += det.get("boxes") or []
        scores += det.get("scores") or []
        labels += det.get("labels") or []
    points = list(spec.get("points") or []) if sources.shard else []
    pb = spec.get("point_boxes") if sources.shard else None
    point_boxes = [[np.nan if v is None else v for v in row] for row in pb] if pb else [[np.nan] * 4] * len(points)
    n_user_points = len(points)
    if sources.grid:
        grid = grid_points(grid_size, height, width)
        points += grid.tolist()
        point_boxes += [[np.nan] * 4] * len(grid)
    prompts = ImagePrompts(
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        points=np.asarray(points, np.float32).reshape(-1, 2),
        point_boxes=np.asarray(point_boxes, np.float32).reshape(-1, 4),
    )
    types = ["box"] * len(boxes) + ["point"] * n_user_points + ["grid"] * (len(points) - n_user_points)
    return ImagePromptSet(prompts, types, scores, labels)


def select_predictions(pred: ImagePrediction, types: list[str], cfg: SelectConfig) -> np.ndarray:
    """Indices of the predictions to keep, in prompt order: the automatic mask generator's rule
    (``mask_quality``, ``remove_duplicates``) with grid prompts as its grid."""
    is_grid = np.array([t == "grid" for t in types], bool)
    keep = mask_quality(pred, is_grid, min_area=cfg.min_mask_area, stability_thresh=cfg.grid_stability)
    keep = remove_duplicates(pred, keep, is_grid, nms_iou=cfg.grid_nms_iou, dedup_iou=cfg.dedup_iou,
                             dedup_containment=cfg.dedup_containment, dedup_class_aware=cfg.dedup_class_aware)
    return np.nonzero(keep)[0]
