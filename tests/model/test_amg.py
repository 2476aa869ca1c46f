"""Segment-everything and de-duplication helpers: golden values and empty inputs."""

from __future__ import annotations

import numpy as np
import torch

from ovsam_ray.model.amg import grid_points, mask_nms, stability_scores


def test_grid_points_are_cell_centres():
    pts = grid_points(2, height=10, width=20)
    np.testing.assert_allclose(pts, [[5, 2.5], [15, 2.5], [5, 7.5], [15, 7.5]])
    assert grid_points(32, 480, 640).shape == (1024, 2)


def test_stability_score_golden_and_empty():
    logits = torch.full((1, 4, 4), -5.0)
    logits[0, :2, :2] = 5.0  # 4 pixels far above both thresholds
    logits[0, 2, 2] = 0.5  # inside +-1: counted at -1 only
    assert abs(stability_scores(logits).item() - 4 / 5) < 1e-6
    assert stability_scores(torch.zeros(0, 4, 4)).shape == (0,)


def _box_mask(x0, y0, x1, y1, size=10):
    m = torch.zeros(size, size, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def test_mask_nms_iou_containment_and_class_awareness():
    a = _box_mask(0, 0, 6, 6)  # 36 px
    b = _box_mask(0, 0, 6, 5)  # 30 px, IoU(a, b) = 30/36 = 0.83, fully inside a
    c = _box_mask(6, 6, 10, 10)  # disjoint
    d = _box_mask(1, 1, 3, 3)  # 4 px inside a, IoU 4/36
    masks = torch.stack([a, b, c, d])
    scores = torch.tensor([0.9, 0.95, 0.5, 0.4])
    assert mask_nms(masks, scores, iou_threshold=0.8).tolist() == [1, 2, 3]
    assert mask_nms(masks, scores, iou_threshold=0.9).tolist() == [1, 0, 2, 3]
    assert mask_nms(masks, scores, iou_threshold=0.9, containment_threshold=0.9).tolist() == [1, 0, 2]
    labels = torch.tensor([0, 1, 0, 0])
    assert mask_nms(masks, scores, iou_threshold=0.8, labels=labels).tolist() == [1, 0, 2, 3]
    assert mask_nms(masks[:0], scores[:0]).tolist() == []
