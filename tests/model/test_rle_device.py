"""COCO RLE computed where the masks live (``model.rle_torch``) and compressed by pycocotools on the
host: byte-identical to ``pycocotools.mask.encode``, and the predictor's ``rle_on_device`` mode
gives the same output rows as shipping full masks."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import test_predictor
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from test_predictor import IMAGES, PROMPTS

from ovsam_ray.data.rle import compress_rles, encode_masks
from ovsam_ray.labels.records import prediction_to_instances
from ovsam_ray.model.amg import grid_points
from ovsam_ray.model.functional import boxes_from_masks
from ovsam_ray.model.predictor import ImagePrompts, OVSAMPredictor
from ovsam_ray.model.rle_torch import mask_run_lengths
from ovsam_ray.pipeline.prompting import SelectConfig, select_predictions
from ovsam_ray.vocabulary import Vocabulary


def _coco(masks: np.ndarray) -> list[dict]:
    """pycocotools' own encoding of (N, H, W) masks (bytes counts)."""
    with warnings.catch_warnings():  # pycocotools vs NumPy 2's __array__(copy=...) deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))


def _device_rles(masks: torch.Tensor) -> list[dict]:
    counts, lengths = mask_run_lengths(masks)
    assert counts.device == masks.device and lengths.device == masks.device
    assert counts.dtype == torch.int32 and lengths.dtype == torch.int64
    runs = np.split(counts.cpu().numpy(), np.cumsum(lengths.cpu().numpy())[:-1]) if len(lengths) else []
    return [{"size": list(masks.shape[1:]), "counts": c} for c in runs]


def _assert_matches_pycocotools(masks: np.ndarray, device: str = "cpu") -> None:
    uncompressed = _device_rles(torch.from_numpy(masks).to(device))
    ref = _coco(masks)
    ours = compress_rles(uncompressed)
    assert [o["counts"] for o in ours] == [r["counts"].decode("ascii") for r in ref]
    assert [o["size"] for o in ours] == [list(masks.shape[1:])] * len(masks)
    assert ours == encode_masks(masks)
    areas = [int(r["counts"][1::2].sum()) for r in uncompressed]  # ones runs are the odd ones
    assert areas == [int(a) for a in mask_utils.area(ref)] == masks.reshape(len(masks), -1).sum(1).tolist()
    if 0 in masks.shape[1:]:
        return  # no mask box of a 0-pixel image (the predictor never makes one)
    xyxy = boxes_from_masks(torch.from_numpy(masks)).numpy()
    xywh = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1)
    np.testing.assert_array_equal(xywh, mask_utils.toBbox(ref).reshape(-1, 4))


def _edge_masks(h: int, w: int) -> np.ndarray:
    """All zero, all one, a single pixel in each corner, a full first/last row and column."""
    masks = np.zeros((9, h, w), bool)
    masks[1] = True
    masks[2, 0, 0] = masks[3, 0, -1] = masks[4, -1, 0] = masks[5, -1, -1] = True
    masks[6, 0] = masks[7, :, 0] = masks[8, :, -1] = True
    return masks


def _random_masks(n: int, h: int, w: int, seed: int) -> np.ndarray:
    """Half noise, half smooth blobs like upsampled mask logits."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(n - n // 2, h, w, generator=g) > 0.5
    low = F.avg_pool2d(torch.randn(n // 2, 1, 32, 32, generator=g), 5, 1, 2)
    blobs = F.interpolate(low, (h, w), mode="bilinear", align_corners=False)[:, 0] > 0
    return torch.cat([noise, blobs]).numpy()


@pytest.mark.parametrize("hw", [(1, 1), (1, 37), (29, 1), (2, 2), (7, 5), (480, 640)])
def test_edge_case_masks_match_pycocotools(hw) -> None:
    _assert_matches_pycocotools(_edge_masks(*hw))


@pytest.mark.parametrize("hw", [(1, 64), (64, 1), (33, 17), (480, 640)])
def test_random_masks_match_pycocotools(hw) -> None:
    _assert_matches_pycocotools(_random_masks(6, *hw, seed=hw[0] * 1000 + hw[1]))


def test_run_lengths_of_known_masks() -> None:
    # Column-major: [[0, 1], [1, 1]] reads 0, 1, 1, 1.
    masks = torch.tensor([[[0, 1], [1, 1]], [[1, 0], [0, 0]], [[0, 0], [0, 0]], [[1, 1], [1, 1]]], dtype=torch.bool)
    counts, lengths = mask_run_lengths(masks)
    assert lengths.tolist() == [2, 3, 1, 2]
    assert counts.tolist() == [1, 3, 0, 1, 3, 4, 0, 4]


def test_empty_inputs() -> None:
    counts, lengths = mask_run_lengths(torch.zeros((0, 5, 7), dtype=torch.bool))
    assert counts.shape == lengths.shape == (0,)
    assert compress_rles([]) == []
    # Zero-pixel masks: pycocotools writes a single 0-long run.
    assert _device_rles(torch.zeros((2, 0, 5), dtype=torch.bool))[1]["counts"].tolist() == [0]
    _assert_matches_pycocotools(np.zeros((2, 0, 5), bool))
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        mask_run_lengths(torch.zeros((4, 4), dtype=torch.bool))


# ------------------------------------------------------------------ the predictor


# tests/model/test_predictor.py's ``predictor`` fixture: the tiny preset on a CPU, full masks to the host.
tiny_predictor = test_predictor.predictor
NUM_CLASSES = test_predictor.NUM_CLASSES
VOCAB = Vocabulary.from_json({"name": "six", "classes": [{"id": 10 + i, "name": f"c{i}"} for i in range(NUM_CLASSES)]})


@pytest.fixture(scope="module")
def predictors(tiny_predictor: OVSAMPredictor) -> tuple[OVSAMPredictor, OVSAMPredictor]:
    """(full masks to the host, run lengths only) on the same tiny model."""
    model, classifier = tiny_predictor.model, tiny_predictor.classifier
    on_device = OVSAMPredictor(model, classifier, fast=False, rle_on_device=True)
    assert tiny_predictor.rle_on_device is False and on_device.rle_on_device is True  # CPU default: full masks
    return tiny_predictor, on_device


def test_rle_mode_ships_no_masks_and_gives_the_same_rows(predictors) -> None:
    masks_mode, rle_mode = predictors
    embedded = masks_mode.embed(IMAGES)
    for image, prompts, old, new in zip(
        IMAGES, PROMPTS, masks_mode.predict(embedded, PROMPTS), rle_mode.predict(embedded, PROMPTS)
    ):
        h, w = image.shape[:2]
        assert old.rles is None and old.masks.shape == (len(prompts), h, w)
        assert new.masks is None and len(new.rles) == len(prompts)
        np.testing.assert_array_equal(new.areas, old.mask_areas())
        np.testing.assert_array_equal(new.mask_boxes, old.mask_boxes)
        np.testing.assert_array_equal(new.labels, old.labels)
        rows = prediction_to_instances(new, prompts, VOCAB, with_embedding=True)
        assert rows == prediction_to_instances(old, prompts, VOCAB, with_embedding=True)
        assert rows == [] or any(r["area"] > 0 for r in rows)
        ref = [{"size": r["rle"]["size"], "counts": r["rle"]["counts"].encode("ascii")} for r in rows]
        if rows:  # the row's area and bbox follow pycocotools' area and toBbox of its RLE
            assert [r["area"] for r in rows] == mask_utils.area(ref).tolist()
            xywh = mask_utils.toBbox(ref)
            xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
            np.testing.assert_array_equal([r["bbox"] for r in rows], xyxy)
        keep = np.arange(len(prompts))[::-2]
        kept = prediction_to_instances(new, prompts, VOCAB, keep=keep)
        assert kept == prediction_to_instances(old, prompts, VOCAB, keep=keep)
        assert [r["rle"] for r in kept] == [rows[i]["rle"] for i in keep]


def test_rle_mode_grid_selection_is_unchanged(predictors) -> None:
    masks_mode, rle_mode = predictors
    h, w = IMAGES[0].shape[:2]
    prompts = ImagePrompts(boxes=PROMPTS[0].boxes, points=grid_points(4, h, w))
    types = ["box"] * len(prompts.boxes) + ["grid"] * len(prompts.points)
    cfg = SelectConfig(grid_stability=0.5, min_mask_area=20, dedup_iou=0.8)
    old = masks_mode([IMAGES[0]], [prompts])[0]
    new = rle_mode([IMAGES[0]], [prompts])[0]
    keep = select_predictions(old, types, cfg)
    np.testing.assert_array_equal(select_predictions(new, types, cfg), keep)
    kw = {"types": types, "keep": keep}
    assert prediction_to_instances(new, prompts, VOCAB, **kw) == prediction_to_instances(old, prompts, VOCAB, **kw)


def test_rle_mode_without_prompts(predictors) -> None:
    _, rle_mode = predictors
    no_prompts = rle_mode(IMAGES, [ImagePrompts()] * len(IMAGES))  # nothing to decode at all
    some_prompts = rle_mode(IMAGES, [ImagePrompts(), ImagePrompts(), PROMPTS[2]])
    for pred in no_prompts + some_prompts[:2]:
        assert pred.masks is None and pred.rles == [] and pred.areas.shape == (0,)
        assert prediction_to_instances(pred, ImagePrompts(), VOCAB) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_lengths_and_predictor(tiny_predictor: OVSAMPredictor) -> None:
    masks = np.concatenate([_random_masks(8, 480, 640, seed=7), _edge_masks(480, 640)])
    _assert_matches_pycocotools(masks, device="cuda")
    # Copies: OVSAMPredictor moves its model in place, and the CPU fixture is shared.
    model, classifier = copy.deepcopy(tiny_predictor.model), copy.deepcopy(tiny_predictor.classifier)
    cuda = OVSAMPredictor(model, classifier, device="cuda", fast=False)
    assert cuda.rle_on_device is True
    reference = OVSAMPredictor(model, classifier, device="cuda", fast=False, rle_on_device=False)
    for prompts, new, old in zip(PROMPTS, cuda(IMAGES, PROMPTS), reference(IMAGES, PROMPTS)):
        assert new.masks is None
        assert prediction_to_instances(new, prompts, VOCAB) == prediction_to_instances(old, prompts, VOCAB)
