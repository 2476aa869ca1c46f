"""OVSAMPredictor on the tiny preset: batching, prompt kinds and order, clipping, odd images,
masks at the original size, the CLIP branch's box, and the classifier's fusion."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovsam_ray.model.classifier import OpenVocabClassifier
from ovsam_ray.model.functional import boxes_from_masks, resize_image, resized_shape, upscale_mask_logits
from ovsam_ray.model.ovsam import PromptBatch
from ovsam_ray.model.predictor import ImagePrediction, ImagePrompts, OVSAMPredictor
from ovsam_ray.model.presets import build_ovsam

NUM_CLASSES = 6
SEEN = [True, True, True, False, False, True]
EXCLUDED = [False, False, False, False, True, False]
NAN4 = [np.nan] * 4


@pytest.fixture(scope="module")
def predictor() -> OVSAMPredictor:
    torch.manual_seed(0)
    model = build_ovsam("ovsam_tiny").eval()
    text = F.normalize(torch.randn(NUM_CLASSES, 2, 64, generator=torch.Generator().manual_seed(1)), dim=-1)
    classifier = OpenVocabClassifier(text_embeddings=text, seen=torch.tensor(SEEN), excluded=torch.tensor(EXCLUDED))
    return OVSAMPredictor(model, classifier, device="cpu", fast=False)


def _image(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    image = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], axis=-1)
    image[h // 4 : h // 2, w // 3 : 2 * w // 3] = rng.integers(0, 256, 3)
    return (image + rng.integers(0, 20, image.shape)).clip(0, 255).astype(np.uint8)


def _prompts(boxes=(), points=(), point_boxes=None) -> ImagePrompts:
    return ImagePrompts(
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        points=np.asarray(points, np.float32).reshape(-1, 2),
        point_boxes=None if point_boxes is None else np.asarray(point_boxes, np.float32).reshape(-1, 4),
    )


IMAGES = [_image(120, 200, 0), _image(300, 90, 1), _image(64, 64, 2)]
PROMPTS = [
    _prompts(
        boxes=[[20, 10, 110, 90], [120, 40, 190, 115]],
        points=[[60, 50], [150, 80]],
        point_boxes=[[20, 10, 110, 90], NAN4],
    ),
    _prompts(),  # an image without prompts
    _prompts(points=[[30, 30]]),
]


@pytest.fixture(scope="module")
def batched(predictor: OVSAMPredictor) -> list[ImagePrediction]:
    return predictor(IMAGES, PROMPTS)


@pytest.fixture(scope="module")
def embedded0(predictor: OVSAMPredictor):
    """IMAGES[0] embedded once, for tests that decode many prompt sets on it."""
    return predictor.embed([IMAGES[0]])


FLOAT_FIELDS = (
    "low_res_logits",
    "head_logits",
    "clip_logits",
    "fused_logits",
    "scores",
    "topk_scores",
    "region_embeddings",
    "clip_embeddings",
    "mask_boxes",
)
EXACT_FIELDS = ("labels", "head_labels", "topk_ids", "clip_valid", "is_point")


def _assert_same(a: ImagePrediction, b: ImagePrediction, *, exact: bool = False) -> None:
    for f in dataclasses.fields(ImagePrediction):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if x is None or y is None or f.name == "rles":  # the mask outputs of one mode (tests/model/test_rle_device.py)
            assert (x is None) == (y is None), f.name
            continue
        assert x.shape == y.shape, f.name
        if exact or f.name in EXACT_FIELDS:
            np.testing.assert_array_equal(x, y, err_msg=f.name)
        elif f.name == "masks":  # thresholded at 0: a rounding difference may flip a boundary pixel
            assert x.size == 0 or np.mean(x != y) <= 1e-3, f.name
        elif f.name == "areas":  # the same few boundary pixels
            np.testing.assert_allclose(x, y, rtol=1e-2, atol=2, err_msg=f.name)
        elif f.name == "mask_boxes":
            np.testing.assert_allclose(x, y, atol=1.0, err_msg=f.name)
        else:
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-3, err_msg=f.name)


def _assert_finite(pred: ImagePrediction) -> None:
    for name in FLOAT_FIELDS:
        assert np.isfinite(getattr(pred, name)).all(), name


# ------------------------------------------------------------------ batching


def test_batched_equals_per_image(predictor: OVSAMPredictor, batched) -> None:
    assert len(batched) == 3
    for image, prompts, pred in zip(IMAGES, PROMPTS, batched):
        _assert_same(pred, predictor([image], [prompts])[0])
    assert [len(p.labels) for p in batched] == [4, 0, 1]


def test_image_without_prompts_gives_well_formed_empties(batched) -> None:
    pred = batched[1]
    c1 = NUM_CLASSES + 1
    assert pred.masks.shape == (0, 300, 90) and pred.masks.dtype == bool
    assert pred.mask_boxes.shape == (0, 4)
    assert pred.low_res_logits.shape == (0, 1, 64, 64)
    assert pred.head_logits.shape == pred.clip_logits.shape == pred.fused_logits.shape == (0, c1)
    assert pred.labels.shape == pred.scores.shape == pred.head_labels.shape == (0,)
    assert pred.topk_ids.shape == pred.topk_scores.shape == (0, 5)
    assert pred.region_embeddings.shape == pred.clip_embeddings.shape == (0, 64)
    assert pred.clip_valid.shape == pred.is_point.shape == (0,)


def test_no_prompts_at_all(predictor: OVSAMPredictor, batched) -> None:
    empty = predictor(IMAGES, [ImagePrompts(), ImagePrompts(), ImagePrompts()])
    assert [p.masks.shape for p in empty] == [(0, 120, 200), (0, 300, 90), (0, 64, 64)]
    assert all(p.fused_logits.shape == (0, NUM_CLASSES + 1) for p in empty)
    _assert_same(empty[1], batched[1], exact=True)
    assert predictor([], []) == []


def test_prompt_count_must_match_images(predictor: OVSAMPredictor) -> None:
    with pytest.raises(ValueError, match="prompts for 1 images"):
        predictor(IMAGES[:2], PROMPTS[:1])


def test_embed_once_then_predict_many(predictor: OVSAMPredictor, batched) -> None:
    embedded = predictor.embed(IMAGES)
    first = predictor.predict(embedded, PROMPTS)
    again = predictor.predict(embedded, PROMPTS)
    for a, b, c in zip(first, again, batched):
        _assert_same(a, b, exact=True)
        _assert_same(a, c, exact=True)  # __call__ is embed + predict
    # Images resized beforehand (e.g. on a CPU worker) with their original sizes give the same result.
    resized = [resize_image(torch.from_numpy(im), 256).numpy() for im in IMAGES]
    pre = predictor.predict(predictor.embed(resized, original_sizes=[im.shape[:2] for im in IMAGES]), PROMPTS)
    for a, b in zip(first, pre):
        _assert_same(a, b)


def test_prompt_chunks_do_not_change_results(predictor: OVSAMPredictor, batched) -> None:
    chunked = OVSAMPredictor(predictor.model, predictor.classifier, fast=False, prompt_chunk=2)
    for a, b in zip(batched, chunked(IMAGES, PROMPTS)):
        _assert_same(a, b)


# ------------------------------------------------------------------ prompts


def test_prompt_order_is_boxes_then_points(predictor: OVSAMPredictor, embedded0) -> None:
    p = PROMPTS[0]
    full = predictor.predict(embedded0, [p])[0]
    np.testing.assert_array_equal(full.is_point, [False, False, True, True])
    singles = [_prompts(boxes=[box]) for box in p.boxes]
    singles += [_prompts(points=[pt], point_boxes=[pb]) for pt, pb in zip(p.points, p.point_boxes)]
    for i, single in enumerate(singles):
        one = predictor.predict(embedded0, [single])[0]
        for name in ("low_res_logits", "head_logits", "clip_logits", "fused_logits"):
            np.testing.assert_allclose(
                getattr(one, name)[0], getattr(full, name)[i], rtol=1e-4, atol=1e-3, err_msg=f"prompt {i} {name}"
            )


def test_point_box_is_the_clip_branch_box(predictor: OVSAMPredictor, embedded0) -> None:
    box = [20.0, 10.0, 110.0, 90.0]
    pred = predictor.predict(embedded0, [_prompts(boxes=[box], points=[[150, 80]], point_boxes=[box])])[0]
    # A box prompt's CLIP box is the box itself; the point's CLIP box is its point box: same CLIP embedding.
    np.testing.assert_allclose(pred.clip_embeddings[1], pred.clip_embeddings[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(pred.low_res_logits[1], pred.low_res_logits[0])  # but its own mask
    # A NaN point box means "no box", exactly as giving none at all.
    nan_box = predictor.predict(embedded0, [_prompts(points=[[150, 80]], point_boxes=[NAN4])])[0]
    no_box = predictor.predict(embedded0, [_prompts(points=[[150, 80]])])[0]
    _assert_same(nan_box, no_box, exact=True)
    assert not np.allclose(nan_box.clip_embeddings[0], pred.clip_embeddings[1])


def test_nan_clip_box_uses_the_mask_derived_box(predictor: OVSAMPredictor) -> None:
    model = predictor.model
    images = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(4))
    nan = torch.full((3, 4), float("nan"))
    prompts = PromptBatch(
        boxes=torch.tensor([[0.0, 0.0, 0.0, 0.0], [10.0, 20.0, 100.0, 120.0], [0.0, 0.0, 0.0, 0.0]]),
        points=torch.tensor([[50.0, 60.0], [0.0, 0.0], [200.0, 30.0]]),
        is_point=torch.tensor([True, False, True]),
        image_index=torch.tensor([0, 1, 1]),
        clip_boxes=nan,
    )
    with torch.no_grad():
        feats = model.embed(images)
        out = model.decode(feats, prompts)
        explicit = model.decode(feats, dataclasses.replace(prompts, clip_boxes=out.roi_boxes))
        other = model.decode(feats, dataclasses.replace(prompts, clip_boxes=torch.tensor([[0.0, 0.0, 40.0, 40.0]] * 3)))
    assert torch.equal(out.clip_embeddings, explicit.clip_embeddings)
    assert not torch.allclose(out.clip_embeddings, other.clip_embeddings)


def test_prompts_outside_the_image_are_clipped(predictor: OVSAMPredictor, embedded0) -> None:
    # IMAGES[0]: H = 120, W = 200
    outside = _prompts(
        boxes=[[-20, -10, 50, 400], [150, 100, 60, 20]], points=[[-5, 500]], point_boxes=[[-10, -10, 300, 300]]
    )
    clipped = _prompts(boxes=[[0, 0, 50, 120], [60, 20, 150, 100]], points=[[0, 120]], point_boxes=[[0, 0, 200, 120]])
    _assert_same(predictor.predict(embedded0, [outside])[0], predictor.predict(embedded0, [clipped])[0], exact=True)


def test_zero_area_boxes_give_finite_outputs(predictor: OVSAMPredictor, embedded0) -> None:
    pred = predictor.predict(
        embedded0,
        [
            _prompts(
                boxes=[[30, 30, 30, 30], [10, 10, 10, 50], [0, 0, 0, 0]],
                points=[[40, 40]],
                point_boxes=[[40, 40, 40, 40]],
            )
        ],
    )[0]
    assert pred.labels.shape == (4,)
    _assert_finite(pred)


def test_grayscale_and_rgba_equal_the_rgb_image(predictor: OVSAMPredictor) -> None:
    gray = IMAGES[0][:, :, 1].copy()
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    alpha = np.random.default_rng(3).integers(0, 256, gray.shape, dtype=np.uint8)
    rgba = np.concatenate([IMAGES[0], alpha[:, :, None]], axis=2)
    p = PROMPTS[0]
    # Separate calls: the same image at two batch positions may differ in the last float bit.
    ref_gray = predictor([rgb], [p])[0]
    _assert_same(predictor([gray], [p])[0], ref_gray, exact=True)
    _assert_same(predictor([gray[:, :, None]], [p])[0], ref_gray, exact=True)
    _assert_same(predictor([rgba], [p])[0], predictor.predict(predictor.embed([IMAGES[0]]), [p])[0], exact=True)
    with pytest.raises(ValueError, match="channels"):
        predictor([np.zeros((8, 8, 2), np.uint8)], [p])


# ------------------------------------------------------------------ outputs


def test_masks_at_original_size_and_their_boxes(batched) -> None:
    for image, prompts, pred in zip(IMAGES, PROMPTS, batched):
        h, w = image.shape[:2]
        assert pred.masks.shape == (len(prompts), h, w) and pred.masks.dtype == bool
        expected = upscale_mask_logits(torch.from_numpy(pred.low_res_logits), 256, resized_shape(h, w, 256), (h, w))
        np.testing.assert_array_equal(pred.masks, (expected[:, 0] > 0).numpy())
        np.testing.assert_array_equal(pred.mask_boxes, boxes_from_masks(torch.from_numpy(pred.masks)).numpy())
    assert batched[0].masks.any()  # the check above is not about empty masks only


def test_labels_scores_and_topk_are_consistent(batched) -> None:
    pred = batched[0]
    np.testing.assert_array_equal(pred.labels, pred.topk_ids[:, 0])
    np.testing.assert_array_equal(pred.scores, pred.topk_scores[:, 0])
    assert (pred.labels < NUM_CLASSES).all() and not np.isin(pred.labels, np.flatnonzero(EXCLUDED)).any()
    assert (np.diff(pred.topk_scores, axis=1) <= 0).all()
    probs = torch.from_numpy(pred.fused_logits).softmax(-1).numpy()
    np.testing.assert_allclose(pred.scores, probs[np.arange(len(probs)), pred.labels], rtol=1e-5)
    np.testing.assert_array_equal(pred.head_labels, pred.head_logits[:, :-1].argmax(1))
    np.testing.assert_array_equal(pred.fused_logits[:, 4], -1000.0)  # excluded class
    assert (pred.head_logits[:, -1] == 0).all() and (pred.clip_logits[:, -1] == 0).all()


def test_clip_invalid_fused_equals_head_log_softmax(predictor: OVSAMPredictor, batched) -> None:
    pred = batched[0]
    region, clip = torch.from_numpy(pred.region_embeddings), torch.from_numpy(pred.clip_embeddings)
    n = len(region)
    off = predictor.classifier(region, clip, torch.zeros(n, dtype=torch.bool))
    on = predictor.classifier(region, clip, torch.ones(n, dtype=torch.bool))
    keep = ~torch.tensor(EXCLUDED + [False])
    torch.testing.assert_close(off.fused_logits[:, keep], off.head_logits.log_softmax(-1)[:, keep])
    assert not torch.allclose(on.fused_logits[:, keep], off.fused_logits[:, keep])
    as_predicted = predictor.classifier(region, clip, torch.from_numpy(pred.clip_valid))
    torch.testing.assert_close(as_predicted.fused_logits, torch.from_numpy(pred.fused_logits))


def test_stability_score_is_sams_on_the_full_size_logits(predictor: OVSAMPredictor, batched) -> None:
    from ovsam_ray.model.predictor import stability_scores

    logits = torch.tensor([[[3.0, 0.5, -0.5, -3.0]], [[-3.0, -3.0, -3.0, -3.0]], [[2.0, 2.0, 0.5, -2.0]]])
    # at +1: {3}, {}, {2, 2}; at -1: {3, 0.5, -0.5}, {}, {2, 2, 0.5}
    np.testing.assert_allclose(stability_scores(logits).numpy(), [1 / 3, 0.0, 2 / 3], rtol=1e-6)
    pred, empty = batched[0], batched[1]
    assert pred.stability.shape == (4,) and pred.stability.dtype == np.float32
    assert ((pred.stability >= 0) & (pred.stability <= 1)).all()
    assert empty.stability.shape == (0,)
    # the same as thresholding the upscaled logits by hand
    emb = predictor.embed([IMAGES[0]])
    low = torch.as_tensor(pred.low_res_logits)
    up = upscale_mask_logits(low, predictor.model.image_size, emb.input_sizes[0], emb.original_sizes[0])[:, 0]
    hand = ((up > 1).flatten(1).sum(1).float() / (up > -1).flatten(1).sum(1).clamp(min=1).float()).numpy()
    np.testing.assert_allclose(pred.stability, hand, atol=1e-5)
