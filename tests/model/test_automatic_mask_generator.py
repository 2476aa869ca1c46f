"""OVSAMAutomaticMaskGenerator: the selection rule on hand-made predictions (golden values, empty
inputs), then the generator on the tiny preset with random weights (original-image pixels,
thresholds, mask NMS, batching, run-length mode, empty results) and against the label job's
grid mode on the same images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovsam_ray.model.amg import grid_points
from ovsam_ray.model.automatic_mask_generator import (
    GeneratedMasks,
    OVSAMAutomaticMaskGenerator,
    mask_quality,
    remove_duplicates,
)
from ovsam_ray.model.classifier import OpenVocabClassifier
from ovsam_ray.model.predictor import ImagePrediction, ImagePrompts, OVSAMPredictor
from ovsam_ray.model.presets import build_ovsam

NUM_CLASSES = 6


def _pred(low: np.ndarray, scores: list[float], labels: list[int]) -> ImagePrediction:
    """An ImagePrediction whose masks are ``low`` (N, h, w) logits > 0 (at the low-res size)."""
    n = len(low)
    masks = low > 0
    z = np.zeros((n, 3), np.float32)
    labels_arr, scores_arr = np.asarray(labels, np.int64), np.asarray(scores, np.float32)
    return ImagePrediction(
        masks=masks,
        mask_boxes=np.zeros((n, 4), np.float32),
        low_res_logits=low[:, None],
        head_logits=z,
        clip_logits=z,
        fused_logits=z,
        labels=labels_arr,
        scores=scores_arr,
        head_labels=labels_arr,
        topk_ids=labels_arr[:, None],
        topk_scores=scores_arr[:, None],
        region_embeddings=z,
        clip_embeddings=z,
        clip_valid=np.ones(n, bool),
        is_point=np.ones(n, bool),
        areas=masks.sum(axis=(1, 2)).astype(np.int64),
    )


def _hand_made() -> ImagePrediction:
    low = np.full((5, 8, 8), -10.0, np.float32)
    low[0, :4, :4] = 10  # 16 px, stable
    low[1, :4, :4] = 10
    low[1, 4, 0] = 10  # 17 px, IoU 16/17 with 0
    low[2, :, :] = 0.5  # 64 px, unstable: every logit within +-1
    low[3, 4:, 4:] = 10  # 16 px, disjoint from 0 and 1
    low[4, 5:7, 5:7] = 10  # 4 px inside 3 (IoU 4/16)
    return _pred(low, [0.5, 0.9, 0.8, 0.7, 0.6], [0, 0, 1, 1, 0])


def test_mask_quality_golden():
    pred = _hand_made()
    grid = np.ones(5, bool)
    assert mask_quality(pred, grid).tolist() == [True, True, False, True, True]
    assert mask_quality(pred, grid, stability_thresh=0.0).all()
    assert mask_quality(pred, grid, min_area=16).tolist() == [True, True, False, True, False]
    assert mask_quality(pred, grid, score_thresh=0.65).tolist() == [False, True, False, True, False]
    # Only area applies to box and point prompts; stability and score only to grid prompts.
    boxes = np.zeros(5, bool)
    assert mask_quality(pred, boxes, score_thresh=0.95).all()
    assert mask_quality(pred, boxes, min_area=17).tolist() == [False, True, True, False, False]
    # A grid prompt's empty mask never survives, whatever the thresholds.
    empty = _pred(np.full((1, 8, 8), -10.0, np.float32), [0.9], [0])
    assert mask_quality(empty, np.ones(1, bool), stability_thresh=0.0).tolist() == [False]
    assert mask_quality(empty, np.zeros(1, bool)).tolist() == [True]


def test_remove_duplicates_golden():
    pred = _hand_made()
    grid, everything = np.ones(5, bool), np.ones(5, bool)
    assert remove_duplicates(pred, everything, grid).tolist() == [False, True, True, True, True]
    assert remove_duplicates(pred, everything, grid, nms_iou=0.95).all()
    # Only kept masks take part: with 1 gone, 0 is not suppressed by it.
    assert remove_duplicates(pred, np.array([1, 0, 1, 1, 1], bool), grid).tolist() == [True, False, True, True, True]
    # Box prompts are not NMS'd; de-duplication (IoU, containment, per class) covers every prompt.
    boxes = np.zeros(5, bool)
    assert remove_duplicates(pred, everything, boxes).all()
    assert remove_duplicates(pred, everything, boxes, dedup_iou=0.9).tolist() == [False, True, True, True, True]
    contained = remove_duplicates(pred, everything, boxes, dedup_containment=0.9)
    assert contained.tolist() == [False, True, True, False, False]  # 0, 3 and 4 lie inside 1 or 2
    per_class = remove_duplicates(pred, everything, boxes, dedup_containment=0.9, dedup_class_aware=True)
    assert per_class.tolist() == [False, True, True, False, True]  # 4 (class 0) lies in 3 and 2, both class 1
    assert remove_duplicates(pred, np.zeros(5, bool), grid).sum() == 0


def test_selection_of_no_predictions():
    pred = _pred(np.zeros((0, 8, 8), np.float32), [], [])
    none = np.zeros(0, bool)
    assert mask_quality(pred, none).shape == (0,)
    assert remove_duplicates(pred, none, none, dedup_iou=0.5).shape == (0,)


# --- the generator on the tiny preset ---------------------------------------------------------

H, W = 120, 200  # not square: a swapped axis shows


@pytest.fixture(scope="module")
def predictor() -> OVSAMPredictor:
    torch.manual_seed(0)
    model = build_ovsam("ovsam_tiny").eval()
    text = F.normalize(torch.randn(NUM_CLASSES, 2, 64, generator=torch.Generator().manual_seed(1)), dim=-1)
    classifier = OpenVocabClassifier(
        text_embeddings=text,
        seen=torch.ones(NUM_CLASSES, dtype=torch.bool),
        excluded=torch.zeros(NUM_CLASSES, dtype=torch.bool),
    )
    return OVSAMPredictor(model, classifier, device="cpu", fast=False)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:H, 0:W]
    image = np.stack([x * 255 // (W - 1), y * 255 // (H - 1), (x + y) % 256], axis=-1)
    image[30:60, 70:140] = (240, 220, 30)
    return (image + rng.integers(0, 20, image.shape)).clip(0, 255).astype(np.uint8)


# With random weights every logit is small: no mask is stable at SAM's offset of 1.0, so tests
# that need survivors measure stability at a small offset or switch the filter off.
EVERYTHING = {"stability_score_thresh": 0.0, "mask_nms_thresh": 1.0}


def test_records_are_the_predictors_masks_in_original_pixels(predictor, image):
    n = 4
    records = OVSAMAutomaticMaskGenerator(predictor, points_per_side=n, **EVERYTHING).generate(image)
    points = grid_points(n, H, W)
    direct = predictor([image], [ImagePrompts(points=points)])[0]
    kept = np.nonzero(direct.masks.any(axis=(1, 2)))[0]  # only empty masks fail with the filters off
    assert len(records) == len(kept) > 0
    for record, i in zip(records, kept):
        seg = record["segmentation"]
        assert seg.shape == (H, W) and seg.dtype == bool
        np.testing.assert_array_equal(seg, direct.masks[i])
        assert record["area"] == seg.sum()
        ys, xs = np.nonzero(seg)
        assert record["bbox"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]  # XYXY
        assert record["point_coords"] == [points[i].tolist()]
        assert (record["label"], record["score"]) == (direct.labels[i], pytest.approx(direct.scores[i]))
        assert record["topk_ids"] == direct.topk_ids[i].tolist()
        assert 0.0 <= record["stability_score"] <= 1.0


def test_thresholds_filter(predictor, image):
    def run(**kw) -> GeneratedMasks:
        return OVSAMAutomaticMaskGenerator(
            predictor, points_per_side=6, mask_nms_thresh=1.0, stability_score_offset=0.01, **kw
        ).predict(image)

    everything = run(stability_score_thresh=0.0)
    stability = everything.stability_scores
    t = float(np.median(stability))
    stable = run(stability_score_thresh=t)
    assert 0 < len(stable) < len(everything)
    np.testing.assert_array_equal(stable.points, everything.points[stability >= t])
    assert (stable.stability_scores >= t).all()

    areas = everything.prediction.mask_areas()
    a = int(np.median(areas))
    large = run(stability_score_thresh=0.0, min_mask_area=a)
    assert 0 < len(large) < len(everything)
    np.testing.assert_array_equal(large.points, everything.points[areas >= a])

    scores = everything.prediction.scores
    assert len(run(stability_score_thresh=0.0, score_thresh=float(scores.min()))) == len(everything)
    assert len(run(stability_score_thresh=0.0, score_thresh=float(np.nextafter(scores.max(), 2)))) == 0


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return np.logical_and(a, b).sum() / union if union else 1.0


def test_mask_nms_removes_duplicates(predictor, image):
    every = OVSAMAutomaticMaskGenerator(predictor, points_per_side=6, **EVERYTHING).predict(image)
    nms = OVSAMAutomaticMaskGenerator(
        predictor, points_per_side=6, stability_score_thresh=0.0, mask_nms_thresh=0.7
    ).predict(image)
    assert 0 < len(nms) < len(every)
    low = every.prediction.low_res_logits[:, 0] > 0
    kept = [int(np.nonzero((every.points == p).all(axis=1))[0][0]) for p in nms.points]
    for a in kept:
        for b in kept:
            assert a == b or _iou(low[a], low[b]) <= 0.7
    scores = every.prediction.scores
    for d in set(range(len(every))) - set(kept):  # each dropped mask duplicates a kept, higher-scored one
        assert any(_iou(low[d], low[k]) > 0.7 and scores[k] >= scores[d] for k in kept)


def test_batches_and_run_length_mode_give_the_same_masks(predictor, image):
    options = {"points_per_side": 5, "stability_score_thresh": 0.0, "mask_nms_thresh": 0.7}
    whole = OVSAMAutomaticMaskGenerator(predictor, **options).generate(image)
    batched = OVSAMAutomaticMaskGenerator(predictor, points_per_batch=3, **options).generate(image)
    rle_predictor = OVSAMPredictor(predictor.model, predictor.classifier, fast=False, rle_on_device=True)
    rle = OVSAMAutomaticMaskGenerator(rle_predictor, **options).generate(image)
    assert len(whole) > 1
    for other in (batched, rle):
        assert len(other) == len(whole)
        for a, b in zip(whole, other):
            np.testing.assert_array_equal(a["segmentation"], b["segmentation"])
            assert a["point_coords"] == b["point_coords"] and a["label"] == b["label"] and a["area"] == b["area"]


def test_no_surviving_mask_gives_well_formed_empties(predictor, image):
    from ovsam_ray.labels.records import prediction_to_instances
    from ovsam_ray.vocabulary import Vocabulary

    generator = OVSAMAutomaticMaskGenerator(predictor, points_per_side=4)  # SAM's stability 0.95
    for img in (image, np.zeros((50, 70, 3), np.uint8)):
        assert generator.generate(img) == []
        out = generator.predict(img)
        h, w = img.shape[:2]
        assert len(out) == 0 and out.points.shape == (0, 2) and out.stability_scores.shape == (0,)
        assert out.prediction.masks.shape == (0, h, w) and out.prediction.low_res_logits.shape[0] == 0
        names = tuple(f"c{i}" for i in range(NUM_CLASSES))
        vocab = Vocabulary(
            name="t",
            class_names=names,
            synonyms=tuple((n,) for n in names),
            seen=(True,) * len(names),
            excluded=(False,) * len(names),
            class_ids=tuple(range(len(names))),
        )
        assert prediction_to_instances(out.prediction, out.prompts, vocab, types=[]) == []
    with pytest.raises(ValueError, match="no pixels"):
        generator.generate(np.zeros((0, 0, 3), np.uint8))
    with pytest.raises(ValueError, match="points_per_side"):
        OVSAMAutomaticMaskGenerator(predictor, points_per_side=0)


def test_generator_and_label_job_grid_mode_give_the_same_masks(ray_local, tmp_shards, shapes_vocab, tmp_path):
    import os

    import pyarrow.dataset as pds

    from ovsam_ray.data.decode import decode_image
    from ovsam_ray.data.rle import decode_rle
    from ovsam_ray.data.shards import read_shard
    from ovsam_ray.inference import ModelConfig, build_predictor
    from ovsam_ray.pipeline.label_job import LabelConfig, run_label
    from ovsam_ray.pipeline.prompting import SelectConfig

    model = ModelConfig(preset="ovsam_tiny", random_init=True, vocab=shapes_vocab)
    out = str(tmp_path / "grid")
    s = run_label(
        LabelConfig(
            input=os.path.dirname(tmp_shards[0]),
            output=out,
            model=model,
            prompts="grid",
            limit=1,
            select=SelectConfig(grid_size=4, grid_stability=0.0, grid_nms_iou=0.5),
        )
    )
    assert s.images_ok > 0
    images = {
        (r.shard, sample["key"]): decode_image(sample["image_bytes"])
        for r in map(read_shard, tmp_shards)
        for sample in r.samples
    }
    predictor, vocab, _ = build_predictor(model, "cpu")
    generator = OVSAMAutomaticMaskGenerator(
        predictor, points_per_side=4, stability_score_thresh=0.0, mask_nms_thresh=0.5
    )
    rows = pds.dataset(out, format="parquet").to_table().to_pylist()
    assert len(rows) == s.images_ok
    for row in rows:
        records = generator.generate(images[(row["shard"], row["key"])])
        instances = row["instances"]
        assert len(records) == len(instances) > 0
        for record, inst in zip(records, instances):
            np.testing.assert_array_equal(record["segmentation"], decode_rle(inst["rle"]))
            assert [record["point_coords"][0]] == [inst["point"]]
            assert vocab.class_names[record["label"]] == inst["label"]
