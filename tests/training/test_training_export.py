"""Checkpoints, export and the evaluator, in-process (no Ray): a short local co-training run is
exported in the released layout and ``load_ovsam`` / ``build_predictor`` reproduce the in-memory
model's outputs; a started-again local run resumes; the metrics of the demo are right."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch

from ovsam_ray.data.synthetic import generate_shards
from ovsam_ray.errors import ConfigError
from ovsam_ray.inference import ModelConfig, build_predictor
from ovsam_ray.model.classifier import OpenVocabClassifier
from ovsam_ray.model.predictor import ImagePrompts, OVSAMPredictor
from ovsam_ray.training.config import CotrainConfig, DatasetSpec, ModelSpec, OptimConfig, RunSpec
from ovsam_ray.training.cotrain import cotrain_setup, sample_builder
from ovsam_ray.training.release import export_checkpoint
from ovsam_ray.training.trainer import CONFIG_FILE, latest_checkpoint, run_local
from ovsam_ray.weights.released import load_ovsam

SHAPES = ["circle", "square", "triangle", "star", "hexagon", "ellipse", "pentagon", "cross"]
HELD_OUT = ("pentagon", "cross")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("export")
    shards = str(root / "shards")
    generate_shards(shards, num_images=4, images_per_shard=4, seed=11, image_size=(64, 48))
    vocab = root / "shapes.json"
    # the last two shapes are held out of co-training, as COCO's novel classes (DatasetSpec.split="base")
    classes = [{"name": n, "seen": n not in HELD_OUT} for n in SHAPES]
    vocab.write_text(json.dumps({"name": "shapes", "classes": classes}))
    cfg = CotrainConfig(
        run=RunSpec(storage_path=str(root / "runs"), name="local", batch_size=2, max_steps=2, checkpoint_every=2),
        datasets=[DatasetSpec(shards=shards, vocab=str(vocab))],
        model=ModelSpec(preset="ovsam_tiny", random_init=True),
        optim=OptimConfig(lr=1e-2, warmup_steps=0, grad_clip=1.0, base_batch_size=None),
        num_prompts=4,
        num_points=64,
        learn_logit_scale=True,
        logit_scale=2.0,
        train_adapter=True,
    )
    state, net = run_local("cotrain", cfg, cotrain_setup, sample_builder(cfg))
    weights = str(root / "weights")
    written = export_checkpoint(cfg.run.run_url, weights)
    return {
        "cfg": cfg,
        "state": state,
        "net": net,
        "weights": weights,
        "written": written,
        "shards": shards,
        "root": root,
    }


def test_local_run_checkpoints_and_exports_the_released_layout(trained):
    assert trained["state"].step == 2
    found = latest_checkpoint(trained["cfg"].run.run_url)
    assert found is not None and found[1]["step"] == 2
    names = sorted(os.path.basename(p) for p in trained["written"].values())
    assert names == [
        "clip2sam_shapes_tiny.pth",
        "clip_tiny.pth",
        "sam2clip_vith_tiny.pth",
        "sam_prompt_encoder_tiny.pth",
    ]
    meta = torch.load(trained["written"]["clip2sam"], weights_only=True)["meta"]
    assert json.loads(meta["vocabulary"])["name"] == "shapes"
    assert meta["seen_classes"] == SHAPES[:6], "the trained classes, not the held-out ones"
    assert json.loads(meta["vocabulary"])["classes"][6]["seen"] is False
    assert meta["logit_scale"] == pytest.approx(float(trained["net"].log_scale.detach()))
    assert meta["logit_scale"] != 2.0, "the temperature was learned"
    assert meta["step"] == 2 and meta["stage"] == "cotrain"


def test_cli_export_writes_beside_a_users_files_and_never_into_the_run(trained, tmp_path, bystanders):
    from ovsam_ray.cli import main

    out = tmp_path / "weights"
    bystanders.around(out)
    run = trained["cfg"].run.run_url
    assert main(["train", "export", "--run", run, "--output", str(out)]) == 0
    assert main(["train", "export", "--run", run, "--output", os.path.join(run, "..", "local", "w")]) == 2


def test_cli_export_never_replaces_a_users_weight_file_and_replaces_its_own_with_overwrite(
    trained, tmp_path, bystanders
):
    from ovsam_ray.cli import main

    run = trained["cfg"].run.run_url
    out = tmp_path / "weights"
    bystanders.around(out)
    users = out / "clip2sam_shapes_tiny.pth"
    users.write_bytes(b"the user's own weights")
    bystanders.files[str(users)] = hashlib.sha256(users.read_bytes()).hexdigest()
    before = sorted(os.listdir(out))
    for flags in ([], ["--overwrite"]):
        assert main(["train", "export", "--run", run, "--output", str(out), *flags]) == 2
        assert sorted(os.listdir(out)) == before, "refused before any weight file is written"

    ours = tmp_path / "ours"
    assert main(["train", "export", "--run", run, "--output", str(ours)]) == 0
    assert main(["train", "export", "--run", run, "--output", str(ours)]) == 2  # a finished export: --overwrite
    assert main(["train", "export", "--run", run, "--output", str(ours), "--overwrite"]) == 0


def test_a_class_only_corrections_trained_is_exported_unseen_unless_asked(trained, tmp_path):
    """A fine-tune whose datasets are replay shards (the six seen shapes) and a label output's
    corrections (every shape): by default pentagon and cross stay unseen, so inference keeps
    fusing them with the unseen-class weight; ``--corrected-classes seen`` marks them seen."""
    from ovsam_ray.cli import main

    found = latest_checkpoint(trained["cfg"].run.run_url)
    assert found is not None
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(found[0], checkpoint)
    config = json.loads((checkpoint / CONFIG_FILE).read_text())
    vocab = config["datasets"][0]["vocab"]
    labels = {**config["datasets"][0], "shards": str(tmp_path / "labels"), "vocab": None, "corrections": "only"}
    config |= {"datasets": [config["datasets"][0], {**labels, "name": "labels"}], "train_vocab": vocab}
    (checkpoint / CONFIG_FILE).write_text(json.dumps(config))
    seen_flags = {}
    for mode in ("unseen", "seen"):
        out = tmp_path / mode
        flags = [] if mode == "unseen" else ["--corrected-classes", "seen"]
        assert main(["train", "export", "--run", str(checkpoint), "--output", str(out), *flags]) == 0
        meta = torch.load(out / "clip2sam_shapes_tiny.pth", weights_only=True)["meta"]
        assert meta["corrected_classes"]["mode"] == mode
        _, vocab_, _ = build_predictor(ModelConfig(preset="ovsam_tiny", weights=str(out), train_vocab="shapes"))
        seen_flags[mode] = dict(zip(vocab_.class_names, vocab_.seen))
        assert meta["seen_classes"] == [n for n in SHAPES if seen_flags[mode][n]]
    assert [n for n in SHAPES if not seen_flags["unseen"][n]] == list(HELD_OUT)
    assert all(seen_flags["seen"].values())
    with pytest.raises(ConfigError, match="corrected_classes"):
        export_checkpoint(str(checkpoint), str(tmp_path / "x"), corrected_classes="maybe")


def test_export_then_load_gives_the_in_memory_outputs(trained):
    net = trained["net"]
    loaded = load_ovsam("ovsam_tiny", weights=trained["weights"], train_vocab="shapes")
    for (k, a), (k2, b) in zip(net.model.state_dict().items(), loaded.model.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k

    cfg = ModelConfig(
        preset="ovsam_tiny", weights=trained["weights"], train_vocab="shapes", text_cache=str(trained["root"] / "text")
    )
    from_files, vocab, _ = build_predictor(cfg)
    assert list(vocab.class_names) == SHAPES
    assert vocab.seen == (True,) * 6 + (False,) * 2, "inference fuses the held-out classes with beta"
    in_memory = OVSAMPredictor(
        net.model, OpenVocabClassifier(text_embeddings=net.text_embeddings, logit_scale=float(net.log_scale.detach()))
    )
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    prompts = ImagePrompts(boxes=np.array([[5, 5, 40, 30]], np.float32), points=np.array([[20, 20]], np.float32))
    a, b = in_memory([image], [prompts])[0], from_files([image], [prompts])[0]
    np.testing.assert_allclose(a.low_res_logits, b.low_res_logits, atol=1e-5)
    np.testing.assert_allclose(a.head_logits, b.head_logits, atol=1e-4)
    np.testing.assert_allclose(a.fused_logits, b.fused_logits, atol=1e-4)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_local_run_started_again_resumes(trained):
    cfg = trained["cfg"]
    longer = CotrainConfig.from_dict({**cfg.to_dict(), "run": {**cfg.to_dict()["run"], "max_steps": 3}})
    state, _ = run_local("cotrain", longer, cotrain_setup, sample_builder(longer))
    assert state.step == 3 and state.images_seen == 3 * 2


def test_evaluate_weights_scores_every_held_out_object_with_the_seen_flags_of_the_weights(trained):
    from ovsam_ray.evaluation.table1 import shard_metas
    from ovsam_ray.training.heldout import evaluate_weights

    anns = [
        a
        for url in sorted(os.listdir(trained["shards"]))
        if url.endswith(".tar")
        for meta in shard_metas(os.path.join(trained["shards"], url)).values()
        for a in meta["annotations"]
    ]
    held_out = sum(a["category_name"] in HELD_OUT for a in anns)
    out = evaluate_weights(trained["weights"], trained["shards"])
    assert out["counts"] == {"images": 4, "images_error": 0, "prompts_without_instance": 0}
    for prompt_type in ("box", "point"):
        m = out["metrics"][prompt_type]
        assert m["objects"] == len(anns) and m["objects_novel"] == held_out, prompt_type
        assert 0.0 <= m["miou"] <= 1.0 and 0.0 <= m["accuracy"] <= 1.0
