"""Training configs validate themselves; the CLI maps flags one to one onto them."""

from __future__ import annotations

import argparse

import pytest

from ovsam_ray.cli.train import (
    add_train_subcommands,
    cotrain_config_from_args,
    distill_config_from_args,
    parse_dataset,
)
from ovsam_ray.training.config import CotrainConfig, DatasetSpec, DistillConfig, ModelSpec, OptimConfig, RunSpec
from ovsam_ray.training.optim import lr_factor


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ovsam-ray")
    add_train_subcommands(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cotrain_flags_map_onto_the_config():
    args = _parser().parse_args(
        [
            "train",
            "cotrain",
            "--storage-path",
            "s3://b/runs",
            "--name",
            "c1",
            "--num-workers",
            "4",
            "--use-gpu",
            "--batch-size",
            "2",
            "--grad-accum",
            "3",
            "--max-steps",
            "900",
            "--max-failures",
            "2",
            "--dataset",
            "s3://b/coco/{000000..000009}.tar|vocab=coco_ov",
            "--dataset",
            "s3://b/in22k/|kind=image|ratio=0.25",
            "--preset",
            "ovsam_rn50x16",
            "--weights",
            "s3://b/w",
            "--lr",
            "2e-4",
            "--lr-milestones",
            "0.5",
            "0.9",
            "--num-prompts",
            "20",
            "--lsj-range",
            "0.5",
            "1.5",
            "--learn-logit-scale",
        ]
    )
    cfg = cotrain_config_from_args(args)
    assert args.func.__name__ == "_cotrain"
    assert cfg.run == RunSpec(
        storage_path="s3://b/runs",
        name="c1",
        num_workers=4,
        use_gpu=True,
        batch_size=2,
        grad_accum=3,
        max_steps=900,
        max_failures=2,
    )
    assert cfg.datasets[0] == DatasetSpec(shards="s3://b/coco/{000000..000009}.tar", vocab="coco_ov")
    assert cfg.datasets[1].kind == "image" and cfg.datasets[1].ratio == 0.25
    assert cfg.model == ModelSpec(preset="ovsam_rn50x16", weights="s3://b/w")
    assert cfg.optim.lr == 2e-4 and cfg.optim.lr_milestones == (0.5, 0.9) and cfg.optim.schedule == "step"
    assert cfg.num_prompts == 20 and cfg.lsj_range == (0.5, 1.5) and cfg.learn_logit_scale
    assert CotrainConfig.from_dict(cfg.to_dict()) == cfg


def test_distill_flags_and_defaults():
    args = _parser().parse_args(
        [
            "train",
            "distill",
            "--storage-path",
            "/tmp/r",
            "--name",
            "d",
            "--dataset",
            "/data/sa1b",
            "--teacher",
            "vit_b",
            "--teacher-checkpoint",
            "/w/sam_vit_b.pth",
            "--clip",
            "/w/RN50x16.pt",
        ]
    )
    cfg = distill_config_from_args(args)
    assert cfg.teacher == "vit_b" and cfg.optim.schedule == "cosine" and cfg.model.clip == "/w/RN50x16.pt"
    assert DistillConfig.from_dict(cfg.to_dict()) == cfg
    for sub in (
        ["export", "--run", "r", "--output", "o"],
        ["tiny-recipe", "--work-dir", "w"],
        ["dump-teacher", "--shards", "s", "--output", "o", "--teacher", "random_tiny"],
    ):
        assert callable(_parser().parse_args(["train", *sub]).func)


def test_dataset_spec_parsing_and_errors():
    assert parse_dataset('{"shards": "x", "kind": "image"}').kind == "image"
    with pytest.raises(argparse.ArgumentTypeError):
        parse_dataset("x|ratio")
    with pytest.raises(argparse.ArgumentTypeError, match="kind"):
        parse_dataset("x|kind=video")


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"name": "a/b"}, "name"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_failures": -2}, "max_failures"),
        ({"cpus_per_worker": 0}, "cpus_per_worker"),
    ],
)
def test_run_spec_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        RunSpec(**{"storage_path": "/tmp/x", "name": "n", **bad})


def test_config_validation_says_how_to_fix():
    run = RunSpec(storage_path="/tmp/x", name="n")
    with pytest.raises(ValueError, match="teacher"):
        DistillConfig(run=run, datasets=[DatasetSpec(shards="x")])
    with pytest.raises(ValueError, match="segmentation"):
        CotrainConfig(run=run, datasets=[DatasetSpec(shards="x", kind="image")])
    with pytest.raises(ValueError, match="lsj_range"):
        CotrainConfig(run=run, datasets=[DatasetSpec(shards="x")], lsj_range=(2.0, 1.0))
    with pytest.raises(ValueError, match="preset"):
        ModelSpec(preset="nope")
    with pytest.raises(ValueError, match="schedule"):
        OptimConfig(schedule="linear")
    with pytest.raises(ValueError, match="unknown"):
        CotrainConfig.from_dict({"run": run, "datasets": [{"shards": "x"}], "bogus": 1})


def test_lr_schedules():
    step = OptimConfig(warmup_steps=10, warmup_factor=0.001)
    assert lr_factor(0, 0.0, step) == pytest.approx(0.001)
    assert lr_factor(10, 0.1, step) == 1.0
    assert lr_factor(100, 8 / 12, step) == pytest.approx(0.1)
    assert lr_factor(100, 11 / 12, step) == pytest.approx(0.01)
    cosine = OptimConfig(schedule="cosine", warmup_steps=0)
    assert lr_factor(0, 0.0, cosine) == 1.0 and lr_factor(5, 0.5, cosine) == pytest.approx(0.5)
    assert lr_factor(10, 1.0, cosine) == pytest.approx(0.0)


def test_optimizer_gives_the_temperature_and_the_recognizer_their_own_lr_and_no_decay_to_vectors():
    import torch

    from ovsam_ray.model.presets import build_ovsam
    from ovsam_ray.training.networks import CotrainNet
    from ovsam_ray.training.optim import build_optimizer

    text = torch.nn.functional.normalize(torch.randn(3, 1, 64), dim=-1)
    net = CotrainNet(
        build_ovsam("ovsam_tiny"),
        text_embeddings=text,
        logit_scale=4.6,
        learn_logit_scale=True,
        logit_scale_lr=0.01,
        recognizer_lr=3e-3,
    )
    opt = build_optimizer(net, OptimConfig(lr=1e-4, weight_decay=0.05, no_decay=("1d",)))
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}
    assert len(group_of) == len(trainable) == sum(len(g["params"]) for g in opt.param_groups)
    for name, p in trainable.items():
        group = group_of[id(p)]
        expected = 0.01 if name == "log_scale" else 3e-3 if name.startswith("model.recognizer.") else 1e-4
        assert group["lr"] == expected, name
        assert group["weight_decay"] == (0.0 if p.ndim <= 1 or name == "log_scale" else 0.05), name
    assert any(n.startswith("model.recognizer.") for n in trainable)
    assert opt.defaults["fused"]  # one fused AdamW kernel (CPU or CUDA floating-point parameters)


def test_adamw_falls_back_to_the_unfused_kernel_when_a_parameter_cannot_be_fused():
    import torch

    from ovsam_ray.training.optim import adamw

    floats = [torch.nn.Parameter(torch.randn(3))]
    assert adamw(floats, lr=1e-3).defaults["fused"]
    assert adamw([{"params": floats}], lr=1e-3).defaults["fused"]
    meta = [torch.nn.Parameter(torch.randn(3, device="meta"))]
    assert not adamw(meta, lr=1e-3).defaults["fused"]
