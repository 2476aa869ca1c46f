"""The open-vocabulary protocol of co-training (DatasetSpec.split): only base classes train, images
without any are dropped, and the trained classes are the seen classes of the exported vocabulary.

Reference: seg/configs/_base_/datasets/coco_ov_instance_lsj.py:62 (``sub_split='48_17'``, whose
filter in seg/datasets/coco_ins_ov.py:212-249 keeps only base-class instances and drops images
with none) and seg/configs/_base_/datasets/lvis_norare.py:59 (``lvis_v1_train_norare.json``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from ovsam_ray import storage
from ovsam_ray.data.synthetic import encode_image, tar_bytes
from ovsam_ray.training.batching import unpack_sample
from ovsam_ray.training.config import CotrainConfig, DatasetSpec, ModelSpec, RunSpec
from ovsam_ray.training.cotrain import sample_builder
from ovsam_ray.training.label_space import build_label_space
from ovsam_ray.training.stream import iter_local_rows
from ovsam_ray.vocabulary import load_vocabulary


def _ann(name: str, cid: int, x0: int) -> dict:
    return {
        "category_name": name,
        "category_id": cid,
        "iscrowd": 0,
        "bbox": [x0, 4, 16, 16],
        "segmentation": [[x0, 4, x0 + 16, 4, x0 + 16, 20, x0, 20]],
    }


@pytest.fixture()
def coco_shard(tmp_path) -> str:
    rng = np.random.default_rng(0)
    images = {
        "base_and_novel": [_ann("person", 1, 4), _ann("dog", 18, 30)],  # person: base, dog: novel
        "novel_only": [_ann("cat", 17, 4)],
        "excluded_only": [_ann("traffic light", 10, 4)],  # in neither split
    }
    members = []
    for key, anns in images.items():
        members += [
            (f"{key}.jpg", encode_image(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))),
            (f"{key}.json", json.dumps({"annotations": anns}).encode()),
        ]
    url = str(tmp_path / "coco-000000.tar")
    storage.atomic_write_bytes(url, tar_bytes(members))
    return url


def _rows(shard: str, tmp_path, split: str) -> list[tuple[str, dict]]:
    cfg = CotrainConfig(
        run=RunSpec(storage_path=str(tmp_path), name="t"),
        datasets=[DatasetSpec(shards=shard, vocab="coco_ov", split=split)],
        model=ModelSpec(preset="ovsam_tiny", random_init=True),
        num_prompts=4,
        lsj_range=(1.0, 1.0),
        flip_prob=0.0,
        min_mask_area=1,
    )
    item = {"item": 0, "dataset": 0, "shard": shard}
    return [(r["key"], unpack_sample(r["sample"])) for r in iter_local_rows([item], sample_builder(cfg))]


def test_base_split_trains_base_classes_only_and_drops_images_without_any(coco_shard, tmp_path):
    vocab = load_vocabulary("coco_ov")
    person, dog = vocab.class_names.index("person"), vocab.class_names.index("dog")
    rows = _rows(coco_shard, tmp_path, "base")
    assert [k for k, _ in rows] == ["base_and_novel"], "images with no base object are dropped"
    sample = rows[0][1]
    assert sample["labels"].tolist() == [person], "the novel 'dog' never reaches the loss"
    assert set(sample["prompt_instance"].tolist()) == {0}
    every = dict(_rows(coco_shard, tmp_path, "all"))
    assert sorted(every) == ["base_and_novel", "excluded_only", "novel_only"]
    assert sorted(every["base_and_novel"]["labels"].tolist()) == sorted([person, dog])


def test_seen_classes_are_the_base_classes_and_the_15_others_stay_excluded():
    coco = load_vocabulary("coco_ov")
    space = build_label_space([DatasetSpec(shards="x", vocab="coco_ov")])
    assert space.vocab.num_classes == 80, "the classifier still scores all 80 classes, as the reference"
    assert space.vocab.seen == coco.seen and sum(space.vocab.seen) == 48
    assert space.vocab.excluded == coco.excluded and sum(space.vocab.excluded) == 15
    assert space.seen_classes == [n for n, s in zip(coco.class_names, coco.seen) if s]
    everything = build_label_space([DatasetSpec(shards="x", vocab="coco_ov", split="all")])
    assert all(everything.vocab.seen) and not any(everything.vocab.excluded)


def test_lvis_base_split_is_without_the_rare_classes():
    lvis = load_vocabulary("lvis_v1")
    space = build_label_space([DatasetSpec(shards="x", vocab="lvis_v1")])
    assert space.vocab.seen == lvis.seen and sum(space.vocab.seen) == 461 + 405
    labels = space.datasets[0]
    rare = next(i for i, s in enumerate(lvis.seen) if not s)
    assert labels.annotation_label({"category_id": lvis.class_ids[rare]}) == -1
    assert labels.annotation_label({"category_name": lvis.class_names[rare]}) == -1
    frequent = lvis.seen.index(True)
    assert labels.annotation_label({"category_id": lvis.class_ids[frequent]}) == frequent


def test_split_is_validated_and_parsed_from_the_dataset_flag():
    from ovsam_ray.cli.train import parse_dataset

    assert parse_dataset("s3://b/coco/|vocab=coco_ov").split == "base"
    assert parse_dataset("s3://b/coco/|vocab=coco_ov|split=all").split == "all"
    with pytest.raises(ValueError, match="split"):
        DatasetSpec(shards="x", split="novel")
