"""Golden values and empty inputs for the pure tensor functions of ``ovsam_ray.model.functional``,
plus the CLIP2SAM RoIAlign against torchvision (DESIGN §2: the input, 2.5-2.8)."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from segment_anything.modeling.sam import Sam
from segment_anything.utils.transforms import ResizeLongestSide
from torchvision.ops import roi_align

from ovsam_ray.data.rle import boxes_from_binary_masks
from ovsam_ray.model.classifier import RELEASED_LOGIT_SCALE
from ovsam_ray.model.clip2sam_recognizer import CLIP2SAMRecognizer
from ovsam_ray.model.functional import (
    PIXEL_MEAN,
    PIXEL_STD,
    boxes_from_masks,
    classify_embeddings,
    clip_boxes,
    clip_points,
    fuse_open_vocab_logits,
    labels_from_logits,
    mask_boxes_from_low_res,
    mask_pool,
    preprocess_image,
    resized_shape,
    roi_levels,
    scale_coords,
    upscale_mask_logits,
)

MEAN = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
STD = torch.tensor(PIXEL_STD).view(3, 1, 1)


def _random_image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# ------------------------------------------------------------------ resize / normalise / pad


@pytest.mark.parametrize("hw", [(480, 640), (640, 480), (1, 1), (333, 1000), (1024, 1024), (7, 3)])
def test_resized_shape_is_sams_resize_longest_side_rule(hw: tuple[int, int]) -> None:
    assert resized_shape(*hw, 1024) == ResizeLongestSide.get_preprocess_shape(*hw, 1024)


def test_resized_shape_golden_values() -> None:
    assert resized_shape(480, 640, 1024) == (768, 1024)
    assert resized_shape(427, 640, 1024) == (683, 1024)  # 682.9 rounds half up
    assert resized_shape(100, 50, 256) == (256, 128)


def test_resized_shape_keeps_one_pixel_for_extreme_aspect_ratios() -> None:
    # SAM's rule alone gives 0 rows for a 1x3000 image, which no resize can produce.
    assert resized_shape(1, 3000, 1024) == (1, 1024)
    assert resized_shape(3000, 1, 1024) == (1024, 1)


def test_resized_shape_rejects_an_empty_image() -> None:
    with pytest.raises(ValueError, match="no pixels"):
        resized_shape(0, 10, 1024)
    with pytest.raises(ValueError, match="no pixels"):
        preprocess_image(torch.zeros((0, 0, 3), dtype=torch.uint8), 64)


@pytest.mark.parametrize("hw", [(48, 80), (80, 48), (200, 130)])
def test_preprocess_image_matches_sam_resize_normalise_and_pad(hw: tuple[int, int]) -> None:
    size = 64
    image = _random_image(*hw)
    x, (h, w) = preprocess_image(image, size)

    # SAM's ResizeLongestSide.apply_image_torch, written out: upstream it reads the target size
    # from shape[0], shape[1] of the BCHW tensor (batch and channels), so it cannot be called as is.
    target = ResizeLongestSide.get_preprocess_shape(*hw, size)
    resized = F.interpolate(
        image.permute(2, 0, 1)[None].float(), target, mode="bilinear", align_corners=False, antialias=True
    )[0]
    resized = resized.round().clamp(0, 255)  # the resized image is uint8, as SAM's apply_image gives
    expected = torch.zeros(3, size, size)
    expected[:, : resized.shape[1], : resized.shape[2]] = (resized - MEAN) / STD

    assert (h, w) == tuple(resized.shape[1:]) == resized_shape(*hw, size)
    assert x.shape == (3, size, size) and x.dtype == torch.float32
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=0)
    assert torch.count_nonzero(x[:, h:, :]) == 0 and torch.count_nonzero(x[:, :, w:]) == 0


def test_preprocess_image_golden_normalisation_and_zero_padding() -> None:
    # A 2x4 image already at the long side: no resize, exact values, padding bottom only.
    image = torch.tensor([255, 0, 128], dtype=torch.uint8).expand(2, 4, 3).contiguous()
    x, hw = preprocess_image(image, 4)
    assert hw == (2, 4)
    for c, v in enumerate((255.0, 0.0, 128.0)):
        assert torch.allclose(x[c, :2, :], torch.full((2, 4), (v - PIXEL_MEAN[c]) / PIXEL_STD[c]))
    assert torch.equal(x[:, 2:, :], torch.zeros(3, 2, 4))
    assert math.isclose(float(x[0, 0, 0]), (255 - 123.675) / 58.395, rel_tol=1e-6)


def test_preprocess_image_rejects_non_rgb() -> None:
    with pytest.raises(ValueError, match="RGB"):
        preprocess_image(torch.zeros((4, 4), dtype=torch.uint8), 8)


# ------------------------------------------------------------------ coordinates


def test_scale_coords_golden_and_matches_sam() -> None:
    boxes = torch.tensor([[10.0, 20.0, 300.0, 400.0], [0.0, 0.0, 640.0, 480.0]])
    points = torch.tensor([[5.0, 7.0], [640.0, 480.0]])
    out_boxes = scale_coords(boxes, (480, 640), (768, 1024))
    torch.testing.assert_close(out_boxes, boxes * 1.6)
    torch.testing.assert_close(scale_coords(points, (480, 640), (768, 1024)), points * 1.6)
    # Non-uniform rounding: SAM's apply_coords uses the rounded target size per axis.
    sam = ResizeLongestSide(1024)
    torch.testing.assert_close(scale_coords(boxes, (427, 640), (683, 1024)), sam.apply_boxes_torch(boxes, (427, 640)))
    torch.testing.assert_close(
        scale_coords(points, (427, 640), (683, 1024)), sam.apply_coords_torch(points, (427, 640))
    )


def test_scale_coords_empty() -> None:
    assert scale_coords(torch.zeros((0, 4)), (10, 20), (20, 40)).shape == (0, 4)
    assert scale_coords(torch.zeros((0, 2)), (10, 20), (20, 40)).shape == (0, 2)


def test_clip_boxes_orders_corners_and_clamps_to_the_image() -> None:
    boxes = torch.tensor(
        [
            [10.0, 20.0, 30.0, 40.0],  # inside: unchanged
            [30.0, 40.0, 10.0, 20.0],  # inverted: re-ordered
            [-5.0, -6.0, 500.0, 600.0],  # larger than the image
            [200.0, 10.0, 300.0, 20.0],  # right of the image: zero width at x = W
        ]
    )
    expected = torch.tensor(
        [[10.0, 20.0, 30.0, 40.0], [10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 100.0, 50.0], [100.0, 10.0, 100.0, 20.0]]
    )
    torch.testing.assert_close(clip_boxes(boxes, 50, 100), expected)
    assert clip_boxes(torch.zeros((0, 4)), 50, 100).shape == (0, 4)


def test_clip_points_clamps_into_the_image() -> None:
    points = torch.tensor([[-3.0, 5.0], [150.0, 70.0], [20.0, 30.0]])
    torch.testing.assert_close(clip_points(points, 50, 100), torch.tensor([[0.0, 5.0], [100.0, 50.0], [20.0, 30.0]]))
    assert clip_points(torch.zeros((0, 2)), 50, 100).shape == (0, 2)


# ------------------------------------------------------------------ masks and boxes


def test_boxes_from_masks_golden() -> None:
    masks = torch.zeros((4, 6, 8), dtype=torch.bool)
    masks[0, 1:3, 2:5] = True  # rows 1-2, cols 2-4
    masks[1, 5, 7] = True  # one pixel in the bottom-right corner
    masks[2, 0, 0] = True
    masks[2, 4, 6] = True  # two separate pixels: their joint box
    # masks[3] stays empty
    expected = torch.tensor([[2.0, 1.0, 5.0, 3.0], [7.0, 5.0, 8.0, 6.0], [0.0, 0.0, 7.0, 5.0], [0.0, 0.0, 0.0, 0.0]])
    out = boxes_from_masks(masks)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)
    np.testing.assert_array_equal(out.numpy(), boxes_from_binary_masks(masks.numpy()))


def test_boxes_from_masks_empty_batch() -> None:
    out = boxes_from_masks(torch.zeros((0, 6, 8), dtype=torch.bool))
    assert out.shape == (0, 4) and out.dtype == torch.float32


def test_roi_levels_by_hand() -> None:
    # clamp(floor(log2(sqrt(w*h)/56 + 1e-6)), 0, 3) by hand:
    # 55 -> log2(0.98) < 0 -> 0; 56 -> log2(1 + 1e-6) ~ 1.4e-6 -> 0; 111 -> log2(1.98) -> 0;
    # 112 -> 1; 224 -> 2; 448 -> 3; 1000 -> log2(17.9) = 4.2 -> clamped 3; zero area -> 0.
    sides = [55.0, 56.0, 111.0, 112.0, 224.0, 448.0, 1000.0]
    boxes = torch.tensor([[10.0, 20.0, 10.0 + s, 20.0 + s] for s in sides] + [[30.0, 30.0, 30.0, 30.0]])
    assert roi_levels(boxes).tolist() == [0, 0, 0, 1, 2, 3, 3, 0]
    # Non-square: sqrt(w * h) decides (56 * 224 -> sqrt = 112 -> 1).
    assert roi_levels(torch.tensor([[0.0, 0.0, 56.0, 224.0]])).tolist() == [1]
    # The tiny preset's base scale.
    assert roi_levels(torch.tensor([[0.0, 0.0, 28.0, 28.0]]), finest_scale=14.0).tolist() == [1]
    out = roi_levels(torch.zeros((0, 4)))
    assert out.shape == (0,) and out.dtype == torch.long


def test_upscale_mask_logits_equals_sam_postprocess_masks() -> None:
    low_res = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    fake_sam = types.SimpleNamespace(image_encoder=types.SimpleNamespace(img_size=64))
    expected = Sam.postprocess_masks(fake_sam, low_res, (48, 64), (75, 100))
    out = upscale_mask_logits(low_res, 64, (48, 64), (75, 100))
    assert out.shape == (3, 1, 75, 100)
    torch.testing.assert_close(out, expected)


def test_upscale_mask_logits_crops_the_padding_before_resizing() -> None:
    # Positive logits only in the bottom half of the padded square, which is padding for an
    # input of 8x16: after the crop nothing is positive. Rows 0-7 of the 16x16 upsample interpolate
    # between -5 and +5 with weights <= 0.375 for the +5 row, so they stay negative.
    low_res = torch.full((1, 1, 4, 4), -5.0)
    low_res[..., 2:, :] = 5.0
    out = upscale_mask_logits(low_res, 16, (8, 16), (4, 8))
    assert out.shape == (1, 1, 4, 8)
    assert (out < 0).all()
    # A constant map stays constant whatever the sizes.
    const = upscale_mask_logits(torch.full((2, 1, 4, 4), 1.5), 16, (12, 16), (30, 40))
    torch.testing.assert_close(const, torch.full((2, 1, 30, 40), 1.5))


def test_upscale_mask_logits_empty() -> None:
    out = upscale_mask_logits(torch.zeros((0, 1, 16, 16)), 64, (48, 64), (75, 100))
    assert out.shape == (0, 1, 75, 100)


def test_mask_boxes_from_low_res_times_four() -> None:
    low_res = torch.full((3, 1, 16, 16), -3.0)
    low_res[0, 0, 2:6, 3:8] = 4.0  # rows 2-5, cols 3-7 -> [3, 2, 8, 6] * 4
    low_res[2, 0, 5, 5] = 0.0  # sigmoid(0) = 0.5 is not > 0.5: empty
    out = mask_boxes_from_low_res(low_res)
    torch.testing.assert_close(out, torch.tensor([[12.0, 8.0, 32.0, 24.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    assert mask_boxes_from_low_res(torch.zeros((0, 1, 16, 16))).shape == (0, 4)


# ------------------------------------------------------------------ classification


def test_released_logit_scale_is_not_100() -> None:
    assert RELEASED_LOGIT_SCALE == 4.6052
    assert math.exp(RELEASED_LOGIT_SCALE) == pytest.approx(100.00298, abs=1e-5)


def test_classify_embeddings_golden() -> None:
    e1, e2, e3 = torch.eye(3)
    text = torch.stack([torch.stack([e1, e2]), torch.stack([e3, e3])])  # (C=2, S=2, D=3), class 1 padded
    embeddings = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 3.0], [-1.0, 0.0, 0.0]])
    scale = math.exp(RELEASED_LOGIT_SCALE)
    r = 1 / math.sqrt(2)
    expected = torch.tensor(
        [
            [scale, 0.0, 0.0],  # any norm: cosine 1 with synonym 0 of class 0
            [scale * r, scale * r, 0.0],  # max over synonyms: synonym 1 of class 0
            [0.0, 0.0, 0.0],  # max(-1, 0) over synonyms
        ]
    )
    out = classify_embeddings(embeddings, text, RELEASED_LOGIT_SCALE)
    torch.testing.assert_close(out, expected)
    assert float(out[0, 0]) == pytest.approx(100.00298, abs=1e-4) and abs(float(out[0, 0]) - 100.0) > 2e-3
    assert torch.equal(out[:, -1], torch.zeros(3))  # background: exactly 0


def test_classify_embeddings_empty() -> None:
    out = classify_embeddings(torch.zeros((0, 3)), torch.ones(4, 2, 3) / math.sqrt(3), RELEASED_LOGIT_SCALE)
    assert out.shape == (0, 5)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def test_fuse_open_vocab_logits_hand_computed() -> None:
    head = np.array([2.0, 1.0, 0.0, 0.5])  # 3 classes + background
    clip = np.array([0.0, 3.0, 1.0, -1.0])
    seen = torch.tensor([True, False, True])
    excluded = torch.tensor([False, False, True])
    p = np.exp(_log_softmax(head))
    q = np.exp(_log_softmax(clip))
    a, b = 0.1, 0.9
    expected_valid = [
        math.log(p[0] ** (1 - a) * q[0] ** a),  # seen: a
        math.log(p[1] ** (1 - b) * q[1] ** b),  # unseen: b
        -1000.0,  # excluded
        math.log(p[3] ** (1 - a) * q[3] ** a),  # background: like a seen class
    ]
    expected_invalid = [math.log(p[0]), math.log(p[1]), -1000.0, math.log(p[3])]  # a = b = 0
    out = fuse_open_vocab_logits(
        torch.tensor(np.stack([head, head]), dtype=torch.float32),
        torch.tensor(np.stack([clip, clip]), dtype=torch.float32),
        torch.tensor([True, False]),
        seen,
        excluded,
    )
    np.testing.assert_allclose(out.numpy(), np.array([expected_valid, expected_invalid]), rtol=1e-6, atol=1e-6)
    # By hand: log p = head - ln(e^2 + e + 1 + e^0.5) = head - 2.5460, log q = clip - 3.1852;
    # 0.9 * -0.5460 + 0.1 * -3.1852 = -0.8099; 0.1 * -1.5460 + 0.9 * -0.1852 = -0.3213;
    # background 0.9 * -2.0460 + 0.1 * -4.1852 = -2.2599.
    np.testing.assert_allclose(out[0].numpy(), [-0.8099, -0.3213, -1000.0, -2.2599], atol=1e-4)


def test_fuse_open_vocab_logits_clip_invalid_is_head_log_softmax() -> None:
    g = torch.Generator().manual_seed(0)
    head, clip = torch.randn(4, 6, generator=g) * 30, torch.randn(4, 6, generator=g) * 30
    seen = torch.tensor([True, False, True, False, True])
    excluded = torch.tensor([False, False, False, True, False])
    out = fuse_open_vocab_logits(head, clip, torch.zeros(4, dtype=torch.bool), seen, excluded)
    keep = torch.tensor([True, True, True, False, True, True])
    torch.testing.assert_close(out[:, keep], head.log_softmax(-1)[:, keep])
    assert torch.equal(out[:, ~keep], torch.full((4, 1), -1000.0))


def test_fuse_open_vocab_logits_stays_finite_for_large_logit_gaps() -> None:
    # Logit gaps of 200 (cosines differing by 2 at scale 100) underflow p in float32; the fused
    # value is still finite: (1 - a) * log p + a * log q.
    head = torch.tensor([[200.0, 0.0, 0.0, 0.0]])
    clip = torch.zeros(1, 4)
    out = fuse_open_vocab_logits(
        head, clip, torch.tensor([True]), torch.tensor([True, False, True]), torch.zeros(3, dtype=torch.bool)
    )
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 1], torch.tensor(0.1 * -200.0 + 0.9 * math.log(0.25)), atol=1e-3, rtol=0)


def test_fuse_open_vocab_logits_empty() -> None:
    out = fuse_open_vocab_logits(
        torch.zeros((0, 4)),
        torch.zeros((0, 4)),
        torch.zeros(0, dtype=torch.bool),
        torch.ones(3, dtype=torch.bool),
        torch.zeros(3, dtype=torch.bool),
    )
    assert out.shape == (0, 4)


def test_labels_from_logits_never_predicts_background() -> None:
    logits = torch.tensor([[1.0, 2.0, 0.5, 10.0], [3.0, 1.0, 2.0, -1.0]])  # background last, highest in row 0
    labels, ids, scores = labels_from_logits(logits, k=5)
    assert labels.tolist() == [1, 0]
    assert ids.tolist() == [[1, 0, 2], [0, 2, 1]]  # k is capped at C = 3
    probs = logits.softmax(-1)  # over all C + 1 columns: the top-k do not sum to 1 with background
    torch.testing.assert_close(scores[0], probs[0, [1, 0, 2]])
    torch.testing.assert_close(scores[1], probs[1, [0, 2, 1]])
    assert float(scores[0].sum()) < 0.01


def test_labels_from_logits_empty() -> None:
    labels, ids, scores = labels_from_logits(torch.zeros((0, 4)), k=2)
    assert labels.shape == (0,) and labels.dtype == torch.long
    assert ids.shape == (0, 2) and ids.dtype == torch.long
    assert scores.shape == (0, 2)


def test_mask_pool_averages_inside_the_mask_of_its_image() -> None:
    features = torch.arange(2 * 2 * 4 * 4, dtype=torch.float32).reshape(2, 2, 4, 4)
    masks = torch.full((3, 1, 4, 4), -1.0)
    masks[0, 0, 0, :2] = 1.0  # image 1: pixels (0,0), (0,1)
    masks[1, 0, 1:3, 1:3] = 1.0  # image 0: the centre 2x2
    # masks[2]: empty -> zeros
    out = mask_pool(features, masks, torch.tensor([1, 0, 0]))
    expected = torch.tensor(
        [
            [(32 + 33) / 2, (48 + 49) / 2],
            [(5 + 6 + 9 + 10) / 4, (21 + 22 + 25 + 26) / 4],
            [0.0, 0.0],
        ]
    )
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-6)
    # Masks at another resolution are resized bilinearly to the feature grid first.
    big = F.interpolate(masks, (8, 8), mode="nearest")
    torch.testing.assert_close(mask_pool(features, big, torch.tensor([1, 0, 0])), expected, atol=1e-5, rtol=1e-6)


def test_mask_pool_empty() -> None:
    out = mask_pool(torch.zeros(2, 5, 4, 4), torch.zeros((0, 1, 4, 4)), torch.zeros(0, dtype=torch.long))
    assert out.shape == (0, 5)


# ------------------------------------------------------------------ CLIP2SAM RoIAlign


@pytest.fixture(scope="module")
def recognizer_and_feats() -> tuple[CLIP2SAMRecognizer, list[torch.Tensor]]:
    torch.manual_seed(0)
    rec = CLIP2SAMRecognizer(in_channels=[4, 8, 16, 32], fpn_channels=8, embed_dim=6, roi_size=3).eval()
    g = torch.Generator().manual_seed(1)
    size = 512
    clip_feats = [torch.randn(2, c, size // s, size // s, generator=g) for c, s in zip([4, 8, 16, 32], rec.strides)]
    with torch.no_grad():
        fpn = rec.fpn(clip_feats)
    return rec, fpn


def test_region_embeddings_use_torchvision_roi_align_on_the_chosen_level(recognizer_and_feats) -> None:
    rec, fpn = recognizer_and_feats
    boxes = torch.tensor(
        [[10.0, 20.0, 50.0, 60.0], [100.0, 30.0, 220.0, 150.0], [5.0, 5.0, 240.0, 240.0], [0.0, 10.0, 500.0, 470.0]]
    )
    image_index = torch.tensor([0, 1, 1, 0])
    levels = [0, 1, 2, 3]  # by hand: sides 40, 120, 235, ~485
    assert roi_levels(boxes).tolist() == levels
    with torch.no_grad():
        out = rec.region_embeddings(fpn, boxes, image_index)
        for i, level in enumerate(levels):
            roi = torch.cat([image_index[i : i + 1, None].float(), boxes[i : i + 1]], dim=1)
            region = roi_align(
                fpn[level], roi, output_size=3, spatial_scale=1 / rec.strides[level], sampling_ratio=0, aligned=True
            )
            expected = F.relu(rec.roi_conv(region)).mean(dim=(-1, -2))[0]
            torch.testing.assert_close(out[i], expected, atol=1e-6, rtol=1e-5)
            other = roi_align(
                fpn[(level + 1) % 4],
                roi,
                output_size=3,
                spatial_scale=1 / rec.strides[(level + 1) % 4],
                sampling_ratio=0,
                aligned=True,
            )
            assert not torch.allclose(F.relu(rec.roi_conv(other)).mean(dim=(-1, -2))[0], out[i])


def test_zero_box_gives_zero_region_embedding_and_uniform_scores(recognizer_and_feats) -> None:
    rec, fpn = recognizer_and_feats
    with torch.no_grad():
        out = rec.region_embeddings(fpn, torch.zeros(2, 4), torch.tensor([0, 1]))
    assert torch.equal(out, torch.zeros(2, 6))
    text = F.normalize(torch.randn(5, 2, 6, generator=torch.Generator().manual_seed(2)), dim=-1)
    logits = classify_embeddings(out, text, RELEASED_LOGIT_SCALE)
    assert torch.equal(logits, torch.zeros(2, 6))
    _, _, scores = labels_from_logits(logits, k=5)
    torch.testing.assert_close(scores, torch.full((2, 5), 1 / 6))


def test_region_embeddings_empty(recognizer_and_feats) -> None:
    rec, fpn = recognizer_and_feats
    assert rec.region_embeddings(fpn, torch.zeros((0, 4)), torch.zeros(0, dtype=torch.long)).shape == (0, 6)
