"""Presets: every one builds with the DESIGN §2 architecture numbers; forward shapes; the registry
fails loudly; which parameters train in each stage; the frozen CLIP tower; a stored golden output
of a fixed-seed ``ovsam_tiny`` (tests/golden, regenerate with tests/golden/make_golden.py)."""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ovsam_ray.model.clip_backbone import ConvNeXtCLIPBackbone, ResNetCLIPBackbone
from ovsam_ray.model.ovsam import OVSAM, PromptBatch
from ovsam_ray.model.presets import PRESETS, Preset, UnknownPresetError, build_ovsam, create_clip_model, get_preset

GOLDEN_DIR = Path(__file__).parents[1] / "golden"

# preset -> (CLIP stage channels, CLIP embedding dim D, adapter width, input size, backbone type)
EXPECTED = {
    "ovsam_rn50x16": ([384, 768, 1536, 3072], 768, 1280, 1024, ResNetCLIPBackbone),
    "ovsam_rn50x64": ([512, 1024, 2048, 4096], 1024, 1280, 1024, ResNetCLIPBackbone),
    "ovsam_convnext_large": ([192, 384, 768, 1536], 768, 1280, 1024, ConvNeXtCLIPBackbone),
    "ovsam_rn50_small": ([256, 512, 1024, 2048], 1024, 256, 1024, ResNetCLIPBackbone),
    "ovsam_tiny": ([64, 128, 256, 512], 64, 64, 256, ResNetCLIPBackbone),
}
NAN_BOX = [float("nan")] * 4


def test_expected_table_covers_every_preset() -> None:
    assert set(EXPECTED) == set(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds(name: str) -> None:
    channels, embed_dim, adapter_dim, image_size, backbone_type = EXPECTED[name]
    model = build_ovsam(name)
    try:
        assert isinstance(model, OVSAM)
        assert isinstance(model.backbone, backbone_type)
        assert model.backbone.channels == channels
        assert model.backbone.embed_dim == embed_dim == model.embed_dim
        assert model.image_size == image_size
        assert model.prompt_encoder.image_embedding_size == (image_size // 16, image_size // 16)
        # SAM2CLIP: conv patch embeddings with kernel = stride = 16/s for s = 4, 8, 16, a
        # transposed conv with kernel = stride = 2 for s = 32; width ``adapter_dim``.
        kinds = [type(p.projection) for p in model.adapter.patch_embeds]
        assert kinds == [nn.Conv2d, nn.Conv2d, nn.Conv2d, nn.ConvTranspose2d]
        assert [p.projection.kernel_size for p in model.adapter.patch_embeds] == [(4, 4), (2, 2), (1, 1), (2, 2)]
        assert model.adapter.level_encoding.weight.shape == (4, adapter_dim)
        assert model.adapter.pos_embed.shape == (1, image_size // 16, image_size // 16, adapter_dim)
        # One mask token, no IoU head, a label token; the RoI conv maps to the CLIP dim.
        assert model.decoder.mask_tokens.weight.shape[0] == 1
        assert not any("iou" in k for k in model.state_dict())
        assert model.recognizer.roi_conv.out_channels == embed_dim
        assert all(not p.requires_grad for p in model.backbone.parameters())
        if adapter_dim == 1280:  # the paper presets: SAM ViT-H blocks, RoIAlign 12 (14 for RN50x64's pool)
            blocks = model.adapter.blocks
            assert [b.window_size for b in blocks] == [14, 14, 14, 14, 0]  # window 14 in 0-3, global in 4
            assert blocks[0].attn.num_heads == 16 and blocks[0].mlp.lin1.out_features == 4 * 1280
            assert blocks[0].attn.use_rel_pos and blocks[0].attn.qkv.bias is not None
            assert model.recognizer.roi_size == 12
        if name in ("ovsam_rn50x16", "ovsam_rn50x64"):
            assert model.backbone.roi_size == {"ovsam_rn50x16": 12, "ovsam_rn50x64": 14}[name]
    finally:
        del model
        gc.collect()


def test_unknown_preset_raises_key_error_listing_the_known_ones() -> None:
    with pytest.raises(KeyError) as info:
        build_ovsam("ovsam_vit_giant")
    message = str(info.value)
    assert "ovsam_vit_giant" in message
    for name in PRESETS:
        assert name in message
    with pytest.raises(KeyError, match="ovsam_tiny"):
        create_clip_model("nope")


def test_an_unknown_preset_is_refused_by_every_config_with_the_known_names() -> None:
    from ovsam_ray.inference import ModelConfig
    from ovsam_ray.training.config import ModelSpec
    from ovsam_ray.training.distill import DumpTeacherConfig

    for make in (
        lambda: get_preset("nope"),
        lambda: ModelConfig(preset="nope", random_init=True),
        lambda: ModelSpec(preset="nope"),
        lambda: DumpTeacherConfig(shards="s", output="o", preset="nope", teacher="random_tiny"),
    ):
        with pytest.raises(UnknownPresetError) as info:
            make()
        assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
        assert str(info.value) == f"unknown preset 'nope'; known presets: {', '.join(sorted(PRESETS))}"


def test_preset_records_are_frozen_and_match_the_models_they_build() -> None:
    record = get_preset("ovsam_tiny")
    assert isinstance(record, Preset) and record.name == "ovsam_tiny"
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.image_size = 512  # type: ignore[misc]
    model = build_ovsam("ovsam_tiny")
    assert model.image_size == record.image_size
    assert model.prompt_encoder.embed_dim == record.prompt_dim
    assert model.adapter.level_encoding.weight.shape[1] == record.adapter_dim
    assert len(model.adapter.blocks) == record.adapter_depth
    assert model.recognizer.roi_size == record.roi_size
    assert sorted({p.short_name for p in PRESETS.values()}) == sorted(p.short_name for p in PRESETS.values())


def test_no_code_outside_the_registry_tests_a_preset_name() -> None:
    """Per-preset facts live in the records: code asks ``get_preset(name).<fact>``, never
    ``name == "ovsam_tiny"`` or a table keyed by preset names."""
    package = Path(__file__).parents[2] / "ovsam_ray"
    names = "|".join(PRESETS)
    tests = re.compile(rf"""(==|!=|\bin)\s*\(?\s*["']({names})["']|["']({names})["']\s*(==|!=|:\s)""")
    found = [
        f"{path.relative_to(package)}:{i}: {line.strip()}"
        for path in sorted(package.rglob("*.py"))
        if path.name != "presets.py"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if tests.search(line)
    ]
    assert found == []


def test_builder_uses_the_given_clip_model() -> None:
    clip = create_clip_model("ovsam_tiny")
    model = build_ovsam("ovsam_tiny", clip)
    assert model.backbone.visual is clip.visual


# ------------------------------------------------------------------ forward


def _tiny_prompts() -> PromptBatch:
    return PromptBatch(
        boxes=torch.tensor([[10.0, 20.0, 120.0, 200.0], [0.0, 0.0, 0.0, 0.0], [30.0, 30.0, 30.0, 30.0]]),
        points=torch.tensor([[0.0, 0.0], [64.0, 100.0], [0.0, 0.0]]),
        is_point=torch.tensor([False, True, False]),
        image_index=torch.tensor([0, 1, 1]),
        clip_boxes=torch.tensor([[10.0, 20.0, 120.0, 200.0], NAN_BOX, [30.0, 30.0, 30.0, 30.0]]),
    )


def test_ovsam_tiny_forward_shapes() -> None:
    torch.manual_seed(0)
    model = build_ovsam("ovsam_tiny").eval()
    images = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        feats = model.embed(images)
        out = model.decode(feats, _tiny_prompts())
    assert [tuple(f.shape) for f in feats.clip_feats] == [
        (2, 64, 64, 64),
        (2, 128, 32, 32),
        (2, 256, 16, 16),
        (2, 512, 8, 8),
    ]
    assert tuple(feats.image_embeddings.shape) == (2, 64, 16, 16)  # SAM's contract at width 64
    assert [tuple(f.shape) for f in feats.fpn_feats] == [
        (2, 64, 64, 64),
        (2, 64, 32, 32),
        (2, 64, 16, 16),
        (2, 64, 8, 8),
    ]
    assert tuple(out.low_res_logits.shape) == (3, 1, 64, 64)
    assert tuple(out.region_embeddings.shape) == (3, 64)
    assert tuple(out.clip_embeddings.shape) == (3, 64)
    assert tuple(out.roi_boxes.shape) == (3, 4)
    assert out.clip_valid.shape == (3,) and out.clip_valid.dtype == torch.bool
    for t in (out.low_res_logits, out.region_embeddings, out.clip_embeddings, out.roi_boxes):
        assert torch.isfinite(t).all()
    # An empty batch gives well-formed empties (SAM's attention cannot reshape B = 0 itself).
    with torch.no_grad():
        empty = model.embed(torch.zeros(0, 3, 256, 256))
    assert tuple(empty.image_embeddings.shape) == (0, 64, 16, 16)
    assert [tuple(f.shape) for f in empty.fpn_feats] == [(0, *f.shape[1:]) for f in feats.fpn_feats]
    assert [tuple(f.shape) for f in empty.clip_feats] == [(0, *f.shape[1:]) for f in feats.clip_feats]
    # forward == embed + decode
    with torch.no_grad():
        again = model(images, _tiny_prompts())
    torch.testing.assert_close(again.low_res_logits, out.low_res_logits)


@pytest.mark.slow
def test_ovsam_rn50_small_forward_shapes() -> None:
    """The one ``ovsam_rn50_small`` forward of the suite (~10 s on 2 CPU cores)."""
    torch.manual_seed(0)
    model = build_ovsam("ovsam_rn50_small").eval()
    prompts = PromptBatch(
        boxes=torch.tensor([[100.0, 150.0, 600.0, 700.0], [0.0, 0.0, 0.0, 0.0]]),
        points=torch.tensor([[0.0, 0.0], [500.0, 400.0]]),
        is_point=torch.tensor([False, True]),
        image_index=torch.tensor([0, 0]),
        clip_boxes=torch.tensor([[100.0, 150.0, 600.0, 700.0], NAN_BOX]),
    )
    with torch.no_grad():
        feats = model.embed(torch.randn(1, 3, 1024, 1024))
        out = model.decode(feats, prompts)
    assert tuple(feats.image_embeddings.shape) == (1, 256, 64, 64)
    assert [tuple(f.shape[1:]) for f in feats.clip_feats] == [
        (256, 256, 256),
        (512, 128, 128),
        (1024, 64, 64),
        (2048, 32, 32),
    ]
    assert tuple(out.low_res_logits.shape) == (2, 1, 256, 256)
    assert tuple(out.region_embeddings.shape) == (2, 1024)
    assert tuple(out.clip_embeddings.shape) == (2, 1024)
    assert out.clip_valid.shape == (2,)
    assert torch.isfinite(out.low_res_logits).all() and torch.isfinite(out.clip_embeddings).all()
    del model, feats
    gc.collect()


# ------------------------------------------------------------------ training stages


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _with_prefix(model: nn.Module, *prefixes: str) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith(prefixes)}


@pytest.fixture
def tiny() -> OVSAM:
    torch.manual_seed(0)
    return build_ovsam("ovsam_tiny")


def test_backbone_is_frozen_after_building(tiny: OVSAM) -> None:
    assert _with_prefix(tiny, "backbone.")
    assert not (_trainable(tiny) & _with_prefix(tiny, "backbone."))


def test_distillation_trains_only_the_adapter(tiny: OVSAM) -> None:
    tiny.lock_for_distillation()
    adapter = _with_prefix(tiny, "adapter.")
    assert adapter and _trainable(tiny) == adapter


def test_cotraining_trains_exactly_decoder_and_recognizer(tiny: OVSAM) -> None:
    tiny.lock_for_distillation()  # stage 1 first: stage 2 must also switch the adapter off
    tiny.lock_for_cotraining()
    expected = _with_prefix(tiny, "decoder.", "recognizer.")
    assert {n.split(".")[0] for n in expected} == {"decoder", "recognizer"}
    assert _trainable(tiny) == expected
    for name in (
        "decoder.label_token.weight",
        "decoder.label_mlp.layers.0.weight",
        "recognizer.fpn.fpn_convs.0.weight",
        "recognizer.roi_conv.weight",
        "decoder.mask_tokens.weight",
    ):
        assert name in expected
    tiny.lock_for_distillation()  # and back
    assert _trainable(tiny) == _with_prefix(tiny, "adapter.")


def test_backbone_stays_in_eval_mode_after_train(tiny: OVSAM) -> None:
    tiny.train()
    assert tiny.training and tiny.adapter.training and tiny.decoder.training and tiny.recognizer.training
    assert not any(m.training for m in tiny.backbone.modules())
    bn = [m for m in tiny.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bn
    before = [m.running_mean.clone() for m in bn]
    with torch.no_grad():
        tiny.embed(torch.randn(1, 3, 256, 256))  # a train-mode forward must not update BN statistics
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, bn))
    tiny.train(False)
    assert not tiny.training and not tiny.adapter.training


# ------------------------------------------------------------------ golden


def _load_make_golden():
    spec = importlib.util.spec_from_file_location("make_golden", GOLDEN_DIR / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ovsam_tiny_seed0_matches_golden() -> None:
    make_golden = _load_make_golden()
    stored = np.load(make_golden.GOLDEN_PATH)
    made_with = ", ".join(str(v) for v in stored["versions"])
    now = ", ".join(f"{k}=={v}" for k, v in make_golden.versions().items())
    hint = f"golden made with {made_with}; running {now}; see tests/golden/make_golden.py to regenerate"
    outputs = make_golden.golden_outputs()
    assert set(outputs) == set(stored.files) - {"versions"}
    for key, value in outputs.items():
        expected = stored[key]
        assert value.shape == expected.shape, f"{key}: {hint}"
        if key in ("labels", "clip_valid"):
            np.testing.assert_array_equal(value, expected, err_msg=f"{key}: {hint}")
        elif key == "mask_areas":  # thresholded masks: allow a few pixels at the boundary
            np.testing.assert_allclose(value, expected, rtol=5e-3, atol=3, err_msg=f"{key}: {hint}")
        else:
            np.testing.assert_allclose(
                value.astype(np.float64), expected.astype(np.float64), rtol=1e-5, atol=1e-4, err_msg=f"{key}: {hint}"
            )
