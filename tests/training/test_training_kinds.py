"""Dataset kinds other than segmentation: box-only datasets (V3Det, Objects365: boxes, no masks)
train the classification loss from box prompts with the mask losses off; classification images
keep the whole image."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ovsam_ray import storage
from ovsam_ray.data.synthetic import encode_image, tar_bytes
from ovsam_ray.training.batching import unpack_sample
from ovsam_ray.training.config import CotrainConfig, DatasetSpec, ModelSpec, RunSpec
from ovsam_ray.training.cotrain import sample_builder
from ovsam_ray.training.stream import iter_local_rows

CLASSES = ["circle", "square", "triangle"]


@pytest.fixture()
def shards(tmp_path) -> dict[str, str]:
    rng = np.random.default_rng(0)
    boxes = [
        {"bbox": [4, 6, 20, 10], "category_name": "square", "iscrowd": 0},
        {"bbox": [30, 20, 12, 16], "category_id": 2, "iscrowd": 0},
        {"bbox": [1, 1, 0, 5], "category_name": "circle"},
    ]  # zero width: dropped
    box = [
        ("b0.jpg", encode_image(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))),
        ("b0.json", json.dumps({"annotations": boxes}).encode()),
    ]
    storage.atomic_write_bytes(str(tmp_path / "box-000000.tar"), tar_bytes(box))
    wide = [
        ("i0.jpg", encode_image(rng.integers(0, 255, (30, 90, 3), dtype=np.uint8))),
        ("i0.json", json.dumps({"label": "triangle"}).encode()),
    ]
    storage.atomic_write_bytes(str(tmp_path / "img-000000.tar"), tar_bytes(wide))
    seg = tmp_path / "seg"
    from ovsam_ray.data.synthetic import generate_shards

    generate_shards(str(seg), num_images=2, images_per_shard=2, seed=1, image_size=(64, 48))
    vocab = tmp_path / "classes.json"
    vocab.write_text(json.dumps(CLASSES))
    return {
        "box": str(tmp_path / "box-000000.tar"),
        "img": str(tmp_path / "img-000000.tar"),
        "seg": str(seg),
        "vocab": str(vocab),
    }


def _cfg(shards, tmp_path, **kw) -> CotrainConfig:
    return CotrainConfig(
        run=RunSpec(storage_path=str(tmp_path / "runs"), name="k"),
        datasets=[
            DatasetSpec(shards=shards["seg"], vocab=shards["vocab"]),
            DatasetSpec(shards=shards["box"], kind="box", vocab=shards["vocab"]),
            DatasetSpec(shards=shards["img"], kind="image", vocab=shards["vocab"]),
        ],
        model=ModelSpec(preset="ovsam_tiny", random_init=True),
        num_prompts=6,
        num_points=64,
        min_mask_area=1,
        **kw,
    )


def test_box_only_dataset_trains_box_prompts_and_classification_only(shards, tmp_path):
    from ovsam_ray.training import loop
    from ovsam_ray.training.cotrain import cotrain_setup

    cfg = _cfg(shards, tmp_path, lsj_range=(1.0, 1.0), flip_prob=0.0)  # long side 64 -> 256: x4, no crop
    rows = list(iter_local_rows([{"item": 0, "dataset": 1, "shard": shards["box"]}], sample_builder(cfg)))
    assert len(rows) == 1
    s = unpack_sample(rows[0]["sample"])
    assert not s["has_masks"] and s["masks"].shape[0] == 0 and not s["prompt_is_point"].any()
    assert sorted(s["labels"].tolist()) == [1, 2], "square by name, triangle by id; the empty box dropped"
    boxes = {tuple(b) for b in s["prompt_boxes"].tolist()}
    assert boxes == {(16.0, 24.0, 96.0, 64.0), (120.0, 80.0, 168.0, 144.0)}, "the boxes, x4 with the image"
    net = cotrain_setup(cfg, loop.Runtime()).net
    terms, _ = loop.CotrainTask(net=net, cfg=cfg, device=torch.device("cpu")).losses([s], 0, 0)
    assert terms["loss_mask"].item() == 0.0 and terms["loss_dice"].item() == 0.0
    assert terms["loss_cls"].item() > 0
    sum(terms.values()).backward()
    assert net.model.recognizer.roi_conv.weight.grad.abs().sum() > 0, "classification trains from box prompts"


def test_classification_images_keep_the_whole_image(shards, tmp_path):
    cfg = _cfg(shards, tmp_path, lsj_range=(2.0, 2.0), flip_prob=0.0)  # LSJ at 2x would crop half of it
    rows = list(iter_local_rows([{"item": 0, "dataset": 2, "shard": shards["img"]}], sample_builder(cfg)))
    s = unpack_sample(rows[0]["sample"])
    assert s["input_hw"].tolist() == [85, 256], "resized whole (90x30 -> 256x85), never cropped"
    np.testing.assert_array_equal(s["prompt_boxes"], [[0, 0, 256, 85]])
    assert s["labels"].tolist() == [2] and not s["has_masks"]
