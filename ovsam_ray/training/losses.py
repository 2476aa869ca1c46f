"""Training losses of OV-SAM (DESIGN §5), free functions over tensors.

CLIP2SAM: cross-entropy over the classes plus background (class weight 1, background 0.1, a
weighted mean) x2; mask BCE x5 and dice x5 on points chosen by uncertainty (Mask2Former's
scheme: 12,544 points, oversample 3, importance 0.75; sampled with ``grid_sample``).
SAM2CLIP: per-pixel MSE on the image embedding. An empty target gives a zero loss that still
has a gradient path (``x.sum() * 0``), so DDP sees every parameter on every step.

Point coordinates are (N, P, 2) XY in [0, 1] over the whole (padded) map.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F


def zero_loss(*tensors: torch.Tensor) -> torch.Tensor:
    """A zero scalar connected to the graph of ``tensors``."""
    return cast(torch.Tensor, sum(t.sum() * 0 for t in tensors))


def class_logits(
    embeddings: torch.Tensor, text_embeddings: torch.Tensor, log_scale: torch.Tensor | float
) -> torch.Tensor:
    """(N, D) region embeddings vs (C, S, D) unit-norm text embeddings -> (N, C + 1) logits:
    exp(log_scale) * max over synonyms of the cosine, plus a background column of 0. The same
    as ``model.functional.classify_embeddings`` but differentiable in ``log_scale`` too."""
    n = embeddings.shape[0]
    if n == 0:
        return embeddings.new_zeros((0, text_embeddings.shape[0] + 1))
    normed = F.normalize(embeddings.float(), dim=-1)
    sims = torch.einsum("nd,csd->ncs", normed, text_embeddings.float()).amax(dim=-1)
    scale = torch.as_tensor(log_scale, dtype=sims.dtype, device=sims.device).exp()
    logits = scale * sims
    return torch.cat([logits, logits.new_zeros((n, 1))], dim=1)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, *, background_weight: float = 0.1) -> torch.Tensor:
    """Weighted-mean cross-entropy. logits: (N, C + 1) with background last; labels: (N,) in
    [0, C] (C = background). Class weights are 1 for the classes and ``background_weight`` for
    background; the mean divides by the summed weights of the targets (mmdet's avg_factor)."""
    if logits.shape[0] == 0:
        return zero_loss(logits)
    weight = logits.new_ones(logits.shape[1])
    weight[-1] = background_weight
    loss = F.cross_entropy(logits.float(), labels, weight=weight.float(), reduction="sum")
    return loss / weight[labels].sum().clamp(min=1e-12)


def point_sample(inputs: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear values of (N, C, H, W) ``inputs`` at (N, P, 2) XY ``coords`` in [0, 1]
    (align_corners=False, zeros outside) -> (N, C, P). mmcv's ``point_sample``."""
    grid = 2.0 * coords[:, :, None, :] - 1.0
    return F.grid_sample(inputs, grid.to(inputs.dtype), mode="bilinear", align_corners=False)[..., 0]


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source).to(device)


def uncertain_point_coords(
    mask_logits: torch.Tensor,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Points where (N, 1, H, W) class-agnostic ``mask_logits`` are most uncertain (|logit|
    smallest) among ``num_points * oversample_ratio`` random ones, ``importance_sample_ratio`` of
    them, the rest uniform random -> (N, num_points, 2) XY in [0, 1]. No gradient."""
    n = mask_logits.shape[0]
    device = mask_logits.device
    num_sampled = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    if n == 0:
        return torch.zeros((0, num_points, 2), device=device)
    with torch.no_grad():
        coords = _rand((n, num_sampled, 2), generator, device)
        uncertainty = -point_sample(mask_logits.float(), coords)[:, 0].abs()  # (N, num_sampled)
        idx = uncertainty.topk(num_uncertain, dim=1).indices
        picked = torch.gather(coords, 1, idx[:, :, None].expand(-1, -1, 2))
        if num_random > 0:
            picked = torch.cat([picked, _rand((n, num_random, 2), generator, device)], dim=1)
    return picked


def mask_bce_loss(point_logits: torch.Tensor, point_targets: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over (N, P) sampled logits and 0/1 targets."""
    if point_logits.numel() == 0:
        return zero_loss(point_logits)
    return F.binary_cross_entropy_with_logits(point_logits.float(), point_targets.float(), reduction="mean")


def dice_loss(point_logits: torch.Tensor, point_targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Naive dice (mmdet ``DiceLoss(naive_dice=True, eps=1)``), mean over masks:
    1 - (2 sum(p t) + eps) / (sum(p) + sum(t) + eps) with p = sigmoid(logits)."""
    if point_logits.shape[0] == 0:
        return zero_loss(point_logits)
    p = point_logits.float().sigmoid().flatten(1)
    t = point_targets.float().flatten(1)
    dice = (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)
    return (1 - dice).mean()


def point_sample_indexed(maps: torch.Tensor, index: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """``point_sample(maps[index], coords)`` without materialising ``maps[index]``: (M, C, H, W)
    maps (any dtype), (N,) indices into them, (N, P, 2) coords -> (N, C, P) float."""
    n, p = coords.shape[:2]
    out = coords.new_zeros((n, maps.shape[1], p), dtype=torch.float32)
    for m in index.unique().tolist():
        sel = torch.nonzero(index == m).flatten()
        values = point_sample(maps[m : m + 1].float(), coords[sel].reshape(1, -1, 2).float())
        out[sel] = values.reshape(maps.shape[1], len(sel), p).transpose(0, 1)
    return out


def sampled_mask_losses(
    mask_logits: torch.Tensor,
    target_masks: torch.Tensor,
    target_index: torch.Tensor | None = None,
    *,
    num_points: int = 12544,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(BCE, dice) of (N, 1, h, w) low-res logits against 0/1 targets sampled at uncertain points.

    target_masks: (M, 1, H, W) masks (any resolution covering the same padded frame, any dtype);
    target_index: (N,) the target of each prediction (default: M == N, one each).
    """
    if mask_logits.shape[0] == 0:
        zero = zero_loss(mask_logits)
        return zero, zero.clone()
    if target_index is None:
        target_index = torch.arange(mask_logits.shape[0], device=mask_logits.device)
    coords = uncertain_point_coords(
        mask_logits, num_points, oversample_ratio, importance_sample_ratio, generator=generator
    )
    point_logits = point_sample(mask_logits.float(), coords)[:, 0]
    point_targets = point_sample_indexed(target_masks, target_index, coords)[:, 0]
    return mask_bce_loss(point_logits, point_targets), dice_loss(point_logits, point_targets)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-pixel MSE between (B, C, h, w) student and teacher image embeddings."""
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} embeddings differ")
    if student.numel() == 0:
        return zero_loss(student)
    return F.mse_loss(student.float(), teacher.float())
