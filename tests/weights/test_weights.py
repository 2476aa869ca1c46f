"""Weights (DESIGN §3): the released key layout, the paper's parameter budget, strict loading of
bare and mmengine-style files (local and S3), readable errors, weights_only, SAM's decoder as
init, and our own export round trip."""

from __future__ import annotations

import gc
import json
import os
import pathlib
import shutil
from pathlib import Path

import pytest
import torch
from segment_anything.modeling.mask_decoder import MaskDecoder as SamMaskDecoder
from segment_anything.modeling.transformer import TwoWayTransformer
from torch import nn

import ovsam_ray.weights.files as weights_module
from ovsam_ray.model.mask_decoder import MaskDecoder
from ovsam_ray.model.ovsam import PromptBatch
from ovsam_ray.model.presets import build_ovsam, create_clip_model
from ovsam_ray.weights.files import (
    CLIP2SAM,
    PROMPT_ENCODER,
    SAM2CLIP,
    SAM_DECODER_INIT,
    WeightsError,
    WeightsFile,
    convert_part,
    export_part,
    load_part,
    read_weights,
)
from ovsam_ray.weights.released import export_released, load_ovsam, resolve_weights_dir, standard_file_names

# Key names and shapes of the released RN50x16 files (HarborYuan/ovsam_models) and of SAM ViT-H's
# prompt encoder, as the files store them (DESIGN §3).
LAYOUT_PATH = Path(__file__).parents[1] / "golden" / "ovsam_checkpoint_layout.json"
SAM2CLIP_FILE = "sam2clip_vith_rn50x16.pth"
CLIP2SAM_FILE = "clip2sam_coco_rn50x16.pth"
HF = "huggingface.co/HarborYuan/ovsam_models"


@pytest.fixture(scope="module")
def layout() -> dict[str, dict[str, list[int]]]:
    files = json.loads(LAYOUT_PATH.read_text())["files"]
    sam = next(v for k, v in files.items() if k.startswith("sam_vit_h"))
    return {"sam2clip": files[SAM2CLIP_FILE], "clip2sam": files[CLIP2SAM_FILE], "sam": sam}


# ------------------------------------------------------------------ released layout (RN50x16, build only)


@pytest.fixture(scope="module")
def rn50x16():
    model = build_ovsam("ovsam_rn50x16")
    yield model
    del model
    gc.collect()


@pytest.mark.parametrize("part_name,part", [("sam2clip", SAM2CLIP), ("clip2sam", CLIP2SAM), ("sam", PROMPT_ENCODER)])
def test_export_part_equals_the_released_layout(rn50x16, layout, part_name: str, part) -> None:
    exported = {k: list(v.shape) for k, v in export_part(rn50x16.state_dict(), part).items()}
    expected = layout[part_name]
    assert sorted(set(exported) - set(expected)) == []  # no key the released file lacks
    assert sorted(set(expected) - set(exported)) == []  # no released key we lack
    assert {k: v for k, v in exported.items() if v != expected[k]} == {}


def test_parameter_budget_matches_the_paper(rn50x16) -> None:
    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    # DESIGN §2: SAM2CLIP 129M, CLIP2SAM 3.8M + decoder 4.0M, 304M in total with the frozen CLIP.
    assert count(rn50x16.adapter) == pytest.approx(129e6, rel=0.02)
    assert count(rn50x16.decoder) + count(rn50x16.recognizer) == pytest.approx(7.8e6, rel=0.02)
    assert count(rn50x16) == pytest.approx(304e6, rel=0.02)


# ------------------------------------------------------------------ rn50_small round trip from layout keys


def _model_key(key: str, part) -> str:
    converted = convert_part({key: torch.empty(0)}, part)
    assert len(converted) == 1, f"layout key {key} is outside the {part.name} part"
    return next(iter(converted))


def _random_file(keys, part, model_state: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random tensors under the released file's keys, with the shapes of ``model_state``."""
    out = {}
    for key in keys:
        model_key = _model_key(key, part)
        assert model_key in model_state, f"layout key {key} -> {model_key} is not in the model"
        out[key] = torch.randn(model_state[model_key].shape, generator=gen)
    return out


UNRELATED = {
    "image_encoder.patch_embed.proj.weight": torch.ones(2, 3),  # SAM's image encoder (teacher)
    "backbone.visual.conv1.weight": torch.ones(2),
    "data_preprocessor.mean": torch.ones(3),
}


@pytest.fixture(scope="module")
def rn50_small_files(layout, tmp_path_factory):
    """Random weights in the released layout (rn50_small shapes): a folder of bare files passed one
    by one, and a folder of mmengine-style files with the standard names."""
    gen = torch.Generator().manual_seed(0)
    clip = create_clip_model("ovsam_rn50_small")
    clip_state = {k: v.clone() for k, v in clip.state_dict().items()}
    state = build_ovsam("ovsam_rn50_small", clip).state_dict()
    parts = {
        "sam": _random_file(layout["sam"], PROMPT_ENCODER, state, gen),
        "sam2clip": _random_file(layout["sam2clip"], SAM2CLIP, state, gen),
        "clip2sam": _random_file(layout["clip2sam"], CLIP2SAM, state, gen),
    }
    bare = tmp_path_factory.mktemp("rn50_bare")
    paths = {"clip": str(bare / "clip.pt")}
    torch.save(clip_state, paths["clip"])
    for name, sd in parts.items():
        paths[name] = str(bare / f"{name}.pth")
        # The SAM file holds ONLY prompt_encoder.*; the others carry unrelated keys to ignore.
        torch.save(sd if name == "sam" else {**sd, **UNRELATED}, paths[name])

    mm = tmp_path_factory.mktemp("rn50_mmengine")
    names = standard_file_names("ovsam_rn50_small", "coco")
    os.symlink(paths["clip"], mm / names["clip"][0])  # clip_rn50.pth
    sam_full = {**parts["sam"], "mask_decoder.iou_token.weight": torch.ones(1, 256), **UNRELATED}
    for name, sd in (("sam", sam_full), ("sam2clip", parts["sam2clip"]), ("clip2sam", parts["clip2sam"])):
        payload = {
            "state_dict": {**sd, **UNRELATED},
            "meta": {"epoch": 12, "note": "mmengine"},
            "optimizer": {"param_groups": [{"lr": 1e-4}]},
        }
        torch.save(payload, mm / names[name][0])

    expected = {}
    for key in state:
        if key.startswith("backbone.visual."):
            expected[key] = clip_state[key.removeprefix("backbone.")]
    for name, part in (("sam", PROMPT_ENCODER), ("sam2clip", SAM2CLIP), ("clip2sam", CLIP2SAM)):
        expected.update(convert_part(parts[name], part))
    assert set(expected) == set(state)  # the three files plus CLIP cover the whole model
    del clip, state
    return paths, str(mm), expected


def _assert_state_equal(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(expected)
    different = [k for k in got if not torch.equal(got[k], expected[k])]
    assert different == []


def test_rn50_small_loads_released_layout_bare_files(rn50_small_files) -> None:
    paths, _, expected = rn50_small_files
    loaded = load_ovsam(
        "ovsam_rn50_small", sam=paths["sam"], clip=paths["clip"], sam2clip=paths["sam2clip"], clip2sam=paths["clip2sam"]
    )
    assert not loaded.random_init
    assert set(loaded.files) == {"sam", "clip", "sam2clip", "clip2sam"}
    assert all(len(f["sha256"]) == 64 for f in loaded.files.values())
    _assert_state_equal(loaded.model, expected)
    del loaded
    gc.collect()


def test_rn50_small_loads_mmengine_files_from_a_weights_dir(rn50_small_files) -> None:
    _, directory, expected = rn50_small_files
    resolved = resolve_weights_dir(directory, "ovsam_rn50_small")
    assert {k: os.path.basename(v) for k, v in resolved.items()} == {
        "sam": "sam_vit_h_4b8939.pth",
        "clip": "clip_rn50.pth",
        "sam2clip": "sam2clip_vith_rn50.pth",
        "clip2sam": "clip2sam_coco_rn50.pth",
    }
    loaded = load_ovsam("ovsam_rn50_small", weights=directory)
    _assert_state_equal(loaded.model, expected)
    del loaded
    gc.collect()


# ------------------------------------------------------------------ tiny export round trip and errors


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    torch.manual_seed(0)
    clip = create_clip_model("ovsam_tiny")
    model = build_ovsam("ovsam_tiny", clip).eval()
    with torch.no_grad():  # move off the default init so that a missed part cannot pass by luck
        for p in list(model.decoder.parameters()) + list(model.prompt_encoder.parameters()):
            p.add_(0.01 * torch.randn_like(p))
        model.adapter.pos_embed.normal_()
    directory = tmp_path_factory.mktemp("tiny_export")
    written = export_released(
        model, str(directory), "ovsam_tiny", train_vocab="shapes", meta={"step": 7, "vocabulary": None}, clip_model=clip
    )
    return model, str(directory), written


def _tiny_inputs() -> tuple[torch.Tensor, PromptBatch]:
    g = torch.Generator().manual_seed(3)
    prompts = PromptBatch(
        boxes=torch.tensor([[10.0, 20.0, 120.0, 200.0], [0.0, 0.0, 0.0, 0.0]]),
        points=torch.tensor([[0.0, 0.0], [64.0, 100.0]]),
        is_point=torch.tensor([False, True]),
        image_index=torch.tensor([0, 0]),
        clip_boxes=torch.tensor([[10.0, 20.0, 120.0, 200.0], [float("nan")] * 4]),
    )
    return torch.randn(1, 3, 256, 256, generator=g), prompts


def test_export_released_writes_the_standard_names(tiny_export) -> None:
    _, directory, written = tiny_export
    assert {k: os.path.basename(v) for k, v in written.items()} == {
        "sam2clip": "sam2clip_vith_tiny.pth",
        "clip2sam": "clip2sam_shapes_tiny.pth",
        "sam": "sam_prompt_encoder_tiny.pth",
        "clip": "clip_tiny.pth",
    }
    f = read_weights(written["sam2clip"])
    assert all(k.startswith("neck_student.") for k in f.state_dict)
    assert f.meta["step"] == 7 and f.meta["part"] == "sam2clip" and f.meta["preset"] == "ovsam_tiny"
    assert all(k.startswith(("fpn_neck.", "mask_decoder.")) for k in read_weights(written["clip2sam"]).state_dict)


def test_export_released_load_round_trip_gives_identical_outputs(tiny_export) -> None:
    model, directory, _ = tiny_export
    loaded = load_ovsam("ovsam_tiny", weights=directory, train_vocab="shapes")
    assert not loaded.random_init and loaded.train_vocab == "shapes"
    assert loaded.meta["step"] == 7 and loaded.meta["part"] == "clip2sam"
    _assert_state_equal(loaded.model, model.state_dict())
    images, prompts = _tiny_inputs()
    with torch.no_grad():
        a, b = model(images, prompts), loaded.model(images, prompts)
    for name in ("low_res_logits", "region_embeddings", "clip_embeddings", "clip_valid", "roi_boxes"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_load_from_s3(tiny_export, s3_server, s3_bucket, tmp_path, monkeypatch) -> None:
    from ovsam_ray.storage import get_filesystem

    model, directory, _ = tiny_export
    prefix = f"s3://{s3_bucket}/weights/tiny"
    fs, root = get_filesystem(prefix, s3_endpoint=s3_server)
    for name in os.listdir(directory):
        fs.put_file(os.path.join(directory, name), f"{root}/{name}")
    monkeypatch.setattr(weights_module, "_LOCAL_CACHE", tmp_path / "cache")
    loaded = load_ovsam("ovsam_tiny", weights=prefix + "/", train_vocab="shapes", s3_endpoint=s3_server)
    assert loaded.files["sam2clip"]["path"] == f"{prefix}/sam2clip_vith_tiny.pth"
    _assert_state_equal(loaded.model, model.state_dict())
    assert len(list((tmp_path / "cache").iterdir())) == 4  # remote files are cached locally
    with pytest.raises(WeightsError, match="lacks files"):
        load_ovsam("ovsam_tiny", weights=f"s3://{s3_bucket}/nothing", s3_endpoint=s3_server)


def _copy_dir(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit(path: Path, edit) -> None:
    payload = torch.load(path, weights_only=True)
    edit(payload["state_dict"])
    torch.save(payload, path)


def test_missing_key_error_names_file_key_and_where_published(tiny_export, tmp_path) -> None:
    d = _copy_dir(tiny_export[1], tmp_path / "w")
    path = d / "sam2clip_vith_tiny.pth"
    _edit(path, lambda sd: sd.pop("neck_student.blocks.0.norm1.weight"))
    with pytest.raises(WeightsError) as info:
        load_ovsam("ovsam_tiny", weights=str(d), train_vocab="shapes")
    message = str(info.value)
    assert str(path) in message
    assert "missing keys (1): neck_student.blocks.0.norm1.weight" in message  # file layout naming
    assert "adapter." not in message
    assert HF in message


def test_unexpected_and_missing_keys_are_named_in_file_layout(tiny_export, tmp_path) -> None:
    d = _copy_dir(tiny_export[1], tmp_path / "w")
    path = d / "clip2sam_shapes_tiny.pth"
    old = "mask_decoder.mask_decoder.mask_tokens.weight"
    _edit(path, lambda sd: sd.__setitem__("mask_decoder.mask_decoder.mask_token.weight", sd.pop(old)))
    with pytest.raises(WeightsError) as info:
        load_ovsam("ovsam_tiny", weights=str(d), train_vocab="shapes")
    message = str(info.value)
    assert str(path) in message
    assert f"missing keys (1): {old}" in message
    assert "unexpected keys (1): mask_decoder.mask_decoder.mask_token.weight" in message
    assert HF in message


def test_shape_mismatch_is_reported(tiny_export, tmp_path) -> None:
    d = _copy_dir(tiny_export[1], tmp_path / "w")
    path = d / "sam2clip_vith_tiny.pth"
    _edit(path, lambda sd: sd.__setitem__("neck_student.level_encoding.weight", torch.zeros(4, 65)))
    with pytest.raises(WeightsError) as info:
        load_ovsam("ovsam_tiny", weights=str(d), train_vocab="shapes")
    message = str(info.value)
    assert str(path) in message and "shape mismatches (1)" in message
    assert "neck_student.level_encoding.weight: file (4, 65) vs model (4, 64)" in message


def test_missing_file_in_weights_dir(tiny_export, tmp_path) -> None:
    d = _copy_dir(tiny_export[1], tmp_path / "w")
    os.remove(d / "sam2clip_vith_tiny.pth")
    with pytest.raises(WeightsError, match=r"sam2clip: one of \['sam2clip_vith_tiny.pth'\]"):
        load_ovsam("ovsam_tiny", weights=str(d), train_vocab="shapes")
    # The clip2sam file is looked up by the training vocabulary's name.
    with pytest.raises(WeightsError, match="clip2sam_coco_tiny.pth"):
        load_ovsam("ovsam_tiny", weights=tiny_export[1], train_vocab="coco")


def test_explicit_file_overrides_the_weights_dir(tiny_export, tmp_path) -> None:
    d = _copy_dir(tiny_export[1], tmp_path / "w")
    _edit(d / "sam2clip_vith_tiny.pth", lambda sd: sd["neck_student.level_encoding.weight"].fill_(3.0))
    loaded = load_ovsam(
        "ovsam_tiny", weights=tiny_export[1], sam2clip=str(d / "sam2clip_vith_tiny.pth"), train_vocab="shapes"
    )
    assert torch.equal(loaded.model.adapter.level_encoding.weight, torch.full((4, 64), 3.0))


def test_resolve_weights_dir_prefers_the_first_standard_name(tmp_path) -> None:
    for name in (
        "sam_prompt_encoder_tiny.pth",
        "sam_vit_h_4b8939.pth",
        "clip_tiny.pth",
        "sam2clip_vith_tiny.pth",
        "clip2sam_lvis_tiny.pth",
        "unrelated.txt",
    ):
        (tmp_path / name).write_bytes(b"")
    found = resolve_weights_dir(str(tmp_path), "ovsam_tiny", train_vocab="lvis")
    assert found == {
        "sam": f"{tmp_path}/sam_vit_h_4b8939.pth",
        "clip": f"{tmp_path}/clip_tiny.pth",
        "sam2clip": f"{tmp_path}/sam2clip_vith_tiny.pth",
        "clip2sam": f"{tmp_path}/clip2sam_lvis_tiny.pth",
    }
    assert standard_file_names("ovsam_rn50x16")["clip"][:2] == ["clip_rn50x16.pth", "RN50x16.pth"]


class _Payload:
    """Unpickling this (without weights_only) would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_non_tensor_pickle_is_refused(tmp_path) -> None:
    marker = tmp_path / "code-was-run"
    path = tmp_path / "sam2clip.pth"
    torch.save({"state_dict": {"neck_student.pos_embed": _Payload(marker)}}, path)
    with pytest.raises(WeightsError, match="cannot read weights file") as info:
        read_weights(str(path), what="sam2clip")
    assert str(path) in str(info.value) and HF in str(info.value)
    assert not marker.exists()
    # Plain non-tensor values load under weights_only but are no state dict.
    torch.save({"neck_student.pos_embed": 1.5, "epoch": 3}, path)
    with pytest.raises(WeightsError, match="not a state dict of tensors"):
        read_weights(str(path))


def test_unreadable_and_absent_files(tmp_path) -> None:
    path = tmp_path / "truncated.pth"
    torch.save({"a": torch.ones(3)}, path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(WeightsError, match="cannot read weights file"):
        read_weights(str(path))
    with pytest.raises(WeightsError, match="not found"):
        read_weights(str(tmp_path / "absent.pth"))


def test_load_ovsam_without_weights_says_how_to_fix() -> None:
    with pytest.raises(WeightsError, match="random-init"):
        load_ovsam("ovsam_tiny")


# ------------------------------------------------------------------ SAM's mask decoder as init


def _fake_sam_state(dim: int, mlp_dim: int, heads: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(5)
    decoder = SamMaskDecoder(
        transformer_dim=dim,
        transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=mlp_dim, num_heads=heads),
        num_multimask_outputs=3,
        iou_head_depth=3,
        iou_head_hidden_dim=dim,
    )
    state = {f"mask_decoder.{k}": v for k, v in decoder.state_dict().items()}
    state["prompt_encoder.no_mask_embed.weight"] = torch.ones(1, dim)
    state["image_encoder.pos_embed"] = torch.ones(1, 4, 4, 8)
    return state


def test_sam_vit_h_mask_decoder_converts_to_the_first_mask_token_without_iou() -> None:
    sam = _fake_sam_state(256, 2048, 8)
    assert sam["mask_decoder.mask_tokens.weight"].shape == (4, 256)
    assert any(k.startswith("mask_decoder.iou_prediction_head.") for k in sam)
    converted = convert_part(sam, SAM_DECODER_INIT)
    ours = MaskDecoder(transformer_dim=256, label_dim=768).state_dict()
    expected = {f"decoder.{k}" for k in ours if not k.startswith(("label_token", "label_mlp"))}
    assert set(converted) == expected
    assert not any("iou" in k for k in converted)
    assert converted["decoder.mask_tokens.weight"].shape == (1, 256)
    assert torch.equal(converted["decoder.mask_tokens.weight"][0], sam["mask_decoder.mask_tokens.weight"][0])
    for k, v in converted.items():
        assert v.shape == ours[k.removeprefix("decoder.")].shape, k
    assert torch.equal(
        converted["decoder.output_hypernetworks_mlps.0.layers.0.weight"],
        sam["mask_decoder.output_hypernetworks_mlps.0.layers.0.weight"],
    )


def test_sam_decoder_init_loads_strictly_into_the_model() -> None:
    torch.manual_seed(0)
    model = build_ovsam("ovsam_tiny")
    label_token = model.decoder.label_token.weight.clone()
    sam = _fake_sam_state(64, 256, 4)  # the tiny decoder's dims
    load_part(model, WeightsFile(path="sam_vit_tiny.pth", state_dict=sam), SAM_DECODER_INIT)
    assert torch.equal(model.decoder.mask_tokens.weight, sam["mask_decoder.mask_tokens.weight"][:1])
    assert torch.equal(
        model.decoder.transformer.layers[0].self_attn.q_proj.weight,
        sam["mask_decoder.transformer.layers.0.self_attn.q_proj.weight"],
    )
    assert torch.equal(model.decoder.label_token.weight, label_token)  # not part of SAM: untouched
    sam.pop("mask_decoder.transformer.final_attn_token_to_image.out_proj.bias")
    with pytest.raises(WeightsError, match="mask_decoder.transformer.final_attn_token_to_image.out_proj.bias"):
        load_part(model, WeightsFile(path="sam_vit_tiny.pth", state_dict=sam), SAM_DECODER_INIT)


# ------------------------------------------------------------------ one resolver and loader for every stack


def test_find_files_takes_the_first_candidate_present_and_globs(tmp_path) -> None:
    for name in ("b.pth", "clip2sam_lvis_tiny.pth", "clip2sam_coco_tiny.pth", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    found = weights_module.find_files(
        str(tmp_path) + "/", {"x": ["a.pth", "b.pth"], "c2s": ["clip2sam_*.pth"], "none": ["z.pth"]}
    )
    assert found == {"x": f"{tmp_path}/b.pth", "c2s": f"{tmp_path}/clip2sam_coco_tiny.pth"}  # sorted: coco first
    assert weights_module.find_files(str(tmp_path / "absent"), {"x": ["b.pth"]}) == {}


def test_training_resolves_and_loads_with_the_inference_loader(tiny_export, tmp_path) -> None:
    """``build_training_model`` finds the files as ``load_ovsam`` does (any vocabulary's
    clip2sam file), loads them to the same weights, and fails with the same errors."""
    from ovsam_ray.training.config import ModelSpec
    from ovsam_ray.training.networks import build_training_model

    model, directory, _ = tiny_export
    trained, _, files = build_training_model(ModelSpec(preset="ovsam_tiny", weights=directory), stage="cotrain")
    assert sorted(files) == ["clip", "clip2sam", "sam", "sam2clip"]
    assert files["clip2sam"] == f"{directory}/clip2sam_shapes_tiny.pth"
    _assert_state_equal(trained, model.state_dict())

    d = _copy_dir(directory, tmp_path / "w")
    _edit(d / "sam2clip_vith_tiny.pth", lambda sd: sd.pop("neck_student.blocks.0.norm1.weight"))
    with pytest.raises(WeightsError, match="missing keys \\(1\\): neck_student.blocks.0.norm1.weight"):
        build_training_model(ModelSpec(preset="ovsam_tiny", weights=str(d)), stage="cotrain")
    (d / "clip_tiny.pth").write_bytes(b"not a state dict")
    with pytest.raises(WeightsError, match=f"cannot load CLIP weights {d}/clip_tiny.pth for ovsam_tiny"):
        build_training_model(ModelSpec(preset="ovsam_tiny", weights=str(d)), stage="distill")


def test_local_dir_gives_a_local_folder_as_it_is(tmp_path) -> None:
    assert weights_module.local_dir(str(tmp_path)) == str(tmp_path)
    assert weights_module.local_dir(f"file://{tmp_path}") == str(tmp_path)
    with pytest.raises(WeightsError, match="weights folder not found"):
        weights_module.local_dir(str(tmp_path / "absent"))


def test_local_dir_copies_an_s3_prefix_once_per_version(s3_server, s3_bucket, tmp_path, monkeypatch) -> None:
    from ovsam_ray.storage import get_filesystem

    monkeypatch.setattr(weights_module, "_LOCAL_CACHE", tmp_path / "cache")
    prefix = f"s3://{s3_bucket}/detectors/detr"
    fs, root = get_filesystem(prefix, s3_endpoint=s3_server)
    fs.pipe_file(f"{root}/config.json", b"{}")
    fs.pipe_file(f"{root}/model.safetensors", b"weights-1")
    fs.pipe_file(f"{root}/sub/extra.txt", b"x")
    fs.pipe_file(f"{root}-other/not-this.txt", b"y")  # a sibling prefix sharing the name's start

    local = weights_module.local_dir(prefix + "/", s3_endpoint=s3_server)
    files = sorted(str(p.relative_to(local)) for p in Path(local).rglob("*") if p.is_file())
    assert files == ["config.json", "model.safetensors", "sub/extra.txt"]
    assert (Path(local) / "model.safetensors").read_bytes() == b"weights-1"
    assert weights_module.local_dir(prefix, s3_endpoint=s3_server) == local  # cached: no second copy

    fs.pipe_file(f"{root}/model.safetensors", b"weights-22")  # a new version is copied again
    again = weights_module.local_dir(prefix, s3_endpoint=s3_server)
    assert again != local and (Path(again) / "model.safetensors").read_bytes() == b"weights-22"
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".part")]
    with pytest.raises(WeightsError, match="holds no files"):
        weights_module.local_dir(f"s3://{s3_bucket}/nothing", s3_endpoint=s3_server)
