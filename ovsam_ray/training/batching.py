"""Training rows <-> tensors.

A Ray Data row is ``{"item": int, "dataset": int, "key": str, "sample": bytes}``: ``sample`` is
an ``.npz`` (no pickle) of one prepared image, so rows of any shape stream through Ray Data as
plain binary columns. Co-training samples hold ``image`` (S, S, 3) uint8 zero-padded,
``input_hw``, ``masks`` (M, S*S/8) packed bits of the instances the prompts use, ``labels``
(M,), the prompts (``prompt_instance``, ``prompt_is_point``, ``prompt_boxes``,
``prompt_points``) and ``has_masks``; distillation samples hold ``image``, ``input_hw`` and
optionally ``teacher`` (C, h, w) float32 or float16 (``DistillConfig.teacher_feature_dtype``).
The collate functions normalise images on the worker.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ovsam_ray.model.functional import PIXEL_MEAN, PIXEL_STD
from ovsam_ray.model.ovsam import PromptBatch


def pack_sample(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    named: dict[str, Any] = {k: np.asarray(v) for k, v in arrays.items()}
    np.savez(buf, **named)
    return buf.getvalue()


def unpack_sample(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """(M, S, S) bool -> (M, ceil(S*S/8)) uint8."""
    masks = np.asarray(masks, bool)
    return np.packbits(masks.reshape(masks.shape[0], masks.shape[1] * masks.shape[2]), axis=1)


def unpack_masks(packed: np.ndarray, size: int) -> np.ndarray:
    """(M, ceil(S*S/8)) uint8 -> (M, S, S) bool."""
    return np.unpackbits(packed, axis=1, count=size * size).reshape(packed.shape[0], size, size).astype(bool)


def normalize_images(images: torch.Tensor, input_hw: torch.Tensor) -> torch.Tensor:
    """(B, S, S, 3) uint8, zero-padded outside (B, 2) input_hw -> (B, 3, S, S) float normalised
    with SAM's mean/std and zero padding (what ``preprocess_image`` gives)."""
    b, s = images.shape[0], images.shape[1]
    x = images.permute(0, 3, 1, 2).float()
    mean = torch.tensor(PIXEL_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    ys = torch.arange(s, device=x.device).view(1, s, 1)
    xs = torch.arange(s, device=x.device).view(1, 1, s)
    hw = input_hw.to(x.device)
    valid = (ys < hw[:, 0].view(b, 1, 1)) & (xs < hw[:, 1].view(b, 1, 1))
    return x * valid[:, None].to(x.dtype)


@dataclass
class CotrainBatch:
    """images (B, 3, S, S) normalised; prompts (N prompts); roi_boxes (N, 4) the GT box of each
    prompt's instance (the RoI of recognition in training); labels (N,); has_mask (N,);
    target_masks (M, 1, S, S) uint8 unique instance masks; target_index (N,) into them (-1: none)."""

    images: torch.Tensor
    prompts: PromptBatch
    roi_boxes: torch.Tensor
    labels: torch.Tensor
    has_mask: torch.Tensor
    target_masks: torch.Tensor
    target_index: torch.Tensor

    @property
    def num_images(self) -> int:
        return int(self.images.shape[0])


def collate_cotrain(samples: list[dict[str, np.ndarray]], device: torch.device | str = "cpu") -> CotrainBatch:
    """Decoded co-training samples -> one batch on ``device``."""
    size = int(samples[0]["image"].shape[0])
    images = torch.from_numpy(np.stack([s["image"] for s in samples])).to(device)
    input_hw = torch.from_numpy(np.stack([s["input_hw"] for s in samples]).astype(np.int64))
    boxes, points, is_point, index, labels, has_mask, target_index, masks = [], [], [], [], [], [], [], []
    offset = 0
    for i, s in enumerate(samples):
        inst = s["prompt_instance"].astype(np.int64)
        n = len(inst)
        boxes.append(s["prompt_boxes"].astype(np.float32).reshape(n, 4))
        points.append(s["prompt_points"].astype(np.float32).reshape(n, 2))
        is_point.append(s["prompt_is_point"].astype(bool))
        index.append(np.full(n, i, np.int64))
        labels.append(s["labels"].astype(np.int64)[inst])
        with_masks = bool(s["has_masks"])
        has_mask.append(np.full(n, with_masks))
        if with_masks:
            unpacked = unpack_masks(s["masks"], size)
            masks.append(unpacked)
            target_index.append(inst + offset)
            offset += unpacked.shape[0]
        else:
            target_index.append(np.full(n, -1, np.int64))
    cat = np.concatenate
    boxes_t = torch.from_numpy(cat(boxes))
    target_masks = torch.from_numpy(cat(masks)) if masks else torch.zeros((0, size, size), dtype=torch.bool)
    prompts = PromptBatch(
        boxes=boxes_t,
        points=torch.from_numpy(cat(points)),
        is_point=torch.from_numpy(cat(is_point)),
        image_index=torch.from_numpy(cat(index)),
        clip_boxes=boxes_t.clone(),
    ).to(device)
    return CotrainBatch(
        images=normalize_images(images, input_hw),
        prompts=prompts,
        roi_boxes=boxes_t.to(device),
        labels=torch.from_numpy(cat(labels)).to(device),
        has_mask=torch.from_numpy(cat(has_mask)).to(device),
        target_masks=target_masks.to(torch.uint8)[:, None].to(device),
        target_index=torch.from_numpy(cat(target_index)).to(device),
    )


@dataclass
class DistillBatch:
    """images (B, 3, S, S) normalised; teacher (B, C, h, w) precomputed features or None."""

    images: torch.Tensor
    teacher: torch.Tensor | None

    @property
    def num_images(self) -> int:
        return int(self.images.shape[0])


def collate_distill(samples: list[dict[str, Any]], device: torch.device | str = "cpu") -> DistillBatch:
    images = torch.from_numpy(np.stack([s["image"] for s in samples])).to(device)
    input_hw = torch.from_numpy(np.stack([s["input_hw"] for s in samples]).astype(np.int64))
    teacher = None
    if all("teacher" in s for s in samples):
        teacher = torch.from_numpy(np.stack([s["teacher"] for s in samples])).to(device).float()
    return DistillBatch(images=normalize_images(images, input_hw), teacher=teacher)
