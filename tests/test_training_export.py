"""Checkpoints, export and the evaluator, in-process (no Ray): a short local co-training run is
exported in the released layout and ``load_ovsam`` / ``build_predictor`` reproduce the in-memory
model's outputs; a started-again local run resumes; the metrics of the demo are right."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from ovsam_ray.checkpoints import load_ovsam
from ovsam_ray.data.rle import encode_masks
from ovsam_ray.data.synthetic import generate_shards
from ovsam_ray.inference import ModelConfig, build_predictor
from ovsam_ray.model.classifier import OpenVocabClassifier
from ovsam_ray.model.predictor import ImagePrompts, OVSAMPredictor
from ovsam_ray.training.config import CotrainConfig, DatasetSpec, ModelSpec, OptimConfig, RunSpec
from ovsam_ray.training.cotrain import cotrain_setup, sample_builder
from ovsam_ray.training.evaluate import evaluate_label_output, interior_point, load_ground_truth, score_instances
from ovsam_ray.training.export import export_checkpoint
from ovsam_ray.training.runner import latest_checkpoint, run_local

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
        num_prompts=4, num_points=64, learn_logit_scale=True, logit_scale=2.0, train_adapter=True,
    )
    state, net = run_local("cotrain", cfg, cotrain_setup, sample_builder(cfg))
    weights = str(root / "weights")
    written = export_checkpoint(cfg.run.run_url, weights)
    return {"cfg": cfg, "state": state, "net": net, "weights": weights, "written": written, "shards": shards,
            "root": root}


def test_local_run_checkpoints_and_exports_the_released_layout(trained):
    assert trained["state"].step == 2
    found = latest_checkpoint(trained["cfg"].run.run_url)
    assert found is not None and found[1]["step"] == 2
    names = sorted(os.path.basename(p) for p in trained["written"].values())
    assert names == ["clip2sam_shapes_tiny.pth", "clip_tiny.pth", "sam2clip_vith_tiny.pth",
                     "sam_prompt_encoder_tiny.pth"]
    meta = torch.load(trained["written"]["clip2sam"], weights_only=True)["meta"]
    assert json.loads(meta["vocabulary"])["name"] == "shapes"
    assert meta["seen_classes"] == SHAPES[:6], "the trained classes, not the held-out ones"
    assert json.loads(meta["vocabulary"])["classes"][6]["seen"] is False
    assert meta["logit_scale"] == pytest.approx(float(trained["net"].log_scale.detach()))
    assert meta["logit_scale"] != 2.0, "the temperature was learned"
    assert meta["step"] == 2 and meta["stage"] == "cotrain"


def test_export_then_load_gives_the_in_memory_outputs(trained):
    net = trained["net"]
    loaded = load_ovsam("ovsam_tiny", weights=trained["weights"], train_vocab="shapes")
    for (k, a), (k2, b) in zip(net.model.state_dict().items(), loaded.model.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k

    cfg = ModelConfig(preset="ovsam_tiny", weights=trained["weights"], train_vocab="shapes",
                      text_cache=str(trained["root"] / "text"))
    from_files, vocab, _ = build_predictor(cfg)
    assert list(vocab.class_names) == SHAPES
    assert vocab.seen == (True,) * 6 + (False,) * 2, "inference fuses the held-out classes with beta"
    in_memory = OVSAMPredictor(net.model, OpenVocabClassifier(text_embeddings=net.text_embeddings,
                                                              logit_scale=float(net.log_scale.detach())))
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


def test_interior_point_is_deep_inside():
    mask = np.zeros((20, 30), bool)
    mask[2:18, 3:13] = True
    mask[8:12, 13:28] = True  # a thin arm: the deepest point stays in the big block
    x, y = interior_point(mask)
    assert mask[int(y), int(x)] and 5 <= x <= 10 and 6 <= y <= 13
    assert interior_point(np.zeros((4, 4), bool)) == (0.0, 0.0)


def test_evaluate_label_output_scores_rows_against_the_shards(trained):
    truth = load_ground_truth(trained["shards"])
    rows = []
    for (shard, key), gt in truth.items():
        instances = []
        for j, (mask, box, name) in enumerate(zip(gt.masks, gt.boxes, gt.names)):
            rle = encode_masks(mask[None])[0]
            label = name if j else "wrong-label"
            instances.append({"prompt_type": "box", "prompt_box": box.tolist(), "point": None, "rle": rle,
                              "label": label})
            instances.append({"prompt_type": "point", "prompt_box": None, "point": list(interior_point(mask)),
                              "rle": encode_masks(np.zeros_like(mask)[None])[0], "label": name})
        rows.append({"key": key, "shard": shard, "status": "ok", "instances": instances})
    rows.append({"key": "bad", "shard": "x", "status": "error", "instances": None})
    m = evaluate_label_output(rows, trained["shards"])
    n = sum(len(gt.names) for gt in truth.values())
    assert m["box_miou"] == pytest.approx(1.0) and m["point_miou"] == 0.0
    assert m["box_accuracy"] == pytest.approx(1 - len(truth) / n)
    assert 0.3 < m["box_fill_miou"] < 1.0
    assert m["num_box_prompts"] == n and m["num_point_prompts"] == n and m["error_rows"] == 1
    # parquet round trip through the label job's schema
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ovsam_ray.labels.schema import OUTPUT_SCHEMA

    table = pa.Table.from_pylist([{**r, "instances": r["instances"]} for r in rows[:-1]],
                                 schema=pa.schema([f for f in OUTPUT_SCHEMA if f.name in ("key", "shard", "status",
                                                                                           "instances")]))
    path = str(trained["root"] / "labels.parquet")
    pq.write_table(table, path)
    assert evaluate_label_output(path, trained["shards"])["box_miou"] == pytest.approx(1.0)
    assert score_instances([], truth)["num_images"] == 0
