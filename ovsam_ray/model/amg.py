"""Segment-everything and de-duplication helpers (pure tensor functions, like SAM's ``utils/amg.py``).

Masks here are (N, H, W) bool or logits; scores (N,); boxes (N, 4) XYXY.
"""

from __future__ import annotations

import numpy as np
import torch
from segment_anything.utils.amg import build_point_grid, calculate_stability_score


def grid_points(n_per_side: int, height: int, width: int) -> np.ndarray:
    """(n*n, 2) XY points at the centres of an n x n grid over a ``width`` x ``height`` image."""
    if n_per_side < 1:
        raise ValueError(f"n_per_side={n_per_side}: need >= 1")
    return (build_point_grid(n_per_side) * np.array([width, height], np.float32)).astype(np.float32)


def stability_scores(mask_logits: torch.Tensor, offset: float = 1.0) -> torch.Tensor:
    """SAM's stability score of (N, H, W) logits: IoU of the masks thresholded at +offset and -offset."""
    if mask_logits.shape[0] == 0:
        return mask_logits.new_zeros((0,))
    return calculate_stability_score(mask_logits.float(), 0.0, offset)


def mask_overlaps(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairwise overlaps of bool masks a (Na, H, W) and b (Nb, H, W): intersections (Na, Nb),
    the areas of a (Na,) and unions (Na, Nb), in pixels (float)."""
    fa, fb = a.reshape(len(a), -1).float(), b.reshape(len(b), -1).float()
    inter = fa @ fb.T
    area_a, area_b = fa.sum(dim=1), fb.sum(dim=1)
    return inter, area_a, area_a[:, None] + area_b[None, :] - inter


def mask_nms(
    masks: torch.Tensor,
    scores: torch.Tensor,
    *,
    iou_threshold: float = 0.7,
    containment_threshold: float | None = None,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy mask-level NMS; returns the kept indices, highest score first.

    A mask is dropped when its IoU with a kept mask exceeds ``iou_threshold``, or (if given) when
    more than ``containment_threshold`` of its area lies inside a kept mask. With ``labels`` the
    suppression is class-aware (only masks with the same label suppress each other).
    """
    n = masks.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=masks.device)
    inter, area, union = mask_overlaps(masks, masks)
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))
    suppress = iou > iou_threshold
    if containment_threshold is not None:
        inside = inter / area[:, None].clamp(min=1)  # [i, j]: fraction of mask i inside mask j
        suppress |= inside > containment_threshold
    if labels is not None:
        suppress &= labels[:, None] == labels[None, :]
    order = torch.argsort(scores, descending=True, stable=True)
    removed = torch.zeros(n, dtype=torch.bool, device=masks.device)
    keep = []
    for i in order.tolist():
        if removed[i]:
            continue
        keep.append(i)
        removed |= suppress[:, i]
    return torch.tensor(keep, dtype=torch.long, device=masks.device)
