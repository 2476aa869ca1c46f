"""The data order: shards read concurrently through a shuffle buffer make batches i.i.d. across
shards and classes, even on ImageNet-style shards written class by class; the order is
deterministic per seed, reshuffled every epoch and resumable from the data position."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ovsam_ray import storage
from ovsam_ray.data.synthetic import encode_image, tar_bytes
from ovsam_ray.training.batching import unpack_sample
from ovsam_ray.training.config import CotrainConfig, DatasetSpec, ModelSpec, RunSpec
from ovsam_ray.training.cotrain import sample_builder
from ovsam_ray.training.stream import dataset_items, interleave, iter_local_rows

CLASSES = ["circle", "square", "triangle", "star", "hexagon", "ellipse", "pentagon", "cross"]
PER_SHARD = 30


@pytest.fixture(scope="module")
def sorted_shards(tmp_path_factory) -> dict[str, str]:
    """ImageNet-style: one shard per class, written class by class."""
    root = tmp_path_factory.mktemp("in_sorted")
    rng = np.random.default_rng(0)
    image = encode_image(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
    for c, name in enumerate(CLASSES):
        members = []
        for i in range(PER_SHARD):
            members += [(f"{c}_{i:03d}.jpg", image), (f"{c}_{i:03d}.json", json.dumps({"label": name}).encode())]
        storage.atomic_write_bytes(str(root / f"in-{c:06d}.tar"), tar_bytes(members))
    vocab = root / "classes.json"
    vocab.write_text(json.dumps(CLASSES))
    return {"shards": str(root), "vocab": str(vocab)}


def _labels(data, tmp_path, *, seed=0, shards=8, buffer=64, start=0) -> list[tuple[int, int]]:
    cfg = CotrainConfig(
        run=RunSpec(storage_path=str(tmp_path), name="t", seed=seed, shuffle_shards=shards, shuffle_buffer=buffer),
        datasets=[
            DatasetSpec(shards=data["shards"], kind="image", vocab=data["vocab"]),
            DatasetSpec(shards=data["shards"], kind="segmentation", vocab=data["vocab"], ratio=1e-9),
        ],
        model=ModelSpec(preset="ovsam_tiny", random_init=True),
        flip_prob=0.0,
    )
    items = dataset_items(cfg.datasets[:1], epochs=2, seed=seed, shards_per_item=shards)
    builder = sample_builder(cfg)
    return [(r["item"], int(unpack_sample(r["sample"])["labels"][0])) for r in iter_local_rows(items[start:], builder)]


def _worst_window_distance(labels: list[int], steps: int = 50, batch: int = 2) -> float:
    """Largest total-variation distance between the class histogram of any ``steps`` consecutive
    batches and the mixture's (uniform over the classes)."""
    window = steps * batch
    worst = 0.0
    for start in range(0, len(labels) - window + 1, batch):
        hist = np.bincount(labels[start : start + window], minlength=len(CLASSES)) / window
        worst = max(worst, 0.5 * float(np.abs(hist - 1 / len(CLASSES)).sum()))
    return worst


@pytest.mark.slow
def test_batches_mix_class_sorted_shards_like_the_mixture(sorted_shards, tmp_path):
    shuffled = [label for _, label in _labels(sorted_shards, tmp_path)]
    assert len(shuffled) == 2 * len(CLASSES) * PER_SHARD
    assert _worst_window_distance(shuffled) < 0.2, "any 50 steps see every class about equally"
    in_order = [label for _, label in _labels(sorted_shards, tmp_path, shards=1, buffer=1)]
    assert _worst_window_distance(in_order) > 0.6, "read shard by shard, a window holds one or two classes"


@pytest.mark.slow
def test_order_is_deterministic_reshuffled_per_epoch_and_resumable(sorted_shards, tmp_path):
    rows = _labels(sorted_shards, tmp_path, seed=3)
    assert rows == _labels(sorted_shards, tmp_path, seed=3)
    assert rows != _labels(sorted_shards, tmp_path, seed=4)
    first, second = ([label for item, label in rows if item == k] for k in (0, 1))
    assert sorted(first) == sorted(second) and first != second, "each epoch is shuffled anew"
    resumed = _labels(sorted_shards, tmp_path, seed=3, start=1)
    assert resumed == [r for r in rows if r[0] >= 1], "a resumed stream reads the same order from its item"


def test_interleave_keeps_every_element_once():
    rng = np.random.default_rng(0)
    sources = [iter(range(k * 100, k * 100 + n)) for k, n in enumerate([5, 0, 17, 3])]
    out = list(interleave(sources, rng, buffer=4))
    assert sorted(out) == sorted([*range(0, 5), *range(200, 217), *range(300, 303)])
    assert list(interleave([iter([1, 2, 3])], rng, buffer=1)) == [1, 2, 3], "buffer 1, one shard: in order"
