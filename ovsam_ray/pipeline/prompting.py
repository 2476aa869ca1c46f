"""Where prompts come from (``--prompts``) and which predictions survive (grid filtering, dedup).

Sources, combinable with commas: ``shard`` (boxes/points of the shard JSON), ``detector:NAME``
(boxes from a detector actor pool, added to the JSON by the detector stage), ``grid`` (an N x N
point grid: segment everything). ``A|B`` takes an image's prompts from ``A`` and, for an image
where ``A`` gives none, from ``B`` (``shard|grid``, ``shard|detector:NAME``): for shards where only
some images carry boxes. ``A+B`` is the union of ``A`` and ``B`` deduplicated across sources: a
mask of ``B`` whose mask IoU with a kept mask of ``A`` exceeds ``source_dedup_iou`` is dropped,
whatever the classes (``detector:owlv2+grid``: the grid fills in what the detector missed, and an
object both found keeps the detector's box, label and score). Commas bind tightest, then ``+``,
then ``|``: ``shard|detector:owlv2+grid``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ovsam_ray.errors import ConfigError
from ovsam_ray.model.amg import grid_points, mask_overlaps
from ovsam_ray.model.automatic_mask_generator import (
    MASK_NMS_IOU,
    POINTS_PER_SIDE,
    STABILITY_THRESH,
    mask_quality,
    remove_duplicates,
)
from ovsam_ray.model.predictor import ImagePrediction, ImagePrompts


@dataclass(frozen=True)
class PromptSources:
    """Where an image's prompts come from; ``fallback``: the sources of an image for which these
    give no prompt (``A|B``)."""

    shard: bool = True
    detector: str | None = None
    grid: bool = False
    fallback: PromptSources | None = None
    #: ``A+B``: the sources of each part in order ("shard", "detector", "grid"); () for none
    tiers: tuple[frozenset[str], ...] = ()

    @property
    def detector_name(self) -> str | None:
        """The detector whose boxes any alternative uses (the job runs its stage), or None."""
        return self.detector or (self.fallback.detector if self.fallback else None)

    @classmethod
    def parse(cls, spec: str) -> PromptSources:
        if "|" in spec:
            first, _, second = spec.partition("|")
            if "|" in second or not first.strip() or not second.strip():
                raise ConfigError(f"--prompts {spec!r}: use one fallback, A|B (e.g. shard|grid or shard|detector:NAME)")
            primary, fallback = cls.parse(first), cls.parse(second)
            if primary.detector and fallback.detector and primary.detector != fallback.detector:
                raise ConfigError(f"--prompts {spec!r}: both alternatives name a detector; use one")
            return dataclasses.replace(primary, fallback=fallback)
        if "+" in spec:
            return cls._parse_tiers(spec)
        shard, detector, grid = False, None, False
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            if part == "shard":
                shard = True
            elif part == "grid":
                grid = True
            elif part.startswith("detector:") and len(part) > len("detector:"):
                detector = part[len("detector:") :]
            else:
                raise ConfigError(
                    f"--prompts {spec!r}: use shard, grid, detector:NAME (torchvision name, owlv2, "
                    "grounding-dino, sam3 or my_pkg.module:MyDetector), several joined by commas, A+B (both, "
                    "deduplicated across sources) or A|B (B where A gives an image no prompt)"
                )
        if not (shard or detector or grid):
            raise ConfigError(f"--prompts {spec!r} names no prompt source")
        return cls(shard=shard, detector=detector, grid=grid)

    @classmethod
    def _parse_tiers(cls, spec: str) -> PromptSources:
        given = [cls.parse(p) if p.strip() else None for p in spec.split("+")]
        parts = [p for p in given if p is not None]
        if len(parts) < len(given):
            raise ConfigError(f"--prompts {spec!r}: A+B needs a source on each side of '+' (e.g. detector:owlv2+grid)")
        tiers = tuple(
            frozenset(k for k, on in (("shard", p.shard), ("detector", p.detector), ("grid", p.grid)) if on)
            for p in parts
        )
        seen: set[str] = set()
        for tier in tiers:
            if tier & seen:
                raise ConfigError(f"--prompts {spec!r}: each source may appear once in A+B")
            seen |= tier
        return cls(
            shard="shard" in seen,
            detector=next((p.detector for p in parts if p.detector), None),
            grid="grid" in seen,
            tiers=tiers,
        )


@dataclass
class SelectConfig:
    """Post-filters. Grid prompts: stability >= grid_stability and mask NMS at grid_nms_iou
    (SAM's automatic mask generator defaults). All prompts: masks smaller than min_mask_area are
    dropped, and dedup_iou / dedup_containment (None = off) remove duplicate masks, per class
    when dedup_class_aware. ``A+B`` prompts: a mask of a later source whose IoU with a kept mask of
    an earlier one exceeds source_dedup_iou is dropped (before dedup_iou)."""

    grid_size: int = field(default=POINTS_PER_SIDE, metadata={"help": "points per side of the segment-everything grid"})
    grid_stability: float = field(
        default=STABILITY_THRESH, metadata={"help": "grid prompts: keep masks whose stability score is at least this"}
    )
    grid_nms_iou: float = field(default=MASK_NMS_IOU, metadata={"help": "grid prompts: mask NMS at this IoU"})
    min_mask_area: int = field(default=0, metadata={"help": "drop masks smaller than this many pixels"})
    dedup_iou: float | None = field(
        default=None, metadata={"help": "drop masks overlapping a better one above this IoU"}
    )
    dedup_containment: float | None = field(
        default=None, metadata={"help": "drop masks lying this much inside a better one"}
    )
    dedup_class_aware: bool = field(
        default=False, metadata={"help": "--dedup-iou / --dedup-containment only among masks of one class"}
    )
    source_dedup_iou: float = field(
        default=0.7,
        metadata={"help": "A+B prompts: drop a mask of B overlapping a kept mask of A above this IoU (any class)"},
    )


@dataclass
class ImagePromptSet:
    """One image's prompts plus what each one is: prompt types ("box", "point", "grid") in
    prompt order, and detector score/label per box (None for shard boxes) and, when the detector
    stage keeps them (``--keep-source-masks``), the detector's own mask per box (COCO RLE)."""

    prompts: ImagePrompts
    types: list[str]
    detector_scores: list[float | None] = field(default_factory=list)
    detector_labels: list[str | None] = field(default_factory=list)
    #: ``A+B``: each prompt's part (0 for A, 1 for B...); empty without ``+``
    tiers: list[int] = field(default_factory=list)
    detector_masks: list[dict[str, Any] | None] = field(default_factory=list)
    #: each prompt's source: "shard", "detector:NAME" or "grid" (the instances' ``source``)
    sources: list[str] = field(default_factory=list)


def image_prompt_set(
    spec: dict[str, Any], sources: PromptSources, *, width: int, height: int, grid_size: int
) -> ImagePromptSet:
    """Combine the JSON's prompts (shard and/or detector boxes) and grid points for one image;
    when they are none and ``sources`` has a fallback, the fallback's prompts."""
    out = _combine(spec, sources, width=width, height=height, grid_size=grid_size)
    if not out.types and sources.fallback is not None:
        return image_prompt_set(spec, sources.fallback, width=width, height=height, grid_size=grid_size)
    return out


def _combine(
    spec: dict[str, Any], sources: PromptSources, *, width: int, height: int, grid_size: int
) -> ImagePromptSet:
    boxes: list[Any] = []
    scores: list[Any] = []
    labels: list[Any] = []
    masks: list[Any] = []
    if sources.shard:
        boxes += spec.get("boxes") or []
        scores += spec.get("scores") or [None] * len(spec.get("boxes") or [])
        labels += spec.get("labels") or [None] * len(spec.get("boxes") or [])
        masks += [None] * len(spec.get("boxes") or [])
    det = spec.get("detector") or {}
    if sources.detector:
        boxes += det.get("boxes") or []
        scores += det.get("scores") or []
        labels += det.get("labels") or []
        masks += det.get("masks") or [None] * len(det.get("boxes") or [])
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
    n_shard_boxes = len(boxes) - len(det.get("boxes") or []) if sources.detector else len(boxes)
    types = ["box"] * len(boxes) + ["point"] * n_user_points + ["grid"] * (len(points) - n_user_points)
    origin = (
        ["shard"] * n_shard_boxes
        + ["detector"] * (len(boxes) - n_shard_boxes)
        + ["shard"] * n_user_points
        + ["grid"] * (len(points) - n_user_points)
    )
    tier_of = {kind: t for t, tier in enumerate(sources.tiers) for kind in tier}
    tiers = [tier_of[o] for o in origin] if sources.tiers else []
    named = [f"detector:{sources.detector}" if o == "detector" else o for o in origin]
    return ImagePromptSet(
        prompts,
        types,
        scores,
        labels,
        tiers,
        detector_masks=masks if any(m is not None for m in masks) else [],
        sources=named,
    )


def select_predictions(
    pred: ImagePrediction, types: list[str], cfg: SelectConfig, tiers: list[int] | None = None
) -> np.ndarray:
    """Indices of the predictions to keep, in prompt order: the automatic mask generator's rule
    (``mask_quality``, ``remove_duplicates``) with grid prompts as its grid. ``tiers``: each
    prompt's part of an ``A+B`` spec (ImagePromptSet.tiers): after the grid's NMS and before the
    dedup, a mask that repeats one of an earlier part is dropped (class-agnostic)."""
    return select_with_reason(pred, types, cfg, tiers)[0]


def select_with_reason(
    pred: ImagePrediction, types: list[str], cfg: SelectConfig, tiers: list[int] | None = None
) -> tuple[np.ndarray, str | None]:
    """:func:`select_predictions` and, when prompts there were but no mask survived, the row
    warning saying which filter removed how many (None otherwise)."""
    is_grid = np.array([t == "grid" for t in types], bool)
    big = pred.mask_areas() >= cfg.min_mask_area if len(types) else np.zeros(0, bool)
    keep = mask_quality(pred, is_grid, min_area=cfg.min_mask_area, stability_thresh=cfg.grid_stability)
    counts = {"area": int((~big).sum()), "stability": int((big & ~keep).sum())}
    dedup: dict[str, Any] = {
        "dedup_iou": cfg.dedup_iou,
        "dedup_containment": cfg.dedup_containment,
        "dedup_class_aware": cfg.dedup_class_aware,
    }
    before = int(keep.sum())
    if not tiers:
        keep = remove_duplicates(pred, keep, is_grid, nms_iou=cfg.grid_nms_iou, **dedup)
        counts["duplicates"] = before - int(keep.sum())
    else:
        keep = remove_duplicates(pred, keep, is_grid, nms_iou=cfg.grid_nms_iou)
        nms_kept = int(keep.sum())
        keep = _across_sources(
            torch.from_numpy(pred.low_res_logits[:, 0]) > 0, np.asarray(tiers), keep, cfg.source_dedup_iou
        )
        counts["sources"] = nms_kept - int(keep.sum())
        across = int(keep.sum())
        keep = remove_duplicates(pred, keep, np.zeros_like(is_grid), **dedup)
        counts["duplicates"] = before - nms_kept + across - int(keep.sum())
    kept = np.nonzero(keep)[0]
    if len(kept) or not len(types):
        return kept, None
    return kept, filtered_warning(len(types), counts, cfg)


#: The start of the row warning of an image whose every mask a filter removed.
FILTERED_WARNING = "no masks kept"


def filtered_warning(n: int, counts: dict[str, int], cfg: SelectConfig) -> str:
    """The row warning of an image whose ``n`` masks were all removed, ``counts`` per filter."""
    why = []
    if counts.get("area"):
        why.append(f"{counts['area']} smaller than --min-mask-area {cfg.min_mask_area}")
    if counts.get("stability"):
        why.append(
            f"{counts['stability']} grid masks empty or less stable than --grid-stability {cfg.grid_stability:g} "
            "(lower it to keep more)"
        )
    if counts.get("duplicates"):
        why.append(f"{counts['duplicates']} duplicates (--grid-nms-iou, --dedup-iou, --dedup-containment)")
    if counts.get("sources"):
        why.append(f"{counts['sources']} repeating an earlier source's mask (--source-dedup-iou)")
    return f"{FILTERED_WARNING}: all {n} masks filtered out ({'; '.join(why)})"


def _across_sources(masks: torch.Tensor, tiers: np.ndarray, keep: np.ndarray, iou_threshold: float) -> np.ndarray:
    """``A+B`` dedup: part by part, drop a mask whose IoU with a kept mask of an earlier part
    exceeds ``iou_threshold`` (class-agnostic; masks of one part never suppress each other)."""
    out = keep.copy()
    for t in sorted(set(tiers.tolist()))[1:]:
        cur, prev = np.nonzero(out & (tiers == t))[0], np.nonzero(out & (tiers < t))[0]
        if len(cur) == 0 or len(prev) == 0:
            continue
        inter, _, union = mask_overlaps(masks[cur], masks[prev])
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))
        out[cur[(iou > iou_threshold).any(dim=1).numpy()]] = False
    return out
