"""Pure tensor functions of OV-SAM: pre/post-processing, coordinate maps, box-from-mask,
RoI level mapping, classification and open-vocabulary logit fusion.

Coordinate conventions: boxes are (N, 4) XYXY, points (N, 2) XY, in pixels of the image they
refer to ("original" = the decoded image, "input" = the resized model input before padding).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# SAM's normalisation, 0-255 scale (DESIGN §2).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def resized_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(h, w) after resizing so the longest side is ``long_side`` (SAM's ResizeLongestSide)."""
    if height < 1 or width < 1:
        raise ValueError(f"image has no pixels ({height}x{width})")
    scale = long_side / max(height, width)
    # SAM's rule rounds a side shorter than long_side / (2 * aspect) to 0; keep at least 1 pixel.
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def resize_image(image: torch.Tensor, long_side: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (h, w, 3) uint8 with the longest side ``long_side``: bilinear with
    antialiasing, align_corners=False (SAM's ``ResizeLongestSide.apply_image_torch``), rounded
    back to uint8 as image pipelines do — so resizing on a CPU worker and on the model device agree."""
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {tuple(image.shape)}")
    height, width = int(image.shape[0]), int(image.shape[1])
    h, w = resized_shape(height, width, long_side)
    if (h, w) == (height, width):
        return image
    x = image.permute(2, 0, 1).unsqueeze(0).float()
    x = F.interpolate(x, (h, w), mode="bilinear", align_corners=False, antialias=True)
    return x[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)


def normalize_pad(image: torch.Tensor, image_size: int) -> torch.Tensor:
    """(h, w, 3) uint8, already resized -> (3, S, S) float32 normalised with SAM's mean/std and
    zero-padded bottom/right."""
    h, w = int(image.shape[0]), int(image.shape[1])
    if max(h, w) > image_size:
        raise ValueError(f"image {h}x{w} is larger than the model input {image_size}; resize it first")
    x = image.permute(2, 0, 1).float()
    mean = torch.tensor(PIXEL_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=x.device).view(3, 1, 1)
    return F.pad((x - mean) / std, (0, image_size - w, 0, image_size - h))


def preprocess_image(image: torch.Tensor, image_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize, normalise and zero-pad one image for the model.

    image: (H, W, 3) uint8 RGB (any device). Returns ((3, S, S) float32, (h, w) the unpadded
    input size); ``resize_image`` then ``normalize_pad``.
    """
    resized = resize_image(image, image_size)
    return normalize_pad(resized, image_size), (int(resized.shape[0]), int(resized.shape[1]))


def scale_coords(coords: torch.Tensor, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> torch.Tensor:
    """Map (..., 2k) XY coordinates (points or XYXY boxes) from one image size to another."""
    sx = to_hw[1] / from_hw[1]
    sy = to_hw[0] / from_hw[0]
    scale = coords.new_tensor([sx, sy]).repeat(coords.shape[-1] // 2)
    return coords * scale


def clip_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Clamp (N, 4) XYXY boxes to the image [0, W] x [0, H] and order their corners."""
    x0 = torch.minimum(boxes[:, 0], boxes[:, 2]).clamp(0, width)
    x1 = torch.maximum(boxes[:, 0], boxes[:, 2]).clamp(0, width)
    y0 = torch.minimum(boxes[:, 1], boxes[:, 3]).clamp(0, height)
    y1 = torch.maximum(boxes[:, 1], boxes[:, 3]).clamp(0, height)
    return torch.stack([x0, y0, x1, y1], dim=1)


def clip_points(points: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Clamp (N, 2) XY points into the image."""
    return torch.stack([points[:, 0].clamp(0, width), points[:, 1].clamp(0, height)], dim=1)


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool -> (N, 4) float XYXY: [x_first, y_first, x_last + 1, y_last + 1] of the
    set pixels; an empty mask gives the all-zero box (mmdet's ``mask2bbox``)."""
    n, height, width = masks.shape
    if n == 0:
        return masks.new_zeros((0, 4), dtype=torch.float32)
    cols = masks.any(dim=1)  # (N, W)
    rows = masks.any(dim=2)  # (N, H)
    xs = torch.arange(width, device=masks.device)
    ys = torch.arange(height, device=masks.device)
    big_x = torch.full_like(xs, width)
    big_y = torch.full_like(ys, height)
    x0 = torch.where(cols, xs, big_x).amin(dim=1)
    x1 = torch.where(cols, xs, -1).amax(dim=1) + 1
    y0 = torch.where(rows, ys, big_y).amin(dim=1)
    y1 = torch.where(rows, ys, -1).amax(dim=1) + 1
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    empty = ~cols.any(dim=1)
    return torch.where(empty[:, None], torch.zeros_like(boxes), boxes)


def roi_levels(boxes: torch.Tensor, *, finest_scale: float = 56.0, num_levels: int = 4) -> torch.Tensor:
    """FPN level per (N, 4) box: clamp(floor(log2(sqrt(w*h) / finest_scale + 1e-6)), 0, L-1)."""
    scale = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return levels.clamp(min=0, max=num_levels - 1).long()


def upscale_mask_logits(
    low_res: torch.Tensor, image_size: int, input_hw: tuple[int, int], original_hw: tuple[int, int]
) -> torch.Tensor:
    """(N, 1, h, w) low-res logits -> (N, 1, H, W) logits at the original image size:
    bilinear to the padded input, crop the unpadded part, bilinear to the original size."""
    if low_res.shape[0] == 0:
        return low_res.new_zeros((0, 1, *original_hw))
    x = F.interpolate(low_res, (image_size, image_size), mode="bilinear", align_corners=False)
    x = x[..., : input_hw[0], : input_hw[1]]
    return F.interpolate(x, original_hw, mode="bilinear", align_corners=False)


def mask_boxes_from_low_res(low_res: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """RoI boxes in input pixels from (N, 1, h, w) low-res logits: the box of the pixels with
    sigmoid > threshold, times the low-res stride (4)."""
    stride = 4.0
    return boxes_from_masks(low_res[:, 0].sigmoid() > threshold) * stride


def predicted_rois(low_res: torch.Tensor, boxes: torch.Tensor, use: torch.Tensor, min_iou: float = 0.1) -> torch.Tensor:
    """(N, 4) RoIs: the box of each predicted mask (``mask_boxes_from_low_res``, as at inference)
    where ``use`` (N,) and it overlaps ``boxes`` (N, 4) by IoU > ``min_iou``, else ``boxes``."""
    from torchvision.ops import box_iou

    pred = mask_boxes_from_low_res(low_res.detach().float()).to(boxes)
    ok = use & (box_iou(pred, boxes).diagonal() > min_iou)  # an empty box's NaN IoU is not > min_iou
    return torch.where(ok[:, None], pred, boxes)


def classify_embeddings(embeddings: torch.Tensor, text_embeddings: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Open-vocabulary logits with a background column.

    embeddings: (N, D) region or CLIP embeddings (any norm); text_embeddings: (C, S, D) unit
    norm, synonyms padded. Returns (N, C + 1): exp(logit_scale) * max over synonyms of the
    cosine similarity, then a background logit of exactly 0 (its text embedding is zero).
    """
    n = embeddings.shape[0]
    num_classes = text_embeddings.shape[0]
    if n == 0:
        return embeddings.new_zeros((0, num_classes + 1))
    normed = F.normalize(embeddings.float(), dim=-1)
    sims = torch.einsum("nd,csd->ncs", normed, text_embeddings.float()).amax(dim=-1)
    logits = math.exp(logit_scale) * sims
    return torch.cat([logits, logits.new_zeros((n, 1))], dim=1)


def fuse_open_vocab_logits(
    head_logits: torch.Tensor,
    clip_logits: torch.Tensor,
    clip_valid: torch.Tensor,
    seen: torch.Tensor,
    excluded: torch.Tensor,
    *,
    alpha: float = 0.1,
    beta: float = 0.9,
) -> torch.Tensor:
    """Geometric fusion of the head and CLIP class probabilities (DESIGN §2.7).

    head_logits, clip_logits: (N, C + 1), background last; clip_valid: (N,) bool — False zeroes
    a and b (CLIP ignored); seen / excluded: (C,) bool. Seen classes and background use
    log(p^(1-a) q^a), unseen classes log(p^(1-b) q^b); excluded classes get -1000.
    """
    # (1 - a) log p + a log q == log(p^(1-a) q^a), computed in log space so that a probability
    # below float32's range (a logit gap > ~100, common with scale 100) stays finite, not -inf.
    log_p = head_logits.float().log_softmax(dim=-1)
    log_q = clip_logits.float().log_softmax(dim=-1)
    device = log_p.device
    seen_col = torch.cat([seen.to(device, torch.bool), seen.new_ones(1, dtype=torch.bool).to(device)])
    valid = clip_valid.to(device, torch.float32)[:, None]
    a = alpha * valid
    b = beta * valid
    fused_seen = (1 - a) * log_p + a * log_q
    fused_unseen = (1 - b) * log_p + b * log_q
    fused = torch.where(seen_col[None, :], fused_seen, fused_unseen)
    excluded_col = torch.cat([excluded.to(device, torch.bool), excluded.new_zeros(1, dtype=torch.bool).to(device)])
    return fused.masked_fill(excluded_col[None, :], -1000.0)


def labels_from_logits(logits: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, C + 1) logits -> (labels (N,), top-k ids (N, k'), top-k probabilities (N, k')).

    Probabilities are softmax over all C + 1 columns; the background column is never predicted.
    """
    probs = logits.float().softmax(dim=-1)[:, :-1]
    k = min(k, probs.shape[1])
    if probs.shape[0] == 0:
        empty = probs.new_zeros((0, k))
        return probs.new_zeros((0,), dtype=torch.long), empty.long(), empty
    scores, ids = probs.topk(k, dim=-1)
    return ids[:, 0], ids, scores


def mask_pool(features: torch.Tensor, masks: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
    """Average (B, C, h, w) features inside (N, 1, h', w') mask logits > 0 of image
    ``image_index`` (N,) -> (N, C). Masks are resized bilinearly to (h, w) first."""
    if masks.shape[0] == 0:
        return features.new_zeros((0, features.shape[1]))
    m = F.interpolate(masks.float(), features.shape[-2:], mode="bilinear", align_corners=False)
    m = (m > 0).to(features.dtype)[:, 0]
    m = m / (m.sum(dim=(-1, -2), keepdim=True) + 1e-8)
    return torch.einsum("nchw,nhw->nc", features[image_index], m)
