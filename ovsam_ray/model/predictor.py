"""SAM-predictor-shaped inference: embed a batch of images once, then decode any number of box
and point prompts per image, all images' prompts in one decoder call.

Inputs and outputs are in original-image pixels. Prompt order per image: boxes, then points.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ovsam_ray.model.attention import use_fast_attention
from ovsam_ray.model.classifier import OpenVocabClassifier
from ovsam_ray.model.functional import (
    boxes_from_masks,
    clip_boxes,
    clip_points,
    labels_from_logits,
    normalize_pad,
    resize_image,
    resized_shape,
    scale_coords,
    upscale_mask_logits,
)
from ovsam_ray.model.ovsam import OVSAM, DecodeOutput, ImageFeatures, PromptBatch
from ovsam_ray.model.rle_torch import mask_run_lengths

if TYPE_CHECKING:
    from ovsam_ray.vocabulary import Vocabulary


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

    masks (N, H, W) bool at original size, or None when the masks come as ``rles``;
    mask_boxes (N, 4) XYXY original pixels; low_res_logits (N, 1, S/4, S/4); head/clip/fused
    logits (N, C + 1), background last; labels (N,) fused label; scores (N,) its probability;
    head_labels (N,) head-only label; topk_ids / topk_scores (N, k); region / clip embeddings
    (N, D); clip_valid (N,); is_point (N,) the prompt type; areas (N,) int64 mask pixel counts;
    rles: N uncompressed COCO RLEs ``{"size": [H, W], "counts": int array}`` (column-major run
    lengths, zeros first) computed where the masks were, or None when ``masks`` is set;
    stability (N,) float32 the stability score of each mask (SAM's automatic mask generator's: the
    IoU of the mask logits at original size thresholded at ``mask_threshold`` + 1 and - 1), None
    when not computed.
    """

    masks: np.ndarray | None
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
    areas: np.ndarray | None = None
    rles: list[dict[str, Any]] | None = None
    stability: np.ndarray | None = None

    def mask_areas(self) -> np.ndarray:
        """(N,) int64 mask pixel counts, from ``areas`` or else counted on ``masks``."""
        if self.areas is not None:
            return self.areas
        assert self.masks is not None, "a prediction has masks, areas or both"
        return self.masks.reshape(len(self.masks), -1).sum(axis=1, dtype=np.int64)


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


def stability_scores(logits: torch.Tensor, threshold: float = 0.0, offset: float = 1.0) -> torch.Tensor:
    """(N, H, W) mask logits -> (N,) float32 stability scores, where the logits are (on their
    device): the IoU of the masks thresholded at ``threshold + offset`` and ``threshold - offset``
    (SAM's ``calculate_stability_score``; 0 for a mask empty at both)."""
    flat = logits.flatten(1)
    inter = (flat > threshold + offset).sum(dim=1, dtype=torch.int32).float()
    union = (flat > threshold - offset).sum(dim=1, dtype=torch.int32).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(union))


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the CPU; from CUDA a non-blocking copy into pinned memory (synchronize before use)."""
    if t.device.type != "cuda":
        return t
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)


def _unpack_summary(
    packed: np.ndarray, n: int, hw: tuple[int, int], with_runs: bool
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]] | None]:
    """Inverse of ``OVSAMPredictor._summarize_masks`` for one image: areas (N,) int64, boxes
    (N, 4) float32, and the uncompressed RLEs (None without run lengths)."""
    areas = packed[:n].astype(np.int64)
    boxes = packed[n : 5 * n].reshape(n, 4).astype(np.float32)
    if not with_runs:
        return areas, boxes, None
    lengths = packed[5 * n : 6 * n]
    runs = np.split(packed[6 * n :], np.cumsum(lengths)[:-1]) if n else []
    return areas, boxes, [{"size": [hw[0], hw[1]], "counts": c} for c in runs]


class OVSAMPredictor:
    """Runs an ``OVSAM`` model with an ``OpenVocabClassifier`` on numpy images.

    On CUDA the image and prompt passes run under bf16 autocast with channels_last CNN
    weights (``fast=True``, the default there); on CPU everything stays fp32 unless ``fast=True``
    asks for the same path there (CPU bf16 autocast: how CI tests the GPU path). The classifier
    always runs in fp32. With
    ``rle_on_device`` (the default on CUDA) masks are run-length encoded where they are computed
    and only the run lengths reach the host (``ImagePrediction.rles``, ``masks`` None); otherwise
    full-size bool masks come back.

    ``vocabulary``: the ``Vocabulary`` the classifier's text embeddings were made from (what
    ``ovsam_ray.load_predictor`` sets), so that ``label_names`` can name the labels.
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
        rle_on_device: bool | None = None,
        fast_attention: bool = True,
        attention_chunk: int | None = 1024,
        vocabulary: Vocabulary | None = None,
    ) -> None:
        if vocabulary is not None and vocabulary.num_classes != classifier.num_classes:
            raise ValueError(
                f"vocabulary {vocabulary.name!r} has {vocabulary.num_classes} classes, the "
                f"classifier's text embeddings {classifier.num_classes}"
            )
        self.vocabulary = vocabulary
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
        self.rle_on_device = (self.device.type == "cuda") if rle_on_device is None else rle_on_device
        if self.fast:
            self.model.backbone.to(memory_format=torch.channels_last)
        # The adapter's attention through SDPA with the rel-pos bias as its mask, in blocks of
        # ``attention_chunk`` query rows: the same function as segment_anything's, ~2.6x faster
        # on CPU and ~10x less memory for the global block (bench/RESULTS.md).
        if fast_attention:
            use_fast_attention(self.model.adapter, query_chunk=attention_chunk)

    @property
    def text_embeddings(self) -> torch.Tensor:
        """(C, S, D) unit-norm class text embeddings the labels are scored against."""
        return self.classifier.text_embeddings

    def label_names(self, prediction: ImagePrediction) -> list[str]:
        """The vocabulary's class name of each of ``prediction.labels`` (needs ``vocabulary``)."""
        if self.vocabulary is None:
            raise ValueError("this predictor was built without a vocabulary: pass vocabulary=... to name labels")
        return [self.vocabulary.class_names[i] for i in prediction.labels.tolist()]

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.fast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def embed(self, images: list[np.ndarray], original_sizes: list[tuple[int, int]] | None = None) -> EmbeddedImages:
        """images: (H, W, 3) uint8 RGB (grayscale and RGBA are converted) -> features.

        Each image is resized here, on the model's device, unless it already is (``resize_image``,
        e.g. on a CPU worker): with ``original_sizes`` an image whose shape is its original size's
        resized shape is taken as resized, one at its original size is resized; a batch may mix both.
        """
        size = self.model.image_size
        batch, input_sizes, sizes = [], [], []
        for i, image in enumerate(images):
            rgb = _as_rgb_tensor(image).to(self.device)
            own = (int(rgb.shape[0]), int(rgb.shape[1]))
            orig = (original_sizes[i][0], original_sizes[i][1]) if original_sizes is not None else own
            target = resized_shape(*orig, size)
            if own == target:
                resized = rgb
            elif own == orig:
                resized = resize_image(rgb, size)  # the float antialiased resize, on the device
            else:
                raise ValueError(
                    f"image {i} is {own[0]}x{own[1]}: neither its original size {orig} nor that "
                    f"resized to {size}, {target}"
                )
            batch.append(normalize_pad(resized, size))
            input_sizes.append((int(resized.shape[0]), int(resized.shape[1])))
            sizes.append(orig)
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
            pb_given = p.point_boxes
            pb = (
                torch.full((len(pt), 4), float("nan"))
                if pb_given is None
                else torch.as_tensor(np.asarray(pb_given, np.float32))
            )
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
        per_prompt = self._decode_and_classify(embedded, batch)
        # Prompts are grouped by image (``_prompt_batch``), so each image owns a contiguous slice.
        bounds = np.cumsum([0, *torch.bincount(batch.image_index, minlength=len(prompts)).tolist()])
        packed, full_masks, stability = [], [], []
        for i, (orig, inp) in enumerate(zip(embedded.original_sizes, embedded.input_sizes)):
            low_res = per_prompt["low_res_logits"][bounds[i] : bounds[i + 1]]
            logits = upscale_mask_logits(low_res, self.model.image_size, inp, orig)[:, 0]
            masks = logits > self.model.mask_threshold
            stability.append(stability_scores(logits, self.model.mask_threshold))
            packed.append(self._summarize_masks(masks))
            if not self.rle_on_device:
                full_masks.append(_to_host(masks))
        # Every device -> host copy is queued first (pinned, non-blocking on CUDA), then one wait.
        host = {name: _to_host(t) for name, t in per_prompt.items()}
        host["stability"] = _to_host(torch.cat(stability))
        host_packed = _to_host(torch.cat(packed))
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        arrays = {name: t.numpy() for name, t in host.items()}
        summaries = np.split(host_packed.numpy(), np.cumsum([len(p) for p in packed])[:-1])
        results = []
        for i, hw in enumerate(embedded.original_sizes):
            a, b = bounds[i], bounds[i + 1]
            areas, boxes, rles = _unpack_summary(summaries[i], b - a, hw, self.rle_on_device)
            host_masks = full_masks[i].numpy() if full_masks else None
            fields = {name: v[a:b] for name, v in arrays.items()}
            results.append(ImagePrediction(masks=host_masks, mask_boxes=boxes, areas=areas, rles=rles, **fields))
        return results

    def _decode_and_classify(self, embedded: EmbeddedImages, batch: PromptBatch) -> dict[str, torch.Tensor]:
        """Decoder and classifier outputs of every prompt, named as ``ImagePrediction``'s fields."""
        out = self._decode_chunked(embedded, batch)
        assert out.clip_embeddings is not None and out.clip_valid is not None  # decoded with the CLIP branch
        if self.half_embeddings:
            out.region_embeddings = out.region_embeddings.half().float()
            out.clip_embeddings = out.clip_embeddings.half().float()
        # Labels in fp32 even inside a caller's autocast: the fusion's geometric mean and the
        # top-k over a 21k vocabulary would round to bf16 and flip near-ties.
        with torch.autocast(self.device.type, enabled=False):
            cls = self.classifier(out.region_embeddings.float(), out.clip_embeddings.float(), out.clip_valid)
            labels, topk_ids, topk_scores = labels_from_logits(cls.fused_logits, self.topk)
            head_labels, _, _ = labels_from_logits(cls.head_logits, 1)
        return {
            "low_res_logits": out.low_res_logits.float(),
            "head_logits": cls.head_logits,
            "clip_logits": cls.clip_logits,
            "fused_logits": cls.fused_logits,
            "labels": labels,
            "scores": topk_scores[:, 0],
            "head_labels": head_labels,
            "topk_ids": topk_ids,
            "topk_scores": topk_scores,
            "region_embeddings": out.region_embeddings.float(),
            "clip_embeddings": out.clip_embeddings.float(),
            "clip_valid": out.clip_valid,
            "is_point": batch.is_point,
        }

    def _summarize_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """(N, H, W) bool -> one flat int tensor, so that a single copy brings it to the host:
        areas (N), XYXY boxes (4N), and with ``rle_on_device`` run counts per mask (N) and all
        run lengths (``mask_run_lengths``)."""
        h, w = masks.shape[1:]
        dtype = torch.int32 if h * w < 2**31 - 1 else torch.int64
        # (an int32 sum: torch's int64 reduction of bool is an order of magnitude slower on a CPU)
        parts = [masks.flatten(1).sum(dim=1, dtype=dtype), boxes_from_masks(masks).flatten()]
        if self.rle_on_device:
            counts, lengths = mask_run_lengths(masks)
            parts += [lengths, counts]
        return torch.cat([p.to(dtype) for p in parts])

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
            masks=None if self.rle_on_device else np.zeros((0, *hw), bool),
            areas=np.zeros(0, np.int64),
            rles=[] if self.rle_on_device else None,
            mask_boxes=np.zeros((0, 4), f),
            low_res_logits=np.zeros((0, 1, low, low), f),
            head_logits=np.zeros((0, c1), f),
            clip_logits=np.zeros((0, c1), f),
            fused_logits=np.zeros((0, c1), f),
            labels=np.zeros(0, np.int64),
            scores=np.zeros(0, f),
            head_labels=np.zeros(0, np.int64),
            topk_ids=np.zeros((0, k), np.int64),
            topk_scores=np.zeros((0, k), f),
            region_embeddings=np.zeros((0, d), f),
            clip_embeddings=np.zeros((0, d), f),
            clip_valid=np.zeros(0, bool),
            is_point=np.zeros(0, bool),
            stability=np.zeros(0, f),
        )

    def __call__(self, images: list[np.ndarray], prompts: list[ImagePrompts]) -> list[ImagePrediction]:
        return self.predict(self.embed(images), prompts)
