"""Predictions -> instance records: the quality signals of schema version 3."""

from __future__ import annotations

import numpy as np

from ovsam_ray.labels.records import InstanceColumns, box_iou, prediction_to_instances
from ovsam_ray.model.predictor import ImagePrediction, ImagePrompts
from ovsam_ray.vocabulary import Vocabulary


def _vocab() -> Vocabulary:
    names = ("cat", "dog", "bird")
    return Vocabulary("t", names, tuple((n,) for n in names), (True,) * 3, (False,) * 3, (0, 1, 2))


def _pred(n_boxes: int, n_points: int) -> ImagePrediction:
    n = n_boxes + n_points
    masks = np.zeros((n, 10, 10), bool)
    masks[:, 2:6, 2:6] = True
    z = np.zeros((n, 4), np.float32)
    return ImagePrediction(
        masks=masks,
        mask_boxes=np.tile(np.float32([2, 2, 6, 6]), (n, 1)),
        low_res_logits=np.zeros((n, 1, 4, 4), np.float32),
        head_logits=z,
        clip_logits=z,
        fused_logits=z,
        labels=np.array([0, 1, 2][:n]),
        scores=np.float32([0.9, 0.5, 0.4][:n]),
        head_labels=np.array([0, 1, 2][:n]),
        topk_ids=np.array([[0, 1], [1, 0], [2, 0]][:n]),
        topk_scores=np.float32([[0.9, 0.05], [0.5, 0.45], [0.4, 0.3]][:n]),
        region_embeddings=z,
        clip_embeddings=z,
        clip_valid=np.ones(n, bool),
        is_point=np.array([False] * n_boxes + [True] * n_points),
        stability=np.float32([0.95, 0.5, 0.8][:n]),
    )


def test_signals_margin_stability_box_iou_and_agreement() -> None:
    prompts = ImagePrompts(
        boxes=np.float32([[2, 2, 6, 6], [0, 0, 8, 8]]), points=np.float32([[3, 3]]), point_boxes=None
    )
    insts = prediction_to_instances(
        _pred(2, 1), prompts, _vocab(), detector_scores=[0.8, None], detector_labels=["cat", "cat"]
    )
    assert [round(i["label_margin"], 4) for i in insts] == [0.85, 0.05, 0.1]
    assert [round(i["stability_score"], 4) for i in insts] == [0.95, 0.5, 0.8]
    assert [None if i["box_iou"] is None else round(i["box_iou"], 4) for i in insts] == [1.0, 0.25, None]
    assert [i["label_agrees"] for i in insts] == [True, False, None]  # the point prompt has no detector label
    assert [i["review"] for i in insts] == [None] * 3


def test_signals_are_null_where_the_model_gave_none() -> None:
    pred = _pred(1, 0)
    pred.stability = None
    pred.topk_scores, pred.topk_ids = pred.topk_scores[:, :1], pred.topk_ids[:, :1]
    prompts = ImagePrompts(boxes=np.float32([[2, 2, 6, 6]]), points=np.zeros((0, 2), np.float32), point_boxes=None)
    (inst,) = prediction_to_instances(pred, prompts, _vocab())
    assert inst["label_margin"] is None and inst["stability_score"] is None and inst["label_agrees"] is None
    cols = InstanceColumns(_vocab())
    cols.add_box_fill(np.float32([[0, 0, 4, 4]]), height=8, width=8, detector_labels=["dog"])
    cols.add_empty()
    box, empty = cols.to_arrow().to_pylist()
    assert box[0]["label_margin"] is None and box[0]["stability_score"] is None and box[0]["box_iou"] == 1.0
    assert empty == []


def test_box_iou() -> None:
    a = np.float32([[0, 0, 2, 2], [0, 0, 0, 0], [0, 0, 2, 2]])
    b = np.float32([[1, 1, 3, 3], [0, 0, 0, 0], [0, 0, 2, 2]])
    np.testing.assert_allclose(box_iou(a, b), [1 / 7, 0.0, 1.0], rtol=1e-6)
