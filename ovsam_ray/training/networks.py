"""Building the model a training stage starts from, and the SAM teacher of distillation.

Weights come in the released layout (DESIGN §3), found and loaded by the same functions as
inference's (``ovsam_ray.weights.released``): CLIP (open_clip file), SAM (prompt encoder; its mask
decoder, when the file has one, initialises ours), the SAM2CLIP adapter and optionally a CLIP2SAM
file to continue from. With ``random_init`` the parts without a file start random (logged
loudly); without it a missing file is an error.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from segment_anything.modeling.image_encoder import ImageEncoderViT
from torch import nn

from ovsam_ray.errors import ConfigError
from ovsam_ray.model.ovsam import OVSAM, ImageFeatures, PromptBatch
from ovsam_ray.model.presets import build_ovsam
from ovsam_ray.training.config import ModelSpec
from ovsam_ray.training.losses import class_logits
from ovsam_ray.weights.files import WeightsError, find_files, read_weights
from ovsam_ray.weights.released import load_clip, load_parts, standard_file_names

log = logging.getLogger(__name__)

# segment_anything's build_sam_vit_{h,l,b} encoder shapes: (embed_dim, depth, heads, global attention blocks).
SAM_ENCODERS = {
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
}
# What each stage needs from a file (the rest may start random only with random_init).
REQUIRED = {"distill": ("clip",), "cotrain": ("clip", "sam", "sam2clip")}


def resolve_files(spec: ModelSpec, *, s3_endpoint: str | None = None) -> dict[str, str]:
    """part -> file: explicit files, else the first standard name present under ``spec.weights``."""
    found: dict[str, str] = {}
    if spec.weights:
        # Any training vocabulary's clip2sam file: training continues from whichever is there.
        names = {**standard_file_names(spec.preset), "clip2sam": ["clip2sam_*.pth"]}
        found = find_files(spec.weights, names, s3_endpoint=s3_endpoint)
    for part in ("sam", "clip", "sam2clip", "clip2sam"):
        if getattr(spec, part):
            found[part] = getattr(spec, part)
    return found


def build_training_model(
    spec: ModelSpec, *, stage: str, seed: int = 0, s3_endpoint: str | None = None
) -> tuple[OVSAM, nn.Module, dict[str, str]]:
    """(model, its open_clip model, part -> file used) for ``stage`` in ('distill', 'cotrain')."""
    files = resolve_files(spec, s3_endpoint=s3_endpoint)
    missing = [p for p in REQUIRED[stage] if p not in files]
    if missing and not spec.random_init:
        raise WeightsError(
            f"{stage} of {spec.preset} needs weights for {missing}: pass --weights DIR or the files "
            "(--clip/--sam/--sam2clip), or --random-init to start those parts random"
        )
    if missing:
        log.warning("=" * 72)
        log.warning("RANDOM INIT: %s starts %s from random weights.", spec.preset, ", ".join(missing))
        log.warning("=" * 72)
    torch.manual_seed(seed)
    clip_model, _ = load_clip(spec.preset, files.get("clip"), s3_endpoint=s3_endpoint)
    model = build_ovsam(spec.preset, clip_model)
    load_parts(model, files, init_decoder_from_sam=True, s3_endpoint=s3_endpoint)
    return model, clip_model, files


def build_sam_teacher(
    kind: str,
    checkpoint: str | None = None,
    *,
    image_size: int = 1024,
    out_chans: int = 256,
    embed_dim: int = 32,
    s3_endpoint: str | None = None,
    seed: int = 0,
) -> nn.Module:
    """SAM's image encoder (frozen, eval) of ``kind`` ('vit_h'|'vit_l'|'vit_b') with the weights
    of a SAM checkpoint (``image_encoder.*``, strict, weights_only), or 'random_tiny': a 1-block
    random ViT ``embed_dim`` wide for tests, ``out_chans`` out at ``image_size``."""
    from functools import partial

    if kind == "random_tiny":
        torch.manual_seed(seed)
        encoder = ImageEncoderViT(
            img_size=image_size,
            patch_size=16,
            embed_dim=embed_dim,
            depth=1,
            num_heads=2,
            out_chans=out_chans,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=0,
        )
        nn.init.normal_(encoder.pos_embed, std=0.02)  # SAM starts it at zero; a trained one is not
    else:
        if kind not in SAM_ENCODERS:
            raise ConfigError(f"unknown SAM teacher {kind!r}; known: {sorted(SAM_ENCODERS)} and random_tiny")
        if checkpoint is None:
            raise WeightsError(f"the {kind} teacher needs a SAM checkpoint (sam_{kind}_*.pth)")
        dim, depth, heads, global_attn = SAM_ENCODERS[kind]
        encoder = ImageEncoderViT(
            img_size=1024,
            patch_size=16,
            embed_dim=dim,
            depth=depth,
            num_heads=heads,
            mlp_ratio=4.0,
            out_chans=256,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            rel_pos_zero_init=True,
            window_size=14,
            global_attn_indexes=global_attn,
        )
        wf = read_weights(checkpoint, s3_endpoint=s3_endpoint, what="sam")
        state = {k[len("image_encoder.") :]: v for k, v in wf.state_dict.items() if k.startswith("image_encoder.")}
        result = encoder.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise WeightsError(
                f"{checkpoint} does not fit SAM's {kind} image encoder: missing {result.missing_keys[:8]}, "
                f"unexpected {result.unexpected_keys[:8]}"
            )
    encoder.requires_grad_(False)
    return encoder.eval()


def copy_teacher_pos_embed(model: OVSAM, teacher: object) -> bool:
    """Copy SAM's ``image_encoder.pos_embed`` into ``adapter.pos_embed`` (a buffer) when the
    shapes match (as the reference distillation does); returns whether it was copied."""
    source = getattr(teacher, "pos_embed", None)
    target = model.adapter.pos_embed
    if source is None or tuple(source.shape) != tuple(target.shape):
        log.info(
            "adapter.pos_embed %s kept: teacher pos_embed is %s",
            tuple(target.shape),
            None if source is None else tuple(source.shape),
        )
        return False
    with torch.no_grad():
        target.copy_(source.detach().to(target))
    return True


# --- networks ----------------------------------------------------------------------------------------


class CotrainNet(nn.Module):
    """CLIP2SAM's training forward: frozen CLIP (and adapter, unless ``train_adapter``), then the
    decoder for every prompt and the recognizer on the ground-truth RoI of each prompt (as the
    reference trains; at inference the RoI comes from the predicted mask).

    text_embeddings: (C, S, D) the training vocabulary; log_scale: the classifier temperature
    (log), a parameter that trains only when ``learn_logit_scale``.
    """

    text_embeddings: torch.Tensor  # a buffer (registered in __init__)

    def __init__(
        self,
        model: OVSAM,
        *,
        text_embeddings: torch.Tensor,
        logit_scale: float,
        learn_logit_scale: bool = False,
        train_adapter: bool = False,
        logit_scale_lr: float | None = None,
        recognizer_lr: float | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        model.lock_for_cotraining()
        if train_adapter:
            model.adapter.requires_grad_(True)
        self.train_adapter = train_adapter
        self.register_buffer("text_embeddings", text_embeddings.float(), persistent=False)
        self.log_scale = nn.Parameter(torch.tensor(float(logit_scale)), requires_grad=learn_logit_scale)
        self.param_lrs = {"log_scale": logit_scale_lr} if logit_scale_lr else {}
        if recognizer_lr:
            self.param_lrs["model.recognizer."] = recognizer_lr
        prefixes = ["model.decoder.", "model.recognizer.", "log_scale"]
        self.checkpoint_prefixes = tuple(prefixes + (["model.adapter."] if train_adapter else []))

    def forward(
        self,
        images: torch.Tensor,
        prompts: PromptBatch,
        roi_boxes: torch.Tensor,
        predicted_roi: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, S, S) normalised -> low-res mask logits (N, 1, S/4, S/4), class logits (N, C + 1).
        The prompts decode through the model's own ``OVSAM.decode`` with the ground-truth RoIs;
        ``predicted_roi`` (N,) bool: prompts whose RoI is their predicted mask's box (see
        ``CotrainConfig.roi_from_prediction``) where it overlaps ``roi_boxes``."""
        m = self.model
        with torch.no_grad():
            clip_feats = m.backbone(images)
        with contextlib.nullcontext() if self.train_adapter else torch.no_grad():
            image_embeddings = m.adapter(clip_feats)
        fpn_feats = m.recognizer.fpn(clip_feats)
        features = ImageFeatures(clip_feats=clip_feats, image_embeddings=image_embeddings, fpn_feats=fpn_feats)
        out = m.decode(features, prompts, roi_boxes=roi_boxes, mask_roi=predicted_roi, clip_branch=False)
        # The FPN levels no RoI picked join the graph with weight 0, so DDP sees a gradient for every
        # parameter each step.
        region = out.region_embeddings + 0 * sum(f.mean() for f in fpn_feats)
        return out.low_res_logits, class_logits(region, self.text_embeddings, self.log_scale)


class DistillNet(nn.Module):
    """SAM2CLIP's student: frozen CLIP, trainable adapter -> (B, C, S/16, S/16) image embedding."""

    def __init__(self, model: OVSAM) -> None:
        super().__init__()
        self.model = model
        model.lock_for_distillation()
        self.checkpoint_prefixes = ("model.adapter.",)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            clip_feats = self.model.backbone(images)
        return self.model.adapter(clip_feats)


def unwrap(net: nn.Module) -> Any:
    """The Cotrain/DistillNet inside ``net`` (a DistributedDataParallel wrapper or the net itself)."""
    return net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net


def trainable_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """The checkpointed part of a Cotrain/DistillNet (its trainable modules, buffers included)."""
    inner = unwrap(net)
    return {k: v.detach().cpu() for k, v in inner.state_dict().items() if k.startswith(inner.checkpoint_prefixes)}


def load_trainable_state_dict(net: nn.Module, state: dict[str, torch.Tensor]) -> None:
    inner = unwrap(net)
    expected = {k for k in inner.state_dict() if k.startswith(inner.checkpoint_prefixes)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    inner.load_state_dict(state, strict=False)


# --- optimiser and schedules ---------------------------------------------------------------------------
