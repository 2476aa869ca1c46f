"""Training-time image transforms: large-scale jitter (random resize + crop + pad) and the plain
resize-and-pad of inference, both on uint8 images with their instance masks.

LSJ as the reference's COCO pipeline: random horizontal flip; resize so the long side is
``size * r`` with r ~ U(ratio_range); random crop of at most ``size`` x ``size``; zero-pad
bottom/right to ``size`` x ``size``. Both transforms resize as the reference's mmcv ``Resize``
(``RESIZE_FILTER``): cv2's bilinear (``INTER_LINEAR``: half-pixel centres, no antialiasing, also
on strong downscales such as LVIS's ratio 0.1) on float32 pixels; masks nearest. Normalisation
happens on the training worker (``training.batching``), so rows stay uint8: the resized pixels are
rounded, at most half a grey level from the reference's float32 values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ovsam_ray.model.functional import resized_shape


@dataclass
class Transformed:
    """image: (S, S, 3) uint8, zero-padded; masks: (N, S, S) bool; input_hw: the unpadded
    (h, w); keep: (N,) masks with at least ``min_mask_area`` pixels; scale: resize factor."""

    image: np.ndarray
    masks: np.ndarray
    input_hw: tuple[int, int]
    keep: np.ndarray
    scale: float


#: What ``--print-config`` states about the training resize (``resize_image``).
RESIZE_FILTER = (
    "bilinear without antialiasing on float32 pixels (cv2 INTER_LINEAR, as mmcv Resize), rounded to uint8; "
    "masks nearest"
)


def resize_image(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8: cv2's ``INTER_LINEAR`` on float32 pixels (half-pixel
    centres, edge samples clamped, no antialiasing: each output pixel blends its 2x2 nearest
    source pixels however far it downscales), as the reference's mmcv ``Resize``, then rounded."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, hw, mode="bilinear", align_corners=False, antialias=False)
    return x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def _resize(image: np.ndarray, masks: np.ndarray, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    h, w = hw
    if (h, w) == image.shape[:2]:
        return image, masks
    image = resize_image(image, (h, w))
    if masks.shape[0]:
        m = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.uint8))[None]
        masks = F.interpolate(m, (h, w), mode="nearest")[0].numpy().astype(bool)
    else:
        masks = np.zeros((0, h, w), bool)
    return image, masks


def _pad(image: np.ndarray, masks: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    out = np.zeros((size, size, 3), np.uint8)
    out[:h, :w] = image
    out_masks = np.zeros((masks.shape[0], size, size), bool)
    out_masks[:, :h, :w] = masks
    return out, out_masks


def large_scale_jitter(
    image: np.ndarray,
    masks: np.ndarray,
    rng: np.random.Generator,
    *,
    size: int,
    ratio_range: tuple[float, float] = (0.9, 2.0),
    flip_prob: float = 0.5,
    min_mask_area: int = 32,
) -> Transformed:
    """image: (H, W, 3) uint8; masks: (N, H, W) bool -> the jittered, cropped, padded sample."""
    masks = np.asarray(masks, bool)
    if masks.shape[1:] != image.shape[:2]:
        raise ValueError(f"masks {masks.shape} do not match the image {image.shape[:2]}")
    if flip_prob > 0 and rng.random() < flip_prob:
        image, masks = image[:, ::-1], masks[:, :, ::-1]
    ratio = float(rng.uniform(*ratio_range))
    height, width = image.shape[:2]
    hw = resized_shape(height, width, max(1, round(size * ratio)))
    hw = (max(1, hw[0]), max(1, hw[1]))
    image, masks = _resize(image, masks, hw)
    y0 = int(rng.integers(0, hw[0] - size + 1)) if hw[0] > size else 0
    x0 = int(rng.integers(0, hw[1] - size + 1)) if hw[1] > size else 0
    image = image[y0 : y0 + size, x0 : x0 + size]
    masks = masks[:, y0 : y0 + size, x0 : x0 + size]
    input_hw = (int(image.shape[0]), int(image.shape[1]))
    image, masks = _pad(image, masks, size)
    keep = masks.sum(axis=(1, 2)) >= min_mask_area
    return Transformed(image, masks, input_hw, keep, hw[0] / height)


def resize_and_pad(image: np.ndarray, masks: np.ndarray | None = None, *, size: int) -> Transformed:
    """Inference geometry: long side to ``size``, zero-pad to square (the reference's distillation
    pipeline: ``ResizeSAM``, an mmdet ``Resize``, so the same filter as LSJ)."""
    masks = np.zeros((0, *image.shape[:2]), bool) if masks is None else np.asarray(masks, bool)
    hw = resized_shape(image.shape[0], image.shape[1], size)
    resized, resized_masks = _resize(image, masks, hw)
    padded, padded_masks = _pad(resized, resized_masks, size)
    keep = np.ones(padded_masks.shape[0], bool)
    return Transformed(padded, padded_masks, hw, keep, hw[0] / image.shape[0])
