"""Predictions -> output instance records (the ``instances`` struct of DESIGN §4)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ovsam_ray.data.rle import encode_masks
from ovsam_ray.model.predictor import ImagePrediction, ImagePrompts
from ovsam_ray.vocabulary import Vocabulary


def _floats(values: np.ndarray) -> list[float]:
    return [float(v) for v in values]


def prediction_to_instances(
    pred: ImagePrediction,
    prompts: ImagePrompts,
    vocab: Vocabulary,
    *,
    detector_scores: list[float | None] | None = None,
    detector_labels: list[str | None] | None = None,
    with_embedding: bool = False,
) -> list[dict[str, Any]]:
    """One record per prompt, in prompt order (boxes, then points).

    The mask is COCO RLE at the original size; ``bbox`` is the mask's box; labels are names from
    ``vocab`` with the fused probability; ``embedding`` is the float16 region embedding.
    """
    n_boxes = len(prompts.boxes)
    rles = encode_masks(pred.masks)
    areas = pred.masks.reshape(len(pred.masks), -1).sum(axis=1) if len(pred.masks) else np.zeros(0, np.int64)
    names = vocab.class_names
    out = []
    for i in range(len(pred.labels)):
        is_box = i < n_boxes
        det_score = detector_scores[i] if detector_scores and is_box and i < len(detector_scores) else None
        det_label = detector_labels[i] if detector_labels and is_box and i < len(detector_labels) else None
        out.append(
            {
                "prompt_type": "box" if is_box else "point",
                "prompt_box": _floats(prompts.boxes[i]) if is_box else None,
                "point": None if is_box else _floats(prompts.points[i - n_boxes]),
                "detector_score": None if det_score is None else float(det_score),
                "detector_label": det_label,
                "bbox": _floats(pred.mask_boxes[i]),
                "area": int(areas[i]),
                "rle": rles[i],
                "label": names[int(pred.labels[i])],
                "label_id": int(vocab.class_ids[int(pred.labels[i])]),
                "label_score": float(pred.scores[i]),
                "topk_labels": [names[int(k)] for k in pred.topk_ids[i]],
                "topk_scores": _floats(pred.topk_scores[i]),
                "embedding": pred.region_embeddings[i].astype(np.float16).tolist() if with_embedding else None,
            }
        )
    return out
