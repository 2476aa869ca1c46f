"""Both stages on Ray Train with 2 CPU workers (gloo): loss goes down, a worker failure resumes from
the last checkpoint with a continuous step count, a finished run started again resumes, and the
checkpoint exports. Local Ray with 2 CPUs; everything tiny."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ovsam_ray.data.synthetic import generate_shards
from ovsam_ray.training.config import CotrainConfig, DatasetSpec, DistillConfig, ModelSpec, OptimConfig, RunSpec
from ovsam_ray.training.networks import build_sam_teacher
from ovsam_ray.training.trainer import FAIL_ONCE_ENV, latest_checkpoint

SHAPES = ["circle", "square", "triangle", "star", "hexagon", "ellipse", "pentagon", "cross"]


@pytest.fixture(scope="module")
def ray_local(s3_server):
    # s3_server first: its (dummy) credentials are in the environment the Ray workers inherit
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ray_training")
    generate_shards(str(root / "shards"), num_images=8, images_per_shard=4, seed=5, image_size=(64, 48))
    (root / "shapes.json").write_text(json.dumps(SHAPES))
    return {"shards": str(root / "shards"), "vocab": str(root / "shapes.json"), "root": str(root)}


def _run(storage: str, name: str, max_steps: int, **kw) -> RunSpec:
    return RunSpec(
        storage_path=storage,
        name=name,
        num_workers=2,
        cpus_per_worker=0.5,
        data_cpus=0.5,
        batch_size=1,
        max_steps=max_steps,
        checkpoint_every=4,
        log_every=4,
        keep_checkpoints=20,
        **kw,
    )


def _cotrain_config(shards: dict[str, str], storage: str, max_steps: int) -> CotrainConfig:
    return CotrainConfig(
        run=_run(storage, "cotrain", max_steps, max_failures=1),
        datasets=[DatasetSpec(shards=shards["shards"], vocab=shards["vocab"])],
        model=ModelSpec(preset="ovsam_tiny", random_init=True),
        optim=OptimConfig(lr=2e-3, schedule="constant", warmup_steps=0, grad_clip=1.0, base_batch_size=None),
        num_prompts=8,
        num_points=256,
        lsj_range=(0.9, 1.1),
        min_mask_area=4,
        logit_scale=2.3,
        learn_logit_scale=True,
        train_adapter=True,
    )


def _losses(result) -> list[float]:
    df = result.metrics_dataframe.sort_values("step")
    return df["loss"].tolist()


@pytest.mark.slow
def test_cotrain_two_workers_learns_survives_a_failure_and_resumes(ray_local, shards, tmp_path):
    from ovsam_ray.training.cotrain import run_cotrain
    from ovsam_ray.training.release import export_checkpoint

    storage = str(tmp_path / "runs")
    marker = tmp_path / "failed-once"
    cfg = _cotrain_config(shards, storage, max_steps=16)
    result = run_cotrain(cfg, worker_env={FAIL_ONCE_ENV: f"9:{marker}"})
    assert result.error is None
    assert marker.exists(), "the injected worker failure happened"
    assert result.metrics["step"] == 16
    assert result.metrics["images_seen"] == 16 * 2, "steps and images continue across the restart"
    losses = _losses(result)
    assert losses[-1] < losses[0], f"co-training loss should go down: {losses}"
    names = sorted(n for n in os.listdir(os.path.join(storage, "cotrain")) if n.startswith("checkpoint_0"))
    assert names[-1] == "checkpoint_000000016" and "checkpoint_000000008" in names
    state = json.load(open(os.path.join(storage, "cotrain", names[-1], "train_state.json")))
    assert state["step"] == 16 and state["stage"] == "cotrain"
    config = json.load(open(os.path.join(storage, "cotrain", names[-1], "config.json")))
    assert config["run"]["max_steps"] == 16 and config["num_prompts"] == 8

    # the same run started again (longer): resumes at step 16, not from scratch
    again = run_cotrain(_cotrain_config(shards, storage, max_steps=20))
    assert again.error is None
    assert again.metrics["step"] == 20 and again.metrics["images_seen"] == 20 * 2
    assert latest_checkpoint(os.path.join(storage, "cotrain"))[1]["step"] == 20

    written = export_checkpoint(os.path.join(storage, "cotrain"), str(tmp_path / "weights"))
    assert {"sam2clip", "clip2sam", "sam", "clip"} <= set(written)


@pytest.mark.slow
def test_distill_two_workers_on_s3_storage_loss_goes_down(ray_local, s3_server, s3_bucket, shards, tmp_path):
    from ovsam_ray.training.distill import run_distill
    from ovsam_ray.training.release import export_checkpoint

    storage = f"s3://{s3_bucket}/runs"
    cfg = DistillConfig(
        run=_run(storage, "distill", max_steps=12, s3_endpoint=s3_server),
        datasets=[DatasetSpec(shards=shards["shards"])],
        model=ModelSpec(preset="ovsam_tiny", random_init=True),
        optim=OptimConfig(lr=2e-3, schedule="cosine", warmup_steps=0, grad_clip=1.0, base_batch_size=None),
        teacher="random_tiny",
    )
    result = run_distill(cfg)
    assert result.error is None and result.metrics["step"] == 12
    losses = _losses(result)
    assert losses[-1] < losses[0], f"distillation loss should go down: {losses}"
    url, state = latest_checkpoint(f"{storage}/distill", s3_endpoint=s3_server)
    assert url.startswith("s3://") and state["step"] == 12 and state["stage"] == "distill"
    written = export_checkpoint(f"{storage}/distill", str(tmp_path / "weights"), s3_endpoint=s3_server)
    sd = torch.load(written["sam2clip"], weights_only=True)["state_dict"]
    teacher = build_sam_teacher("random_tiny", image_size=256, out_chans=64, embed_dim=64)
    assert torch.equal(sd["neck_student.pos_embed"], teacher.pos_embed), "SAM's pos_embed was copied"


def test_dump_teacher_features_then_read_them_back(ray_local, shards, tmp_path):
    import numpy as np

    from ovsam_ray.training.batching import collate_distill, unpack_sample
    from ovsam_ray.training.distill import DumpTeacherConfig, TeacherShardWriter, dump_teacher
    from ovsam_ray.training.stream import DistillSamples, dataset_items

    out = str(tmp_path / "teacher")
    cfg = DumpTeacherConfig(shards=shards["shards"], output=out, teacher="random_tiny", preset="ovsam_tiny")
    assert dump_teacher(cfg) == {"shards": 2, "skipped": 0, "images": 8}
    assert dump_teacher(cfg)["skipped"] == 2, "a rerun skips written shards"
    spec = DatasetSpec(shards=shards["shards"], teacher_features=out)
    item = dataset_items([spec], epochs=1, seed=0)[0]
    samples = [unpack_sample(r["sample"]) for r in DistillSamples(image_size=256)(item)]
    assert len(samples) == 4 and samples[0]["teacher"].shape == (64, 16, 16)
    assert samples[0]["teacher"].dtype == np.float32, "the reference caches fp32 features"
    writer = TeacherShardWriter(cfg)
    batch = collate_distill(samples[:2])
    with torch.no_grad():
        expected = writer.teacher(batch.images)
    assert torch.allclose(batch.teacher, expected, atol=1e-5 * expected.abs().max().item())
