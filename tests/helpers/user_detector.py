"""A user detector for the tests (imported by name on Ray workers: ``detector:user_detector:HalfBoxes``)."""

from __future__ import annotations

import numpy as np


class HalfBoxes:
    """Proposes the left and right halves of the image, twice each (duplicates for NMS), plus a
    low-score box the threshold must drop."""

    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs

    def __call__(self, images: list[np.ndarray]) -> list[dict]:
        out = []
        for im in images:
            h, w = im.shape[:2]
            left, right = [0, 0, w / 2, h], [w / 2, 0, w, h]
            out.append(
                {
                    "boxes": np.array([left, left, right, right, [0, 0, 2, 2]], np.float32),
                    "scores": np.array([0.9, 0.8, 0.7, 0.6, 0.01], np.float32),
                    "labels": ["left", "left", "right", "right", "tiny"],
                }
            )
        return out
