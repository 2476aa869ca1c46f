"""Mask <-> COCO RLE, areas and boxes: golden values and empty inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ovsam_ray.data.rle import boxes_from_binary_masks, decode_rle, encode_masks, mask_areas, rle_area


def _golden_mask() -> np.ndarray:
    # 3x4; column-major flattening is 0,0,0 | 1,1,0 | 0,1,0 | 0,0,0 -> runs [3, 2, 2, 1, 4]
    m = np.zeros((3, 4), bool)
    m[0, 1] = m[1, 1] = m[1, 2] = True
    return m


def test_encode_golden():
    (rle,) = encode_masks(_golden_mask()[None])
    assert rle == {"size": [3, 4], "counts": "322O2"}
    assert isinstance(rle["counts"], str)
    json.dumps(rle)  # JSON-ready


def test_decode_compressed_and_uncompressed_golden():
    expected = _golden_mask()
    for rle in (
        {"size": [3, 4], "counts": "322O2"},
        {"size": [3, 4], "counts": b"322O2"},
        {"size": [3, 4], "counts": [3, 2, 2, 1, 4]},
    ):
        out = decode_rle(rle)
        assert out.dtype == bool and out.shape == (3, 4)
        np.testing.assert_array_equal(out, expected)
    assert rle_area({"size": [3, 4], "counts": "322O2"}) == 3


def test_roundtrip_random_masks():
    rng = np.random.default_rng(0)
    masks = rng.random((5, 17, 23)) > 0.6
    masks[1] = False
    masks[2] = True
    rles = encode_masks(masks)
    assert len(rles) == 5 and all(r["size"] == [17, 23] for r in rles)
    for m, r in zip(masks, rles):
        np.testing.assert_array_equal(decode_rle(r), m)
        assert rle_area(r) == m.sum()
    assert encode_masks(masks.astype(np.uint8)) == rles  # any integer/bool dtype


def test_areas_and_boxes_golden():
    masks = np.zeros((3, 5, 6), bool)
    masks[0, 1:4, 2:5] = True  # rows 1..3, cols 2..4
    masks[1, 4, 0] = True  # a single pixel at the bottom-left corner
    np.testing.assert_array_equal(mask_areas(masks), [9, 1, 0])
    assert mask_areas(masks).dtype == np.int64
    boxes = boxes_from_binary_masks(masks)
    assert boxes.dtype == np.float32
    np.testing.assert_array_equal(boxes, [[2, 1, 5, 4], [0, 4, 1, 5], [0, 0, 0, 0]])
    np.testing.assert_array_equal(boxes_from_binary_masks(_golden_mask()[None]), [[1, 0, 3, 2]])
    full = np.ones((1, 5, 6), bool)
    np.testing.assert_array_equal(boxes_from_binary_masks(full), [[0, 0, 6, 5]])


def test_empty_inputs():
    empty = np.zeros((0, 7, 9), bool)
    assert encode_masks(empty) == []
    assert mask_areas(empty).shape == (0,)
    assert boxes_from_binary_masks(empty).shape == (0, 4)
    blank = encode_masks(np.zeros((1, 7, 9), bool))[0]
    assert decode_rle(blank).shape == (7, 9) and not decode_rle(blank).any()


def test_wrong_rank_is_rejected():
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        encode_masks(np.zeros((4, 4), bool))
