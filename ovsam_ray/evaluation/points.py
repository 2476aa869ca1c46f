"""Point prompts for interactive evaluation: the mask pixel farthest from the mask's boundary."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def interior_points(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> (N, 2) float32 XY pixel centres farthest from the boundary.

    Distance is the chessboard distance to the nearest pixel outside the mask (the image border
    counts as outside), found by repeated 3x3 erosion; ties go to the set pixel nearest the
    centroid of the last non-empty erosion. Empty masks give (-1, -1).
    """
    n = len(masks)
    out = np.full((n, 2), -1.0, np.float32)
    if n == 0:
        return out
    current = torch.from_numpy(np.ascontiguousarray(masks)).float()[:, None]
    last = current.clone()
    while current.flatten(1).any(dim=1).any():
        alive = current.flatten(1).any(dim=1)
        last[alive] = current[alive]
        padded = F.pad(1 - current, (1, 1, 1, 1), value=1.0)
        current = 1 - F.max_pool2d(padded, 3, stride=1)
    for i in range(n):
        ys, xs = np.nonzero(last[i, 0].numpy() > 0)
        if len(xs) == 0:
            continue
        cy, cx = ys.mean(), xs.mean()
        j = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
        out[i] = (xs[j], ys[j])
    return out
