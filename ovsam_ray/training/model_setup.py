"""Building the model a training stage starts from, and the SAM teacher of distillation.

Weights come in the released layout (DESIGN §3), found and loaded by the same functions as
inference's (``ovsam_ray.checkpoints``): CLIP (open_clip file), SAM (prompt encoder; its mask
decoder, when the file has one, initialises ours), the SAM2CLIP adapter and optionally a CLIP2SAM
file to continue from. With ``random_init`` the parts without a file start random (logged
loudly); without it a missing file is an error.
"""

from __future__ import annotations

import logging

import torch
from segment_anything.modeling.image_encoder import ImageEncoderViT
from torch import nn

from ovsam_ray.checkpoints import load_clip, load_parts, standard_file_names
from ovsam_ray.errors import ConfigError
from ovsam_ray.model.ovsam import OVSAM
from ovsam_ray.model.presets import build_ovsam
from ovsam_ray.weights import WeightsError, find_files, read_weights

from .config import ModelSpec

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


def build_training_model(spec: ModelSpec, *, stage: str, seed: int = 0, s3_endpoint: str | None = None
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


def build_sam_teacher(kind: str, checkpoint: str | None = None, *, image_size: int = 1024, out_chans: int = 256,
                      embed_dim: int = 32, s3_endpoint: str | None = None, seed: int = 0) -> nn.Module:
    """SAM's image encoder (frozen, eval) of ``kind`` ('vit_h'|'vit_l'|'vit_b') with the weights
    of a SAM checkpoint (``image_encoder.*``, strict, weights_only), or 'random_tiny': a 1-block
    random ViT ``embed_dim`` wide for tests, ``out_chans`` out at ``image_size``."""
    from functools import partial

    if kind == "random_tiny":
        torch.manual_seed(seed)
        encoder = ImageEncoderViT(
            img_size=image_size, patch_size=16, embed_dim=embed_dim, depth=1, num_heads=2, out_chans=out_chans,
            qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=0,
        )
        nn.init.normal_(encoder.pos_embed, std=0.02)  # SAM starts it at zero; a trained one is not
    else:
        if kind not in SAM_ENCODERS:
            raise ConfigError(f"unknown SAM teacher {kind!r}; known: {sorted(SAM_ENCODERS)} and random_tiny")
        if checkpoint is None:
            raise WeightsError(f"the {kind} teacher needs a SAM checkpoint (sam_{kind}_*.pth)")
        dim, depth, heads, global_attn = SAM_ENCODERS[kind]
        encoder = ImageEncoderViT(
            img_size=1024, patch_size=16, embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=4.0,
            out_chans=256, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True,
            rel_pos_zero_init=True, window_size=14, global_attn_indexes=global_attn,
        )
        wf = read_weights(checkpoint, s3_endpoint=s3_endpoint, what="sam")
        state = {k[len("image_encoder."):]: v for k, v in wf.state_dict.items() if k.startswith("image_encoder.")}
        result = encoder.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise WeightsError(
                f"{checkpoint} does not fit SAM's {kind} image encoder: missing {result.missing_keys[:8]}, "
                f"unexpected {result.unexpected_keys[:8]}"
            )
    encoder.requires_grad_(False)
    return encoder.eval()


def copy_teacher_pos_embed(model: OVSAM, teacher: nn.Module) -> bool:
    """Copy SAM's ``image_encoder.pos_embed`` into ``adapter.pos_embed`` (a buffer) when the
    shapes match (as the reference distillation does); returns whether it was copied."""
    source = getattr(teacher, "pos_embed", None)
    target = model.adapter.pos_embed
    if source is None or tuple(source.shape) != tuple(target.shape):
        log.info("adapter.pos_embed %s kept: teacher pos_embed is %s", tuple(target.shape),
                 None if source is None else tuple(source.shape))
        return False
    with torch.no_grad():
        target.copy_(source.detach().to(target))
    return True
