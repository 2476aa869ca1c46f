"""SAM2CLIP distillation pieces without Ray: the teacher, pos_embed copy, the local loop."""

from __future__ import annotations

import pytest
import torch

from ovsam_ray.data.synthetic import generate_shards
from ovsam_ray.model.presets import build_ovsam
from ovsam_ray.training.config import DatasetSpec, DistillConfig, ModelSpec, OptimConfig, RunSpec
from ovsam_ray.training.distill import distill_setup
from ovsam_ray.training.loop import Runtime
from ovsam_ray.training.networks import build_sam_teacher, copy_teacher_pos_embed
from ovsam_ray.training.stream import DistillSamples
from ovsam_ray.training.trainer import run_local
from ovsam_ray.weights.files import WeightsError


def test_random_teacher_shapes_and_pos_embed_copy():
    teacher = build_sam_teacher("random_tiny", image_size=256, out_chans=64, embed_dim=64)
    assert not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        assert teacher(torch.zeros(2, 3, 256, 256)).shape == (2, 64, 16, 16)
    model = build_ovsam("ovsam_tiny")
    assert copy_teacher_pos_embed(model, teacher)
    assert torch.equal(model.adapter.pos_embed, teacher.pos_embed)
    narrow = build_sam_teacher("random_tiny", image_size=256, out_chans=64, embed_dim=32)
    before = model.adapter.pos_embed.clone()
    assert not copy_teacher_pos_embed(model, narrow)
    assert torch.equal(model.adapter.pos_embed, before)


def test_sam_teacher_checkpoint_must_fit(tmp_path):
    path = tmp_path / "sam_vit_b_bad.pth"
    torch.save({"image_encoder.not_a_key": torch.zeros(1)}, path)
    with pytest.raises(WeightsError, match="does not fit"):
        build_sam_teacher("vit_b", str(path))
    with pytest.raises(WeightsError, match="checkpoint"):
        build_sam_teacher("vit_l", None)


@pytest.mark.slow
def test_local_distillation_reduces_the_loss(tmp_path):
    shards = str(tmp_path / "shards")
    generate_shards(shards, num_images=4, images_per_shard=4, seed=2, image_size=(64, 48))
    cfg = DistillConfig(
        run=RunSpec(
            storage_path=str(tmp_path / "runs"), name="d", batch_size=2, max_steps=8, checkpoint_every=8, log_every=1
        ),
        datasets=[DatasetSpec(shards=shards)],
        model=ModelSpec(preset="ovsam_tiny", random_init=True),
        optim=OptimConfig(lr=3e-3, schedule="constant", warmup_steps=0, grad_clip=1.0, base_batch_size=None),
        teacher="random_tiny",
    )
    losses = []
    state, net = run_local(
        "distill", cfg, distill_setup, DistillSamples(image_size=256), on_report=lambda m: losses.append(m["loss"])
    )
    assert state.step == 8 and len(losses) == 8
    assert losses[-1] < losses[0]
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.adapter.") for n in trainable)


def test_precomputed_features_need_the_position_embedding_from_a_file(tmp_path):
    """No silent zero pos_embed: without --teacher-checkpoint the config names the fix; with
    --teacher-pos-embed the adapter gets it (the reference reads it from SAM,
    seg/models/necks/transformer_neck.py:63-73)."""
    run = RunSpec(storage_path=str(tmp_path), name="d", max_steps=1)
    features = [DatasetSpec(shards="s", teacher_features="f")]
    model = ModelSpec(preset="ovsam_tiny", random_init=True)
    with pytest.raises(ValueError, match="--teacher-checkpoint .* or --teacher-pos-embed"):
        DistillConfig(run=run, datasets=features, model=model)
    pos = torch.randn(1, 16, 16, 64)
    torch.save({"image_encoder.pos_embed": pos}, tmp_path / "pos.pth")
    cfg = DistillConfig(run=run, datasets=features, model=model, teacher_pos_embed=str(tmp_path / "pos.pth"))
    net = distill_setup(cfg, Runtime()).net
    assert torch.equal(net.model.adapter.pos_embed, pos)
    torch.save({"pos_embed": torch.randn(1, 8, 8, 64)}, tmp_path / "wrong.pth")
    cfg = DistillConfig(run=run, datasets=features, model=model, teacher_pos_embed=str(tmp_path / "wrong.pth"))
    with pytest.raises(ValueError, match="wrong.pth"):
        distill_setup(cfg, Runtime())
