"""The OV-SAM model: CLIP backbone + SAM2CLIP adapter + SAM prompt encoder + mask decoder +
CLIP2SAM recognizer, composed (DESIGN §2).

The expensive part (``embed``: CLIP trunk, adapter, FPN) runs once per image; the cheap part
(``decode``: prompts -> masks, region and CLIP embeddings) runs for any number of prompts of
many images in one call. Classification over a vocabulary is ``OpenVocabClassifier``'s job.
All coordinates here are in model-input pixels (resized, before padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything.modeling.prompt_encoder import PromptEncoder
from torch import nn

from ovsam_ray.model import functional
from ovsam_ray.model.clip2sam_recognizer import CLIP2SAMRecognizer
from ovsam_ray.model.clip_backbone import CLIPBackbone
from ovsam_ray.model.functional import mask_boxes_from_low_res
from ovsam_ray.model.mask_decoder import MaskDecoder
from ovsam_ray.model.sam2clip_adapter import SAM2CLIPAdapter


@dataclass
class ImageFeatures:
    """Per-image features of a batch of B images."""

    clip_feats: list[torch.Tensor]  # 4 CLIP stages (B, C_i, S/s_i, S/s_i)
    image_embeddings: torch.Tensor  # (B, C, S/16, S/16)
    fpn_feats: list[torch.Tensor]  # 4 FPN levels (B, F, S/s_i, S/s_i)


@dataclass
class PromptBatch:
    """N prompts over the images of a batch, in input pixels.

    boxes: (N, 4) XYXY (rows of point prompts are ignored); points: (N, 2) XY (rows of box
    prompts are ignored); is_point: (N,) bool; image_index: (N,) long; clip_boxes: (N, 4) box
    for the CLIP branch — a NaN row means "use the mask-derived box".
    """

    boxes: torch.Tensor
    points: torch.Tensor
    is_point: torch.Tensor
    image_index: torch.Tensor
    clip_boxes: torch.Tensor

    def __len__(self) -> int:
        return int(self.image_index.shape[0])

    @staticmethod
    def fields() -> tuple[str, ...]:
        return ("boxes", "points", "is_point", "image_index", "clip_boxes")

    def to(self, device: torch.device | str) -> PromptBatch:
        return PromptBatch(*(getattr(self, f).to(device) for f in self.fields()))


@dataclass
class DecodeOutput:
    """Per prompt: low-res logits (N, 1, S/4, S/4); region embeddings (N, D) from CLIP2SAM;
    CLIP embeddings (N, D) from the CLIP image head; clip_valid (N,) whether the mask has any
    positive logit on the CLIP grid (both None when decoded without the CLIP branch); roi_boxes
    (N, 4) the recognizer's RoIs (input pixels: the mask-derived boxes unless given)."""

    low_res_logits: torch.Tensor
    region_embeddings: torch.Tensor
    clip_embeddings: torch.Tensor | None
    clip_valid: torch.Tensor | None
    roi_boxes: torch.Tensor


class OVSAM(nn.Module):
    # A pixel belongs to the mask where its logit is above this (SAM's ``Sam.mask_threshold``).
    mask_threshold: float = 0.0

    def __init__(
        self,
        *,
        backbone: CLIPBackbone,
        adapter: SAM2CLIPAdapter,
        prompt_encoder: PromptEncoder,
        decoder: MaskDecoder,
        recognizer: CLIP2SAMRecognizer,
        image_size: int,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.adapter = adapter
        self.prompt_encoder = prompt_encoder
        self.decoder = decoder
        self.recognizer = recognizer
        self.image_size = image_size

    @property
    def embed_dim(self) -> int:
        return self.recognizer.roi_conv.out_channels

    def lock_for_distillation(self) -> None:
        """SAM2CLIP stage: only the adapter trains."""
        self.requires_grad_(False)
        self.adapter.requires_grad_(True)

    def lock_for_cotraining(self) -> None:
        """CLIP2SAM stage: FPN, RoI conv, label token/MLP and the mask decoder train; CLIP,
        adapter and prompt encoder are frozen."""
        self.requires_grad_(False)
        self.decoder.requires_grad_(True)
        self.recognizer.requires_grad_(True)

    def embed(self, images: torch.Tensor) -> ImageFeatures:
        """images: (B, 3, S, S) normalised and padded -> ImageFeatures."""
        clip_feats = self.backbone(images)
        if images.shape[0] == 0:  # SAM's attention blocks cannot reshape an empty batch
            grid = self.image_size // 16
            image_embeddings = images.new_zeros((0, self.prompt_encoder.embed_dim, grid, grid))
        else:
            image_embeddings = self.adapter(clip_feats)
        return ImageFeatures(
            clip_feats=clip_feats,
            image_embeddings=image_embeddings,
            fpn_feats=self.recognizer.fpn(clip_feats),
        )

    def encode_prompts(self, prompts: PromptBatch) -> torch.Tensor:
        """(N, 2, C) sparse tokens: two box corners, or one positive point + SAM's pad token."""
        pe = self.prompt_encoder
        n = len(prompts)
        sparse = pe.no_mask_embed.weight.new_zeros((n, 2, pe.embed_dim))
        is_point = prompts.is_point
        # Under autocast the encoder's outputs come back bf16; index_put_ needs matching dtypes.
        if (~is_point).any():
            sparse[~is_point] = pe._embed_boxes(prompts.boxes[~is_point].float()).to(sparse.dtype)
        if is_point.any():
            pts = prompts.points[is_point].float()[:, None, :]
            labels = torch.ones(pts.shape[:2], device=pts.device)
            sparse[is_point] = pe._embed_points(pts, labels, pad=True).to(sparse.dtype)
        return sparse

    def decode(
        self,
        features: ImageFeatures,
        prompts: PromptBatch,
        *,
        roi_boxes: torch.Tensor | None = None,
        mask_roi: torch.Tensor | None = None,
        clip_branch: bool = True,
    ) -> DecodeOutput:
        """Masks, region embeddings and CLIP embeddings for N prompts.

        Inference leaves the keywords alone. Training passes ``roi_boxes`` (N, 4): the RoIs of the
        recognizer (the ground-truth boxes, as the reference trains) instead of the mask-derived
        boxes; ``mask_roi`` (N,) bool: prompts whose RoI is nevertheless their predicted mask's
        box where it overlaps ``roi_boxes`` (``functional.predicted_rois``); ``clip_branch=False``
        skips the CLIP image head, which training does not use.
        """
        pe = self.prompt_encoder
        sparse = self.encode_prompts(prompts)
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
        image_pe = pe.get_dense_pe()
        low_res, label_embed = self.decoder(
            features.image_embeddings, image_pe, sparse.to(features.image_embeddings.dtype), dense, prompts.image_index
        )
        mask_boxes = mask_boxes_from_low_res(low_res)
        if roi_boxes is None:
            rois = mask_boxes
        else:
            rois = roi_boxes if mask_roi is None else functional.predicted_rois(low_res, roi_boxes, mask_roi)
            rois = rois.to(features.fpn_feats[0].dtype)
        region = self.recognizer.region_embeddings(features.fpn_feats, rois, prompts.image_index)
        # The released model multiplies the label-token path by zero; keep it so outputs match.
        region = region + 0 * label_embed
        if not clip_branch:
            return DecodeOutput(low_res, region, None, None, rois)

        clip_boxes = torch.where(torch.isnan(prompts.clip_boxes), mask_boxes, prompts.clip_boxes)
        clip_embed = self.backbone.embed_regions(features.clip_feats, clip_boxes, prompts.image_index, low_res)
        grid = features.clip_feats[-1].shape[-2:]
        on_grid = F.interpolate(low_res.float(), grid, mode="bilinear", align_corners=False)
        clip_valid = (on_grid > 0).flatten(1).any(dim=1)
        return DecodeOutput(
            low_res_logits=low_res,
            region_embeddings=region,
            clip_embeddings=clip_embed,
            clip_valid=clip_valid,
            roi_boxes=rois,
        )

    def forward(self, images: torch.Tensor, prompts: PromptBatch) -> DecodeOutput:
        return self.decode(self.embed(images), prompts)
