"""Prompt sampling and large-scale jitter, against the reference (github.com/HarborYuan/ovsam):
PRE = seg/models/data_preprocessor/ovsam_preprocessor.py."""

from __future__ import annotations

import numpy as np
import pytest

from ovsam_ray.data.rle import boxes_from_binary_masks
from ovsam_ray.model.functional import resized_shape
from ovsam_ray.training.augment import large_scale_jitter, resize_and_pad, resize_image
from ovsam_ray.training.prompt_sampling import choose_instances, prompt_kinds, sample_prompts, whole_image_prompt

PRE = "seg/models/data_preprocessor/ovsam_preprocessor.py"


def _masks(n: int, h: int = 40, w: int = 60) -> np.ndarray:
    masks = np.zeros((n, h, w), bool)
    for i in range(n):
        masks[i, 2 + 3 * i : 8 + 3 * i, 5 + 4 * i : 15 + 4 * i] = True
    return masks


def test_prompts_repeat_instances_and_split_boxes_then_points():
    rng = np.random.default_rng(0)
    masks = _masks(3)
    p = sample_prompts(masks, rng, 40)
    assert len(p) == 40
    counts = np.bincount(p.instance, minlength=3)
    assert set(counts.tolist()) <= {13, 14} and counts.sum() == 40
    # PRE:158: bp = arange(2).repeat_interleave(n // 2 + 1)[:n] -> 21 boxes, then 19 points
    assert p.is_point.sum() == 19 and not p.is_point[:21].any() and p.is_point[21:].all()
    np.testing.assert_array_equal(p.boxes, boxes_from_binary_masks(masks)[p.instance])
    for inst, (x, y) in zip(p.instance[p.is_point], p.points[p.is_point]):
        assert masks[inst, int(y), int(x)], "a point prompt must lie inside its mask"
    assert (p.points[~p.is_point] == 0).all()


def test_prompt_kinds_are_the_reference_split():
    """PRE:158 ``torch.arange(2).repeat_interleave((num_ins // 2) + 1)[:num_ins]``, 1 = point."""
    torch = __import__("torch")
    for n in (1, 2, 3, 5, 12, 39, 40, 41):
        reference = torch.arange(2).repeat_interleave((n // 2) + 1)[:n].numpy().astype(bool)
        np.testing.assert_array_equal(prompt_kinds(n), reference, err_msg=f"{PRE}:158, n={n}")
    assert prompt_kinds(40).sum() == 19 and prompt_kinds(2).sum() == 0


def test_prompts_take_the_first_instances_in_annotation_order():
    """PRE:149-152: fewer than num_proposals are repeated by concatenation, then
    ``gt_instances[:num_proposals]``: an image with more trains its first 40 in annotation order;
    PRE:159 then shuffles them. ``selection="random"`` (a deviation) draws a random subset."""
    first = sample_prompts(_masks(12), np.random.default_rng(1), 5)
    assert len(first) == 5 and sorted(first.instance.tolist()) == [0, 1, 2, 3, 4], f"{PRE}:152"
    assert first.is_point.sum() == 2  # 3 boxes + 2 points
    assert sorted(choose_instances(50, 40, np.random.default_rng(0)).tolist()) == list(range(40))
    orders = {tuple(choose_instances(50, 40, np.random.default_rng(s)).tolist()) for s in range(3)}
    assert len(orders) == 3, f"{PRE}:159 shuffles the chosen instances"
    picked = set()
    for seed in range(20):
        chosen = sample_prompts(_masks(12), np.random.default_rng(seed), 5, selection="random").instance
        assert len(set(chosen.tolist())) == 5
        picked |= set(chosen.tolist())
    assert picked - {0, 1, 2, 3, 4}, "the random draw reaches later instances"
    reps = choose_instances(3, 7, np.random.default_rng(0))
    assert sorted(reps.tolist()) == [0, 0, 0, 1, 1, 2, 2], f"{PRE}:149-152 (cat of copies, then [:n])"


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


COCO = "seg/configs/_base_/datasets/coco_ov_instance_lsj.py"


def test_resize_is_cv2_bilinear_on_float32():
    """The reference loads float32 images ({COCO}:20-23 to_float32=True) and resizes with mmcv
    Resize ({COCO}:30-36; LVIS's scale jitter down to 0.1; distillation's ResizeSAM), i.e. cv2
    INTER_LINEAR: no antialiasing, also on strong downscales. Ours equals it up to the rounding
    to uint8 (half a grey level); an antialiased filter is tens of levels off on fine texture."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    for (h, w), (nh, nw) in [
        ((240, 320), (24, 32)),
        ((225, 150), (102, 68)),
        ((101, 203), (37, 11)),
        ((30, 50), (77, 128)),
    ]:
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        reference = cv2.resize(image.astype(np.float32), (nw, nh), interpolation=cv2.INTER_LINEAR)
        ours = resize_image(image, (nh, nw)).astype(np.float32)
        assert np.abs(ours - reference).max() <= 0.51, ((h, w), (nh, nw))
    t = large_scale_jitter(
        image, np.zeros((0, 30, 50), bool), np.random.default_rng(0), size=64, ratio_range=(1.0, 1.0), flip_prob=0.0
    )
    expected = cv2.resize(image.astype(np.float32), (64, 38), interpolation=cv2.INTER_LINEAR)
    assert t.input_hw == (38, 64) and np.abs(t.image[:38].astype(np.float32) - expected).max() <= 0.51


def test_resize_does_not_antialias():
    """A 1-pixel checkerboard shrunk 4x: an antialiasing filter averages it to grey; bilinear
    without antialiasing (cv2 INTER_LINEAR) samples between two pixels at each output, as the reference."""
    board = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)[..., None].repeat(3, -1)
    small = resize_image(board, (16, 16))
    np.testing.assert_array_equal(small, np.full((16, 16, 3), 128, np.uint8))  # (0 + 255) / 2 at half-pixel centres
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, 1::8] = 255  # thin lines that a 0.125x antialiased resize would smear into every column
    assert (resize_image(stripes, (8, 8)) == 0).all(), "no antialiasing: samples at 3.5 + 8k miss the lines"
