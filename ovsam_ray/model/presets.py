"""One builder per preset, the numbers written in; ``_build_ovsam`` does the wiring.

``build_ovsam(name)`` looks a preset up in ``PRESETS`` and fails loudly on an unknown name.
Each builder takes the open_clip model whose visual tower becomes the frozen backbone (the
text tower embeds the vocabulary); ``create_clip_model(name)`` builds that model with random
weights or from a weights file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import open_clip
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from segment_anything.modeling.prompt_encoder import PromptEncoder
from torch import nn

from .clip2sam_recognizer import CLIP2SAMRecognizer
from .clip_backbone import ConvNeXtCLIPBackbone, ResNetCLIPBackbone
from .mask_decoder import MaskDecoder
from .ovsam import OVSAM
from .sam2clip_adapter import SAM2CLIPAdapter

# open_clip architecture of each preset's CLIP: a registered model name, or a config for the tiny one.
TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"layers": (1, 1, 1, 1), "width": 16, "image_size": 64, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
CLIP_ARCHS: dict[str, str | dict] = {
    "ovsam_rn50x16": "RN50x16-quickgelu",
    "ovsam_rn50x64": "RN50x64-quickgelu",
    "ovsam_convnext_large": "convnext_large_d_320",
    "ovsam_rn50_small": "RN50-quickgelu",
    "ovsam_tiny": TINY_CLIP_CONFIG,
}


# Model input side per preset (the padded square the image is resized into).
IMAGE_SIZES = {
    "ovsam_rn50x16": 1024,
    "ovsam_rn50x64": 1024,
    "ovsam_convnext_large": 1024,
    "ovsam_rn50_small": 1024,
    "ovsam_tiny": 256,
}


def _tiny_clip() -> CLIP:
    cfg = TINY_CLIP_CONFIG
    model = CLIP(
        embed_dim=cfg["embed_dim"],
        vision_cfg=CLIPVisionCfg(**cfg["vision_cfg"]),
        text_cfg=CLIPTextCfg(**cfg["text_cfg"]),
    )
    # open_clip zero-initialises each bottleneck's last BatchNorm; a random *frozen* tower built
    # that way passes almost no signal, so the tiny (trained-from-scratch) preset starts at 1.
    for name, p in model.visual.named_parameters():
        if name.endswith("bn3.weight"):
            nn.init.ones_(p)
    return model


def create_clip_model(preset: str, checkpoint: str | None = None) -> nn.Module:
    """The open_clip model of ``preset``: random weights, or loaded by open_clip from a local
    file (an open_clip state dict or OpenAI's released file)."""
    arch = _lookup(CLIP_ARCHS, preset)
    if isinstance(arch, dict):
        model = _tiny_clip()
        if checkpoint is not None:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("state_dict", state), strict=True)
        return model.eval()
    return open_clip.create_model(arch, pretrained=checkpoint).eval()


def clip_tokenizer(preset: str) -> Callable:
    arch = _lookup(CLIP_ARCHS, preset)
    if isinstance(arch, dict):
        return open_clip.get_tokenizer("RN50", context_length=arch["text_cfg"]["context_length"])
    return open_clip.get_tokenizer(arch)


def _lookup(table: dict, name: str):
    if name not in table:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(table))}")
    return table[name]


def _build_ovsam(
    *,
    clip_model: nn.Module,
    image_size: int,
    adapter_dim: int,
    adapter_heads: int,
    adapter_depth: int = 5,
    window_size: int = 14,
    global_attn_indexes: Sequence[int] = (4,),
    prompt_dim: int = 256,
    decoder_depth: int = 2,
    decoder_mlp_dim: int = 2048,
    decoder_heads: int = 8,
    fpn_channels: int = 256,
    roi_size: int = 12,
    finest_scale: float = 56.0,
) -> OVSAM:
    visual = clip_model.visual
    if hasattr(visual, "trunk"):
        backbone: nn.Module = ConvNeXtCLIPBackbone(visual=visual)
    else:
        backbone = ResNetCLIPBackbone(visual=visual)
    backbone.lock()
    embed_dim = backbone.embed_dim
    grid = image_size // 16
    return OVSAM(
        backbone=backbone,
        adapter=SAM2CLIPAdapter(
            in_channels=backbone.channels,
            image_size=image_size,
            embed_dim=adapter_dim,
            num_heads=adapter_heads,
            depth=adapter_depth,
            window_size=window_size,
            global_attn_indexes=global_attn_indexes,
            out_channels=prompt_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        decoder=MaskDecoder(
            transformer_dim=prompt_dim,
            transformer_depth=decoder_depth,
            transformer_mlp_dim=decoder_mlp_dim,
            transformer_heads=decoder_heads,
            label_dim=embed_dim,
        ),
        recognizer=CLIP2SAMRecognizer(
            in_channels=backbone.channels,
            fpn_channels=fpn_channels,
            embed_dim=embed_dim,
            roi_size=roi_size,
            finest_scale=finest_scale,
        ),
        image_size=image_size,
    )


def ovsam_rn50x16(clip_model: nn.Module | None = None) -> OVSAM:
    """The released model: CLIP RN50x16 [384, 768, 1536, 3072], adapter C=1280, SAM ViT-H dims."""
    clip_model = clip_model or create_clip_model("ovsam_rn50x16")
    return _build_ovsam(clip_model=clip_model, image_size=1024, adapter_dim=1280, adapter_heads=16)


def ovsam_rn50x64(clip_model: nn.Module | None = None) -> OVSAM:
    """CLIP RN50x64 [512, 1024, 2048, 4096], otherwise as ovsam_rn50x16."""
    clip_model = clip_model or create_clip_model("ovsam_rn50x64")
    return _build_ovsam(clip_model=clip_model, image_size=1024, adapter_dim=1280, adapter_heads=16)


def ovsam_convnext_large(clip_model: nn.Module | None = None) -> OVSAM:
    """CLIP ConvNeXt-L [192, 384, 768, 1536] (the paper's best backbone in its ablation)."""
    clip_model = clip_model or create_clip_model("ovsam_convnext_large")
    return _build_ovsam(clip_model=clip_model, image_size=1024, adapter_dim=1280, adapter_heads=16)


def ovsam_rn50_small(clip_model: nn.Module | None = None) -> OVSAM:
    """Test preset: CLIP RN50 [256, 512, 1024, 2048], adapter width 256 (16 heads, 5 blocks),
    FPN 256, SAM ViT-H prompt encoder/decoder dims, 1024 input."""
    clip_model = clip_model or create_clip_model("ovsam_rn50_small")
    return _build_ovsam(clip_model=clip_model, image_size=1024, adapter_dim=256, adapter_heads=16)


def ovsam_tiny(clip_model: nn.Module | None = None) -> OVSAM:
    """CPU-trainable preset: tiny CLIP ResNet [64, 128, 256, 512], 256 input, adapter width 64
    (2 blocks: windowed 8, global), decoder/FPN width 64."""
    clip_model = clip_model or create_clip_model("ovsam_tiny")
    return _build_ovsam(
        clip_model=clip_model,
        image_size=256,
        adapter_dim=64,
        adapter_heads=4,
        adapter_depth=2,
        window_size=8,
        global_attn_indexes=(1,),
        prompt_dim=64,
        decoder_mlp_dim=256,
        decoder_heads=4,
        fpn_channels=64,
        roi_size=7,
        finest_scale=14.0,
    )


PRESETS: dict[str, Callable[..., OVSAM]] = {
    "ovsam_rn50x16": ovsam_rn50x16,
    "ovsam_rn50x64": ovsam_rn50x64,
    "ovsam_convnext_large": ovsam_convnext_large,
    "ovsam_rn50_small": ovsam_rn50_small,
    "ovsam_tiny": ovsam_tiny,
}


def build_ovsam(name: str, clip_model: nn.Module | None = None) -> OVSAM:
    """Build preset ``name``; unknown names raise KeyError listing the known presets."""
    return _lookup(PRESETS, name)(clip_model)
