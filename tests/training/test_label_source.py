"""A label output with review corrections as a co-training dataset (``--dataset 'LABELS|corrections=only'``)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ovsam_ray.cli.train import parse_dataset
from ovsam_ray.data.rle import decode_rle, encode_masks
from ovsam_ray.data.shards import iter_shard_samples
from ovsam_ray.data.synthetic import generate_shards
from ovsam_ray.errors import ConfigError
from ovsam_ray.labels.committer import ShardCommitter
from ovsam_ray.labels.overlays import write_overlay
from ovsam_ray.labels.run_record import RunRecord, check_or_write_run_record
from ovsam_ray.labels.schema import rows_to_table
from ovsam_ray.training.batching import unpack_masks, unpack_sample
from ovsam_ray.training.config import CotrainConfig, DatasetSpec, ModelSpec, RunSpec
from ovsam_ray.training.cotrain import sample_builder
from ovsam_ray.training.label_source import label_dataset_images
from ovsam_ray.training.label_space import build_label_space
from ovsam_ray.training.recipes import resolve_steps
from ovsam_ray.training.stream import dataset_items, iter_local_rows

SHAPES = ["circle", "square", "triangle", "star", "hexagon", "ellipse", "pentagon", "cross"]


@pytest.fixture
def world(tmp_path):
    """Shards of generated shapes and a label output of them in which every object is a "circle"
    with its true mask; the run record names the shards."""
    shards = str(tmp_path / "shards")
    generate_shards(shards, num_images=6, images_per_shard=3, seed=3, image_size=(64, 48))
    vocab = tmp_path / "shapes.json"
    vocab.write_text(json.dumps({"name": "shapes", "classes": [{"name": n, "seen": n != "cross"} for n in SHAPES]}))
    labels = str(tmp_path / "labels")
    check_or_write_run_record(labels, RunRecord(identity={"model": "t"}, details={"config": {"input": shards}}))
    truth: dict[tuple[str, str], list[tuple[str, dict]]] = {}
    for n in range(2):
        shard = f"shard-{n:06d}"
        rows = []
        for s in iter_shard_samples(os.path.join(shards, shard + ".tar")):
            meta = json.loads(s["json_bytes"])
            anns = meta["annotations"]
            truth[(shard, s["key"])] = [(SHAPES[a["category_id"]], a["segmentation"]) for a in anns]
            insts = []
            for a in anns:
                rle = {"size": list(a["segmentation"]["size"]), "counts": a["segmentation"]["counts"]}
                insts.append({"prompt_type": "box", "rle": rle, "bbox": [0, 0, 4, 4], "area": 16, "label": "circle"})
            rows.append(
                {"shard": shard, "key": s["key"], "status": "ok", "width": 64, "height": 48, "instances": insts}
            )
        ShardCommitter(labels).commit(shard, rows_to_table(rows), {})
    return {"shards": shards, "labels": labels, "vocab": str(vocab), "truth": truth}


def _review(world) -> dict[tuple[str, str], list[str]]:
    """Overlay: image 1 of shard 0 relabelled (instance 0) and accepted (the rest); image 2 of shard
    0 its first instance deleted; nothing in shard 1. Returns the expected labels of reviewed images."""
    keys = sorted(k for s, k in world["truth"] if s == "shard-000000")
    first, second = ("shard-000000", keys[0]), ("shard-000000", keys[1])
    rows = []
    expected = {}
    for i, (name, _) in enumerate(world["truth"][first]):
        kind = "relabelled" if i == 0 else "accepted"
        label = name if i == 0 else "circle"
        rows.append({"shard": first[0], "key": first[1], "instance": i, "kind": kind, "label": label})
        expected.setdefault(first, []).append(label)
    rows.append({"shard": second[0], "key": second[1], "instance": 0, "kind": "deleted"})
    # an object the model missed: the first object's mask again, named by the reviewer
    seg = world["truth"][first][0][1]
    rle = {"size": list(seg["size"]), "counts": seg["counts"]}
    rows.append(
        {"shard": first[0], "key": first[1], "instance": None, "kind": "added", "label": "cross", "rle": rle}
        | {"bbox": [0.0, 0.0, 4.0, 4.0], "area": 16}
    )
    expected[first].append("cross")
    write_overlay(world["labels"], rows, digest_of=b"review-1")
    return expected


def _config(world, tmp_path, spec: DatasetSpec) -> CotrainConfig:
    return CotrainConfig(
        run=RunSpec(storage_path=str(tmp_path / "runs"), name="t"),
        datasets=[spec],
        model=ModelSpec(preset="ovsam_tiny", random_init=True),
        train_vocab=world["vocab"],
        num_prompts=16,
        lsj_range=(1.0, 1.0),
        flip_prob=0.0,
        min_mask_area=1,
    )


def _rows(world, tmp_path, text: str) -> tuple[CotrainConfig, list[dict]]:
    cfg = _config(world, tmp_path, parse_dataset(text))
    items = dataset_items(cfg.datasets, epochs=1, seed=0)
    return cfg, list(iter_local_rows(items, sample_builder(cfg)))


def test_only_the_reviewed_instances_train_with_the_reviewers_labels(world, tmp_path):
    with pytest.raises(ConfigError, match="no reviewed instance"):
        dataset_items([parse_dataset(world["labels"] + "|corrections=only")], epochs=1, seed=0)
    expected = _review(world)
    cfg, rows = _rows(world, tmp_path, world["labels"] + "|corrections=only")
    items = dataset_items(cfg.datasets, epochs=1, seed=0)
    assert [os.path.basename(p["shard"]) for it in items for p in it["parts"]] == ["shard-000000.tar"]
    assert [r["key"] for r in rows] == [k for _, k in expected]  # the deleted-only image gives no sample
    vocab = build_label_space(cfg.datasets, cfg.train_vocab).vocab
    s = unpack_sample(rows[0]["sample"])
    got = sorted(vocab.class_names[i] for i in s["labels"])
    assert got == sorted(next(iter(expected.values())))
    assert "cross" in got  # a class the vocabulary marks unseen trains from a label output
    masks = unpack_masks(s["masks"], 256)
    truth = decode_rle(next(iter(world["truth"].values()))[0][1])
    # the targets are the label output's masks (the 64x48 image scaled to the 256 input: 4x)
    assert masks.any(axis=(1, 2)).all() and masks.sum() >= truth.sum() * 16 * 0.8
    assert label_dataset_images(cfg.datasets[0]) == 1
    assert resolve_steps(cfg).run.max_steps == cfg.epochs * 1


def test_all_trains_every_instance_as_reviewed(world, tmp_path):
    _review(world)
    cfg, rows = _rows(world, tmp_path, world["labels"] + "|corrections=all")
    assert len(rows) == 6 and label_dataset_images(cfg.datasets[0]) == 6
    vocab = build_label_space(cfg.datasets, cfg.train_vocab).vocab
    by_key = {r["key"]: unpack_sample(r["sample"]) for r in rows}
    keys = sorted(k for s, k in world["truth"] if s == "shard-000000")
    assert len(by_key[keys[1]]["labels"]) == len(world["truth"][("shard-000000", keys[1])]) - 1  # one deleted
    untouched = [vocab.class_names[i] for k in by_key if k not in keys[:2] for i in by_key[k]["labels"]]
    assert set(untouched) == {"circle"}  # the model's own labels where no one looked


def test_images_moved_and_bad_specs(world, tmp_path):
    _review(world)
    moved = str(tmp_path / "moved")
    os.rename(world["shards"], moved)
    with pytest.raises(ConfigError, match="images=SHARDS"):
        dataset_items([parse_dataset(world["labels"] + "|corrections=only")], epochs=1, seed=0)
    spec = parse_dataset(f"{world['labels']}|corrections=only|images={moved}")
    assert os.path.basename(dataset_items([spec], epochs=1, seed=0)[0]["parts"][0]["shard"]) == "shard-000000.tar"
    with pytest.raises(ConfigError, match="only"):
        DatasetSpec(shards=world["labels"], corrections="some")
    with pytest.raises(ConfigError, match="corrections"):
        DatasetSpec(shards=moved, images=moved)


def test_masks_are_the_reviewers_own(world, tmp_path):
    """An edited mask replaces the model's as the target."""
    key = sorted(k for s, k in world["truth"] if s == "shard-000001")[0]
    square = np.zeros((48, 64), bool)
    square[10:30, 20:40] = True
    rle = encode_masks(square[None])[0]
    row = {"shard": "shard-000001", "key": key, "instance": 0, "kind": "mask_edited", "label": "circle", "rle": rle}
    write_overlay(world["labels"], [row | {"bbox": [20.0, 10.0, 40.0, 30.0], "area": 400}], digest_of=b"r2")
    _, rows = _rows(world, tmp_path, world["labels"] + "|corrections=only")
    assert [r["key"] for r in rows] == [key]
    masks = unpack_masks(unpack_sample(rows[0]["sample"])["masks"], 256)
    assert masks.shape[0] == 1 and abs(int(masks[0].sum()) - 400 * 16) < 400 * 16 * 0.1
