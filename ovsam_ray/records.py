"""Predictions -> output instance records (the ``instances`` struct of DESIGN §4)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ovsam_ray.data.rle import compress_rles, encode_masks
from ovsam_ray.model.predictor import ImagePrediction, ImagePrompts
from ovsam_ray.vocabulary import Vocabulary


def _floats(values: np.ndarray) -> list[float]:
    return [float(v) for v in values]


def prediction_to_instances(
    pred: ImagePrediction,
    prompts: ImagePrompts,
    vocab: Vocabulary,
    *,
    types: list[str] | None = None,
    keep: np.ndarray | None = None,
    detector_scores: list[float | None] | None = None,
    detector_labels: list[str | None] | None = None,
    with_embedding: bool = False,
) -> list[dict[str, Any]]:
    """One record per kept prompt (all by default), in prompt order (boxes, then points).

    ``types`` names each prompt ("box", "point", "grid"; default: boxes then points). The mask is
    COCO RLE at the original size (compressed from ``pred.rles`` when the predictor made them,
    else encoded from ``pred.masks``: the same strings); ``bbox`` is the mask's box; labels are
    names from ``vocab`` with the fused probability; with ``with_embedding`` the float16 region and
    CLIP embeddings and the CLIP-validity flag are stored, enough to re-score with another vocabulary.
    """
    n_boxes = len(prompts.boxes)
    n = len(pred.labels)
    types = types or ["box"] * n_boxes + ["point"] * (n - n_boxes)
    keep = np.arange(n) if keep is None else np.asarray(keep, np.int64)
    if pred.rles is not None:  # run lengths computed on the model's device: only compress them
        rles = compress_rles([pred.rles[i] for i in keep.tolist()])
    else:
        rles = encode_masks(pred.masks[keep])
    areas = pred.mask_areas()
    names = vocab.class_names
    out = []
    for j, i in enumerate(keep.tolist()):
        is_box = i < n_boxes
        det_score = detector_scores[i] if detector_scores and is_box and i < len(detector_scores) else None
        det_label = detector_labels[i] if detector_labels and is_box and i < len(detector_labels) else None
        label = int(pred.labels[i])
        out.append(
            {
                "prompt_type": types[i],
                "prompt_box": _floats(prompts.boxes[i]) if is_box else None,
                "point": None if is_box else _floats(prompts.points[i - n_boxes]),
                "detector_score": None if det_score is None else float(det_score),
                "detector_label": det_label,
                "bbox": _floats(pred.mask_boxes[i]),
                "area": int(areas[i]),
                "rle": rles[j],
                "label": names[label],
                "label_id": int(vocab.class_ids[label]),
                "label_score": float(pred.scores[i]),
                "topk_labels": [names[int(k)] for k in pred.topk_ids[i]],
                "topk_scores": _floats(pred.topk_scores[i]),
                "embedding": _half(pred.region_embeddings[i]) if with_embedding else None,
                "clip_embedding": _half(pred.clip_embeddings[i]) if with_embedding else None,
                "clip_valid": bool(pred.clip_valid[i]) if with_embedding else None,
            }
        )
    return out


def _half(values: np.ndarray) -> list[float]:
    return values.astype(np.float16).astype(np.float32).tolist()
