"""SAM-predictor-shaped inference: embed a batch of images once, then decode any number of box
and point prompts per image, all images' prompts in one decoder call.

Inputs and outputs are in original-image pixels. Prompt order per image: boxes, then points.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from .classifier import OpenVocabClassifier
from .functional import (
    boxes_from_masks,
    clip_boxes,
    clip_points,
    labels_from_logits,
    normalize_pad,
    resize_image,
    scale_coords,
    upscale_mask_logits,
)
from .ovsam import OVSAM, DecodeOutput, ImageFeatures, PromptBatch


@dataclass
class ImagePrompts:
    """Prompts of one image, original pixels: boxes (B, 4) XYXY; points (P, 2) XY;
    point_boxes (P, 4) the CLIP-branch box of each point (a NaN row = use the mask's box)."""

    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))
    point_boxes: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.boxes) + len(self.points)


@dataclass
class EmbeddedImages:
    """What ``OVSAMPredictor.embed`` returns: model features plus each image's sizes."""

    features: ImageFeatures
    original_sizes: list[tuple[int, int]]  # (H, W)
    input_sizes: list[tuple[int, int]]  # (h, w) resized, unpadded


@dataclass
class ImagePrediction:
    """Per prompt (N = boxes + points) of one image.

    masks (N, H, W) bool at original size; mask_boxes (N, 4) XYXY original pixels;
    low_res_logits (N, 1, S/4, S/4); head/clip/fused logits (N, C + 1), background last;
    labels (N,) fused label; scores (N,) its probability; head_labels (N,) head-only label;
    topk_ids / topk_scores (N, k); region / clip embeddings (N, D); clip_valid (N,);
    is_point (N,) the prompt type.
    """

    masks: np.ndarray
    mask_boxes: np.ndarray
    low_res_logits: np.ndarray
    head_logits: np.ndarray
    clip_logits: np.ndarray
    fused_logits: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    head_labels: np.ndarray
    topk_ids: np.ndarray
    topk_scores: np.ndarray
    region_embeddings: np.ndarray
    clip_embeddings: np.ndarray
    clip_valid: np.ndarray
    is_point: np.ndarray


def _as_rgb_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(image))
    if t.ndim == 2:
        t = t[:, :, None].expand(-1, -1, 3)
    if t.ndim != 3:
        raise ValueError(f"expected an (H, W[, C]) image, got shape {tuple(t.shape)}")
    if t.shape[2] == 4:
        t = t[:, :, :3]
    elif t.shape[2] == 1:
        t = t.expand(-1, -1, 3)
    if t.shape[2] != 3:
        raise ValueError(f"expected 1, 3 or 4 channels, got {t.shape[2]}")
    return t


class OVSAMPredictor:
    """Runs an ``OVSAM`` model with an ``OpenVocabClassifier`` on numpy images.

    On CUDA the image and prompt passes run under bf16 autocast with channels_last CNN
    weights (``fast=True``, the default there); on CPU everything stays fp32.
    """

    def __init__(
        self,
        model: OVSAM,
        classifier: OpenVocabClassifier,
        *,
        device: str | torch.device = "cpu",
        topk: int = 5,
        fast: bool | None = None,
        prompt_chunk: int = 128,
        half_embeddings: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.classifier = classifier.to(self.device)
        self.topk = topk
        # Prompts per decoder call: bounds memory (each prompt holds its own copy of the image
        # embedding inside the two-way transformer).
        self.prompt_chunk = prompt_chunk
        # Classify from float16-rounded embeddings, so that stored float16 embeddings re-score
        # (``relabel``) to exactly the labels the job wrote.
        self.half_embeddings = half_embeddings
        self.fast = (self.device.type == "cuda") if fast is None else fast
        if self.fast:
            self.model.backbone.to(memory_format=torch.channels_last)

    def _autocast(self):
        if self.fast and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def embed(
        self, images: list[np.ndarray], original_sizes: list[tuple[int, int]] | None = None
    ) -> EmbeddedImages:
        """images: (H, W, 3) uint8 RGB (grayscale and RGBA are converted) -> features.

        With ``original_sizes`` the images are already resized (``resize_image``, e.g. on a CPU
        worker) and the sizes say which original (H, W) each came from.
        """
        size = self.model.image_size
        batch, input_sizes, sizes = [], [], []
        for i, image in enumerate(images):
            rgb = _as_rgb_tensor(image).to(self.device)
            resized = rgb if original_sizes is not None else resize_image(rgb, size)
            batch.append(normalize_pad(resized, size))
            input_sizes.append((int(resized.shape[0]), int(resized.shape[1])))
            own_size = (int(rgb.shape[0]), int(rgb.shape[1]))
            sizes.append(tuple(original_sizes[i]) if original_sizes is not None else own_size)
        x = torch.stack(batch) if batch else torch.zeros((0, 3, size, size), device=self.device)
        if self.fast:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            features = self.model.embed(x)
        return EmbeddedImages(features=features, original_sizes=sizes, input_sizes=input_sizes)

    def _prompt_batch(self, embedded: EmbeddedImages, prompts: list[ImagePrompts]) -> PromptBatch:
        boxes, points, is_point, index, clip_bx = [], [], [], [], []
        for i, (p, orig, inp) in enumerate(zip(prompts, embedded.original_sizes, embedded.input_sizes)):
            b = clip_boxes(torch.as_tensor(np.asarray(p.boxes, np.float32)).reshape(-1, 4), *orig)
            pt = clip_points(torch.as_tensor(np.asarray(p.points, np.float32)).reshape(-1, 2), *orig)
            pb = p.point_boxes
            pb = torch.full((len(pt), 4), float("nan")) if pb is None else torch.as_tensor(np.asarray(pb, np.float32))
            pb = pb.reshape(-1, 4)
            pb = torch.where(torch.isnan(pb), pb, clip_boxes(torch.nan_to_num(pb), *orig))
            b_in, pt_in, pb_in = scale_coords(b, orig, inp), scale_coords(pt, orig, inp), scale_coords(pb, orig, inp)
            boxes += [b_in, torch.zeros((len(pt), 4))]
            points += [torch.zeros((len(b), 2)), pt_in]
            clip_bx += [b_in, pb_in]
            is_point.append(torch.cat([torch.zeros(len(b), dtype=torch.bool), torch.ones(len(pt), dtype=torch.bool)]))
            index.append(torch.full((len(b) + len(pt),), i, dtype=torch.long))
        return PromptBatch(
            boxes=torch.cat(boxes) if boxes else torch.zeros((0, 4)),
            points=torch.cat(points) if points else torch.zeros((0, 2)),
            is_point=torch.cat(is_point) if is_point else torch.zeros(0, dtype=torch.bool),
            image_index=torch.cat(index) if index else torch.zeros(0, dtype=torch.long),
            clip_boxes=torch.cat(clip_bx) if clip_bx else torch.zeros((0, 4)),
        ).to(self.device)

    @torch.no_grad()
    def predict(self, embedded: EmbeddedImages, prompts: list[ImagePrompts]) -> list[ImagePrediction]:
        """Decode every image's prompts in one call; returns one ImagePrediction per image."""
        if len(prompts) != len(embedded.original_sizes):
            raise ValueError(f"got prompts for {len(prompts)} images, embedded {len(embedded.original_sizes)}")
        batch = self._prompt_batch(embedded, prompts)
        if len(batch) == 0:
            return [self._empty_prediction(hw) for hw in embedded.original_sizes]
        out = self._decode_chunked(embedded, batch)
        low_res = out.low_res_logits.float()
        if self.half_embeddings:
            out.region_embeddings = out.region_embeddings.half().float()
            out.clip_embeddings = out.clip_embeddings.half().float()
        cls = self.classifier(out.region_embeddings.float(), out.clip_embeddings.float(), out.clip_valid)
        labels, topk_ids, topk_scores = labels_from_logits(cls.fused_logits, self.topk)
        head_labels, _, _ = labels_from_logits(cls.head_logits, 1)
        results = []
        for i, (orig, inp) in enumerate(zip(embedded.original_sizes, embedded.input_sizes)):
            sel = torch.nonzero(batch.image_index == i).flatten()
            masks = upscale_mask_logits(low_res[sel], self.model.image_size, inp, orig)[:, 0] > 0
            results.append(
                ImagePrediction(
                    masks=masks.cpu().numpy(),
                    mask_boxes=boxes_from_masks(masks).cpu().numpy(),
                    low_res_logits=low_res[sel].cpu().numpy(),
                    head_logits=cls.head_logits[sel].cpu().numpy(),
                    clip_logits=cls.clip_logits[sel].cpu().numpy(),
                    fused_logits=cls.fused_logits[sel].cpu().numpy(),
                    labels=labels[sel].cpu().numpy(),
                    scores=topk_scores[sel, 0].cpu().numpy(),
                    head_labels=head_labels[sel].cpu().numpy(),
                    topk_ids=topk_ids[sel].cpu().numpy(),
                    topk_scores=topk_scores[sel].cpu().numpy(),
                    region_embeddings=out.region_embeddings[sel].float().cpu().numpy(),
                    clip_embeddings=out.clip_embeddings[sel].float().cpu().numpy(),
                    clip_valid=out.clip_valid[sel].cpu().numpy(),
                    is_point=batch.is_point[sel].cpu().numpy(),
                )
            )
        return results

    def _decode_chunked(self, embedded: EmbeddedImages, batch: PromptBatch) -> DecodeOutput:
        outputs = []
        for start in range(0, len(batch), self.prompt_chunk):
            part = PromptBatch(*(getattr(batch, f)[start : start + self.prompt_chunk] for f in PromptBatch.fields()))
            with self._autocast():
                outputs.append(self.model.decode(embedded.features, part))
        if len(outputs) == 1:
            return outputs[0]
        names = [f.name for f in dataclasses.fields(DecodeOutput)]
        return DecodeOutput(*(torch.cat([getattr(o, name) for o in outputs]) for name in names))

    def _empty_prediction(self, hw: tuple[int, int]) -> ImagePrediction:
        c1 = self.classifier.num_classes + 1
        d = self.model.embed_dim
        low = self.model.image_size // 4
        k = min(self.topk, self.classifier.num_classes)
        f = np.float32
        return ImagePrediction(
            masks=np.zeros((0, *hw), bool),
            mask_boxes=np.zeros((0, 4), f),
            low_res_logits=np.zeros((0, 1, low, low), f),
            head_logits=np.zeros((0, c1), f), clip_logits=np.zeros((0, c1), f), fused_logits=np.zeros((0, c1), f),
            labels=np.zeros(0, np.int64), scores=np.zeros(0, f), head_labels=np.zeros(0, np.int64),
            topk_ids=np.zeros((0, k), np.int64), topk_scores=np.zeros((0, k), f),
            region_embeddings=np.zeros((0, d), f), clip_embeddings=np.zeros((0, d), f),
            clip_valid=np.zeros(0, bool), is_point=np.zeros(0, bool),
        )

    def __call__(self, images: list[np.ndarray], prompts: list[ImagePrompts]) -> list[ImagePrediction]:
        return self.predict(self.embed(images), prompts)
