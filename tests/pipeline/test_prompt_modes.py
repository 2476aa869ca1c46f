"""Prompt sources of the label job: detector actor pool (user + torchvision), grid, dedup."""

from __future__ import annotations

import numpy as np
import pyarrow.dataset as pds
import pytest

from ovsam_ray.data.rle import decode_rle
from ovsam_ray.inference import ModelConfig
from ovsam_ray.model.predictor import ImagePrediction
from ovsam_ray.pipeline.detectors import postprocess_detections
from ovsam_ray.pipeline.label_job import LabelConfig, run_label
from ovsam_ray.pipeline.prompting import PromptSources, SelectConfig, image_prompt_set, select_predictions


def rows(out: str) -> list[dict]:
    return pds.dataset(out, format="parquet").to_table().to_pylist()


def tiny(vocab: str) -> ModelConfig:
    return ModelConfig(preset="ovsam_tiny", random_init=True, vocab=vocab)


def test_prompt_sources_parse():
    assert PromptSources.parse("shard") == PromptSources(shard=True)
    assert PromptSources.parse("shard,detector:a.b:C") == PromptSources(shard=True, detector="a.b:C")
    assert PromptSources.parse("grid") == PromptSources(shard=False, grid=True)
    with pytest.raises(ValueError, match="prompt"):
        PromptSources.parse("boxes")


def test_postprocess_detections_threshold_nms_cap():
    det = {
        "boxes": [[0, 0, 10, 10], [0, 0, 10, 11], [20, 20, 30, 30], [0, 0, 1, 1], [np.nan, 0, 1, 1]],
        "scores": [0.9, 0.8, 0.7, 0.1, 0.95],
        "labels": ["a", "b", "a", "a", "x"],
    }
    out = postprocess_detections(det, score_threshold=0.3, nms_iou=0.5, max_per_image=10)
    assert out["labels"] == ["a", "a"] and out["scores"] == pytest.approx([0.9, 0.7])
    aware = postprocess_detections(det, score_threshold=0.3, nms_iou=0.5, max_per_image=10, class_agnostic=False)
    assert aware["labels"] == ["a", "b", "a"]
    assert postprocess_detections(det, score_threshold=0.3, nms_iou=0.5, max_per_image=1)["labels"] == ["a"]
    assert postprocess_detections({}, score_threshold=0.3, nms_iou=0.5, max_per_image=1)["boxes"] == []


def test_image_prompt_set_combines_shard_detector_and_grid():
    spec = {
        "boxes": [[1, 1, 5, 5]],
        "scores": [None],
        "labels": ["gt"],
        "points": [[2, 2]],
        "point_boxes": None,
        "detector": {"boxes": [[0, 0, 4, 4]], "scores": [0.5], "labels": ["det"]},
    }
    s = image_prompt_set(spec, PromptSources.parse("shard,detector:x,grid"), width=8, height=8, grid_size=2)
    assert s.types == ["box", "box", "point", "grid", "grid", "grid", "grid"]
    assert s.detector_labels == ["gt", "det"] and s.detector_scores == [None, 0.5]
    assert s.prompts.points.tolist()[1:] == [[2, 2], [6, 2], [2, 6], [6, 6]]
    only_det = image_prompt_set(spec, PromptSources.parse("detector:x"), width=8, height=8, grid_size=2)
    assert only_det.types == ["box"] and only_det.prompts.boxes.tolist() == [[0, 0, 4, 4]]


def _pred(masks: np.ndarray, low: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> ImagePrediction:
    n = len(masks)
    z = np.zeros((n, 3), np.float32)
    return ImagePrediction(
        masks=masks,
        mask_boxes=np.zeros((n, 4), np.float32),
        low_res_logits=low[:, None],
        head_logits=z,
        clip_logits=z,
        fused_logits=z,
        labels=labels,
        scores=scores,
        head_labels=labels,
        topk_ids=labels[:, None],
        topk_scores=scores[:, None],
        region_embeddings=z,
        clip_embeddings=z,
        clip_valid=np.ones(n, bool),
        is_point=np.zeros(n, bool),
    )


def test_select_predictions_grid_stability_nms_and_dedup():
    low = np.full((4, 8, 8), -10.0, np.float32)
    low[0, :4, :4] = 10  # stable
    low[1, :4, :4] = 10
    low[1, 4, 0] = 10  # near-duplicate of 0, stable
    low[2, :, :] = 0.5  # unstable (all inside +-1)
    low[3, 4:, 4:] = 10
    masks = low > 0
    pred = _pred(masks, low, np.array([0.5, 0.9, 0.8, 0.7], np.float32), np.array([0, 0, 1, 1]))
    keep = select_predictions(pred, ["grid"] * 4, SelectConfig())
    assert keep.tolist() == [1, 3]  # 2 unstable, 0 suppressed by 1 (IoU 16/17)
    as_boxes = select_predictions(pred, ["box"] * 4, SelectConfig())
    assert as_boxes.tolist() == [0, 1, 2, 3]  # no grid filtering, no dedup by default
    dedup = select_predictions(pred, ["box"] * 4, SelectConfig(dedup_iou=0.8))
    assert dedup.tolist() == [1, 2, 3]
    area = select_predictions(pred, ["box"] * 4, SelectConfig(min_mask_area=17))
    assert area.tolist() == [1, 2]
    assert select_predictions(_pred(masks[:0], low[:0], np.zeros(0), np.zeros(0, int)), [], SelectConfig()).size == 0


def test_label_job_with_user_detector_and_grid(ray_local, tmp_shards, shapes_vocab, tmp_path):
    import os

    src = os.path.dirname(tmp_shards[0])
    out = str(tmp_path / "det")
    s = run_label(
        LabelConfig(
            input=src, output=out, model=tiny(shapes_vocab), prompts="detector:user_detector:HalfBoxes", limit=1
        )
    )
    assert s.images_ok == 4
    for row in rows(out):
        insts = row["instances"]
        assert [i["detector_label"] for i in insts] == ["left", "right"]  # NMS'd, thresholded
        assert insts[0]["prompt_box"] == pytest.approx([0, 0, row["width"] / 2, row["height"]], abs=0.5)
        assert insts[0]["detector_score"] == pytest.approx(0.9)

    out = str(tmp_path / "grid")
    s = run_label(
        LabelConfig(
            input=src,
            output=out,
            model=tiny(shapes_vocab),
            prompts="grid",
            limit=1,
            select=SelectConfig(grid_size=4, grid_stability=0.0, grid_nms_iou=0.5),
        )
    )
    assert s.images_ok == 4
    for row in rows(out):
        insts = row["instances"]
        assert 1 <= len(insts) <= 16 and all(i["prompt_type"] == "grid" for i in insts)
        masks = [decode_rle(i["rle"]) for i in insts]
        for a in range(len(masks)):
            for b in range(a + 1, len(masks)):
                inter = np.logical_and(masks[a], masks[b]).sum()
                union = np.logical_or(masks[a], masks[b]).sum()
                assert union == 0 or inter / union <= 0.6  # NMS ran (on low-res masks)


def test_torchvision_detector_random_init(ray_local, tmp_shards, shapes_vocab, tmp_path):
    import os

    out = str(tmp_path / "tv")
    s = run_label(
        LabelConfig(
            input=os.path.dirname(tmp_shards[0]),
            output=out,
            model=tiny(shapes_vocab),
            prompts="shard,detector:fasterrcnn_mobilenet_v3_large_320_fpn",
            limit=1,
            detector_score_threshold=0.0,
        )
    )
    assert s.images_ok == 4 and s.images_error == 0
    for row in rows(out):
        shard_boxes = [i for i in row["instances"] if i["detector_score"] is None]
        assert len(shard_boxes) >= 1  # the shard's own boxes are still there


def test_select_with_reason_names_the_filter_that_emptied_a_row():
    from ovsam_ray.pipeline.prompting import FILTERED_WARNING, select_with_reason

    low = np.full((2, 8, 8), 0.5, np.float32)  # both unstable: inside +-1 everywhere
    pred = _pred(low > 0, low, np.array([0.5, 0.9], np.float32), np.array([0, 1]))
    keep, why = select_with_reason(pred, ["grid"] * 2, SelectConfig())
    assert keep.size == 0 and why.startswith(FILTERED_WARNING)
    assert "2 grid masks empty or less stable than --grid-stability" in why and "all 2 masks" in why
    keep, why = select_with_reason(pred, ["box"] * 2, SelectConfig(min_mask_area=65))
    assert keep.size == 0 and "2 smaller than --min-mask-area 65" in why
    keep, why = select_with_reason(pred, ["box"] * 2, SelectConfig())
    assert keep.tolist() == [0, 1] and why is None  # something kept: no warning
    empty = _pred(low[:0] > 0, low[:0], np.zeros(0, np.float32), np.zeros(0, int))
    assert select_with_reason(empty, [], SelectConfig())[1] is None  # no prompts: the decode stage says so


def test_prompt_sets_name_each_prompt_source():
    spec = {
        "boxes": [[0, 0, 2, 2]],
        "labels": ["gt"],
        "detector": {"boxes": [[0, 0, 4, 4]], "scores": [0.5], "labels": ["det"]},
    }
    s = image_prompt_set(spec, PromptSources.parse("shard,detector:owlv2,grid"), width=8, height=8, grid_size=2)
    assert s.sources == ["shard", "detector:owlv2"] + ["grid"] * 4
    fallback = image_prompt_set({"boxes": []}, PromptSources.parse("shard|grid"), width=8, height=8, grid_size=2)
    assert fallback.sources == ["grid"] * 4


def test_instances_store_source_and_the_shard_label_apart():
    from ovsam_ray.labels.records import prediction_to_instances
    from ovsam_ray.model.predictor import ImagePrompts
    from ovsam_ray.vocabulary import Vocabulary

    low = np.full((3, 8, 8), -10.0, np.float32)
    low[:, :4, :4] = 10
    pred = _pred(low > 0, low, np.array([0.5, 0.9, 0.7], np.float32), np.array([0, 1, 0]))
    prompts = ImagePrompts(boxes=np.zeros((2, 4), np.float32), points=np.ones((1, 2), np.float32))
    vocab = Vocabulary(
        name="v", class_names=("a", "b"), synonyms=(("a",), ("b",)), seen=(1, 1), excluded=(0, 0), class_ids=(0, 1)
    )
    insts = prediction_to_instances(
        pred,
        prompts,
        vocab,
        types=["box", "box", "grid"],
        detector_scores=[None, 0.5],
        detector_labels=["gt", "det"],
        sources=["shard", "detector:owlv2", "grid"],
    )
    assert [i["source"] for i in insts] == ["shard", "detector:owlv2", "grid"]
    assert [i["shard_label"] for i in insts] == ["gt", None, None]
    assert [i["detector_label"] for i in insts] == [None, "det", None]
    legacy = prediction_to_instances(pred, prompts, vocab, detector_labels=["gt", "det"])
    assert [i["detector_label"] for i in legacy] == ["gt", "det", None] and legacy[0]["source"] is None


def test_stats_count_rows_whose_masks_a_filter_removed():
    import pyarrow as pa

    from ovsam_ray.pipeline.stats import format_stats, merge_stats, table_stats

    inst = pa.struct([("label", pa.string()), ("label_score", pa.float32()), ("area", pa.int64())])
    table = pa.table(
        {
            "status": ["ok", "ok", "ok", "error"],
            "instances": pa.array([[], [{"label": "a", "label_score": 0.5, "area": 4}], [], []], pa.list_(inst)),
            "num_prompts": pa.array([1024, 3, 0, None], pa.int32()),
        }
    )
    stats = table_stats(table)
    assert (stats["images_all_filtered"], stats["images_no_prompts"], stats["images_empty"]) == (1, 1, 2)
    merged = merge_stats([stats, stats])
    assert merged["images_all_filtered"] == 2 and "2 with every mask filtered out" in format_stats(merged)


def test_label_job_rows_emptied_by_the_grid_filter_say_so(ray_local, tmp_shards, shapes_vocab, tmp_path):
    import json
    import os

    from ovsam_ray.pipeline.prompting import FILTERED_WARNING

    out = str(tmp_path / "strict")
    s = run_label(
        LabelConfig(
            input=os.path.dirname(tmp_shards[0]),
            output=out,
            model=tiny(shapes_vocab),
            prompts="grid",
            limit=1,
            select=SelectConfig(grid_size=2, grid_stability=1.01),  # no mask is ever that stable
        )
    )
    assert s.images_ok == 4 and s.images_all_filtered == 4 and s.masks == 0
    for row in rows(out):
        assert row["instances"] == [] and len(row["warnings"]) == 1
        assert row["warnings"][0].startswith(FILTERED_WARNING) and "--grid-stability 1.01" in row["warnings"][0]
    stats = json.load(open(os.path.join(out, "_stats.json")))
    assert stats["images_all_filtered"] == 4 and stats["images_empty"] == 4
