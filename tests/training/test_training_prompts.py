"""Prompt sampling and large-scale jitter."""

from __future__ import annotations

import numpy as np

from ovsam_ray.data.rle import boxes_from_binary_masks
from ovsam_ray.model.functional import resized_shape
from ovsam_ray.training.augment import large_scale_jitter, resize_and_pad
from ovsam_ray.training.prompt_sampling import choose_instances, sample_prompts, whole_image_prompt


def _masks(n: int, h: int = 40, w: int = 60) -> np.ndarray:
    masks = np.zeros((n, h, w), bool)
    for i in range(n):
        masks[i, 2 + 3 * i : 8 + 3 * i, 5 + 4 * i : 15 + 4 * i] = True
    return masks


def test_prompts_repeat_instances_and_split_half_points():
    rng = np.random.default_rng(0)
    masks = _masks(3)
    p = sample_prompts(masks, rng, 40)
    assert len(p) == 40
    counts = np.bincount(p.instance, minlength=3)
    assert set(counts.tolist()) <= {13, 14} and counts.sum() == 40
    assert p.is_point.sum() == 20 and not p.is_point[:20].any()  # boxes first, points second
    np.testing.assert_array_equal(p.boxes, boxes_from_binary_masks(masks)[p.instance])
    for inst, (x, y) in zip(p.instance[p.is_point], p.points[p.is_point]):
        assert masks[inst, int(y), int(x)], "a point prompt must lie inside its mask"
    assert (p.points[~p.is_point] == 0).all()


def test_prompts_subsample_many_instances_without_repeats():
    p = sample_prompts(_masks(12), np.random.default_rng(1), 5)
    assert len(p) == 5 and len(set(p.instance.tolist())) == 5
    assert p.is_point.sum() == 2


def test_prompts_deterministic_and_empty():
    a = sample_prompts(_masks(2), np.random.default_rng(7), 10)
    b = sample_prompts(_masks(2), np.random.default_rng(7), 10)
    np.testing.assert_array_equal(a.instance, b.instance)
    np.testing.assert_array_equal(a.points, b.points)
    empty = sample_prompts(np.zeros((0, 10, 10), bool), np.random.default_rng(0), 40)
    assert len(empty) == 0 and empty.boxes.shape == (0, 4) and empty.points.shape == (0, 2)
    assert len(choose_instances(0, 40, np.random.default_rng(0))) == 0


def test_whole_image_prompt():
    p = whole_image_prompt(30, 50)
    assert len(p) == 1 and not p.is_point[0]
    np.testing.assert_array_equal(p.boxes, [[0, 0, 50, 30]])


def test_lsj_shapes_padding_and_ratio():
    rng = np.random.default_rng(0)
    image = np.full((48, 64, 3), 200, np.uint8)
    masks = _masks(2, 48, 64)
    for _ in range(20):
        t = large_scale_jitter(image, masks, rng, size=64, ratio_range=(0.5, 2.0), flip_prob=0.5, min_mask_area=1)
        assert t.image.shape == (64, 64, 3) and t.masks.shape == (2, 64, 64)
        h, w = t.input_hw
        assert 1 <= h <= 64 and 1 <= w <= 64
        assert (t.image[h:] == 0).all() and (t.image[:, w:] == 0).all()
        assert not t.masks[:, h:].any() and not t.masks[:, :, w:].any()
        assert 0.45 <= t.scale * 64 / 64 <= 2.05  # long side (64 * scale) = size (64) * ratio
    low = large_scale_jitter(image, masks, rng, size=64, ratio_range=(0.5, 0.5), flip_prob=0.0)
    assert low.input_hw == resized_shape(48, 64, 32)
    assert not low.keep.all() or low.masks.reshape(2, -1).sum(1).min() >= 32


def test_lsj_flip_moves_masks_with_pixels():
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, :8] = 255  # a white band on the left
    masks = np.zeros((1, 32, 32), bool)
    masks[0, :, :8] = True
    t = large_scale_jitter(
        image, masks, np.random.default_rng(0), size=32, ratio_range=(1.0, 1.0), flip_prob=1.0, min_mask_area=1
    )
    assert t.masks[0, :, -8:].all() and not t.masks[0, :, :-8].any()
    assert (t.image[t.masks[0]] == 255).all()


def test_resize_and_pad_is_inference_geometry():
    image = np.random.default_rng(0).integers(0, 255, (30, 80, 3), dtype=np.uint8)
    t = resize_and_pad(image, size=64)
    assert t.input_hw == resized_shape(30, 80, 64) and t.image.shape == (64, 64, 3)
    assert (t.image[t.input_hw[0] :] == 0).all()
