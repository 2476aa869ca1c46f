"""The model presets: one frozen ``Preset`` record per preset holding every fact about it, and
``build_ovsam`` which wires a model from a record.

``get_preset(name)`` (and ``build_ovsam``, ``create_clip_model``, ``clip_tokenizer``) raise
``UnknownPresetError`` on an unknown name, listing the known ones. ``build_ovsam`` takes the open_clip model
whose visual tower becomes the frozen backbone (the text tower embeds the vocabulary);
``create_clip_model(name)`` builds that model with random weights or from a weights file.
Nothing outside this module tests a preset's name: ask its record.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import open_clip
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from segment_anything.modeling.prompt_encoder import PromptEncoder
from torch import nn

from ovsam_ray.errors import UnknownNameError
from ovsam_ray.model.clip2sam_recognizer import CLIP2SAMRecognizer
from ovsam_ray.model.clip_backbone import CLIPBackbone, ConvNeXtCLIPBackbone, ResNetCLIPBackbone
from ovsam_ray.model.mask_decoder import MaskDecoder
from ovsam_ray.model.ovsam import OVSAM
from ovsam_ray.model.sam2clip_adapter import SAM2CLIPAdapter


@dataclass(frozen=True)
class Preset:
    """Every fact about one preset.

    Args:
        name: the registry name (``ovsam_rn50x16``).
        short_name: its tag in the released file names (``sam2clip_vith_<short>.pth``,
            ``clip2sam_<vocab>_<short>.pth``, ``clip_<short>.pth``) and in the text-cache key.
        clip_arch: the open_clip model name of its CLIP, or a ``CLIP(...)`` config for a CLIP
            open_clip does not register (built here, trained from nothing).
        clip_published: whether released weights of that CLIP exist; when they do not, an export
            of a trained model carries its CLIP.
        image_size: the model input side (the padded square the image is resized into).
        adapter_dim, adapter_heads, adapter_depth, window_size, global_attn_indexes: the SAM2CLIP
            adapter (ViT blocks ``adapter_dim`` wide; windowed except ``global_attn_indexes``).
        prompt_dim: SAM's prompt/image-embedding width: the adapter's output channels, so also
            the channels of the SAM teacher's features the adapter is distilled on.
        decoder_depth, decoder_mlp_dim, decoder_heads: the mask decoder's two-way transformer.
        fpn_channels, roi_size, finest_scale: the CLIP2SAM recognizer.
        description: one line for listings.
    """

    name: str
    short_name: str
    clip_arch: str | dict[str, Any] = field(hash=False)
    image_size: int
    adapter_dim: int
    adapter_heads: int
    clip_published: bool = True
    adapter_depth: int = 5
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (4,)
    prompt_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    fpn_channels: int = 256
    roi_size: int = 12
    finest_scale: float = 56.0
    description: str = ""


# The tiny preset's CLIP: not an open_clip registry model, so its config is written here.
TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"layers": (1, 1, 1, 1), "width": 16, "image_size": 64, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}

_PRESETS = (
    Preset(
        name="ovsam_rn50x16",
        short_name="rn50x16",
        clip_arch="RN50x16-quickgelu",
        image_size=1024,
        adapter_dim=1280,
        adapter_heads=16,
        description="The released model: CLIP RN50x16 [384, 768, 1536, 3072], adapter C=1280, SAM ViT-H dims.",
    ),
    Preset(
        name="ovsam_rn50x64",
        short_name="rn50x64",
        clip_arch="RN50x64-quickgelu",
        image_size=1024,
        adapter_dim=1280,
        adapter_heads=16,
        description="CLIP RN50x64 [512, 1024, 2048, 4096], otherwise as ovsam_rn50x16.",
    ),
    Preset(
        name="ovsam_convnext_large",
        short_name="convnext_large",
        clip_arch="convnext_large_d_320",
        image_size=1024,
        adapter_dim=1280,
        adapter_heads=16,
        description="CLIP ConvNeXt-L [192, 384, 768, 1536] (the paper's best backbone in its ablation).",
    ),
    Preset(
        name="ovsam_rn50_small",
        short_name="rn50",
        clip_arch="RN50-quickgelu",
        image_size=1024,
        adapter_dim=256,
        adapter_heads=16,
        description="Test preset: CLIP RN50 [256, 512, 1024, 2048], adapter width 256 (16 heads, 5 blocks), "
        "FPN 256, SAM ViT-H prompt encoder/decoder dims, 1024 input.",
    ),
    Preset(
        name="ovsam_tiny",
        short_name="tiny",
        clip_arch=TINY_CLIP_CONFIG,
        clip_published=False,
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
        description="CPU-trainable preset: tiny CLIP ResNet [64, 128, 256, 512], 256 input, adapter width 64 "
        "(2 blocks: windowed 8, global), decoder/FPN width 64.",
    ),
)
PRESETS: dict[str, Preset] = {p.name: p for p in _PRESETS}


class UnknownPresetError(UnknownNameError):
    """A preset name not in ``PRESETS`` (a KeyError for lookups, a ValueError for configs)."""


def preset_names() -> list[str]:
    """The names of the known presets, sorted."""
    return sorted(PRESETS)


def get_preset(name: str | Preset) -> Preset:
    """The record of preset ``name`` (a record is returned as is: a caller that looked it up once
    passes it on); an unknown name raises UnknownPresetError listing the known ones."""
    if isinstance(name, Preset):
        return name
    if name not in PRESETS:
        raise UnknownPresetError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def _tiny_clip(cfg: dict[str, Any]) -> CLIP:
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


def create_clip_model(preset: str | Preset, checkpoint: str | None = None) -> nn.Module:
    """The open_clip model of ``preset``: random weights, or loaded by open_clip from a local
    file (an open_clip state dict or OpenAI's released file)."""
    arch = get_preset(preset).clip_arch
    if isinstance(arch, dict):
        model = _tiny_clip(arch)
        if checkpoint is not None:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("state_dict", state), strict=True)
        return model.eval()
    return open_clip.create_model(arch, pretrained=checkpoint).eval()


def clip_tokenizer(preset: str | Preset) -> Callable:
    arch = get_preset(preset).clip_arch
    if isinstance(arch, dict):
        return open_clip.get_tokenizer("RN50", context_length=arch["text_cfg"]["context_length"])
    return open_clip.get_tokenizer(arch)


def _build_ovsam(p: Preset, clip_model: Any) -> OVSAM:
    visual = clip_model.visual
    if hasattr(visual, "trunk"):
        backbone: CLIPBackbone = ConvNeXtCLIPBackbone(visual=visual)
    else:
        backbone = ResNetCLIPBackbone(visual=visual)
    backbone.lock()
    embed_dim = backbone.embed_dim
    grid = p.image_size // 16
    return OVSAM(
        backbone=backbone,
        adapter=SAM2CLIPAdapter(
            in_channels=backbone.channels,
            image_size=p.image_size,
            embed_dim=p.adapter_dim,
            num_heads=p.adapter_heads,
            depth=p.adapter_depth,
            window_size=p.window_size,
            global_attn_indexes=p.global_attn_indexes,
            out_channels=p.prompt_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=p.prompt_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(p.image_size, p.image_size),
            mask_in_chans=16,
        ),
        decoder=MaskDecoder(
            transformer_dim=p.prompt_dim,
            transformer_depth=p.decoder_depth,
            transformer_mlp_dim=p.decoder_mlp_dim,
            transformer_heads=p.decoder_heads,
            label_dim=embed_dim,
        ),
        recognizer=CLIP2SAMRecognizer(
            in_channels=backbone.channels,
            fpn_channels=p.fpn_channels,
            embed_dim=embed_dim,
            roi_size=p.roi_size,
            finest_scale=p.finest_scale,
        ),
        image_size=p.image_size,
    )


def build_ovsam(name: str | Preset, clip_model: nn.Module | None = None) -> OVSAM:
    """Build preset ``name`` (or its record) around ``clip_model`` (default: a random one of the
    preset's CLIP); unknown names raise UnknownPresetError (a KeyError) listing the known presets."""
    preset = get_preset(name)
    return _build_ovsam(preset, clip_model or create_clip_model(preset))
