"""Point prompts for interactive evaluation: the mask pixel farthest from the mask's boundary."""

from __future__ import annotations

import numpy as np

__all__ = ["distance_to_background", "interior_points"]


def distance_to_background(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> (H, W) float32 exact Euclidean distance from each pixel to the nearest pixel
    outside the mask (pixels beyond the image border count as outside; 0 outside the mask).

    Separable exact transform: per column the distance g to the nearest background pixel, then per
    row ``min_x' g(x')^2 + (x - x')^2``, over offsets ``|x - x'|`` only up to the largest distance.
    Only the mask's bounding box plus a one-pixel background ring is transformed: that ring is
    nearer to every inside pixel than anything beyond it.
    """
    mask = np.asarray(mask, bool)
    out = np.zeros(mask.shape, np.float32)
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if len(rows) == 0:
        return out
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop = np.pad(mask[y0:y1, x0:x1], 1)
    d2 = _squared_edt_padded(crop)
    out[y0:y1, x0:x1] = np.sqrt(d2[1:-1, 1:-1])
    return out


def _squared_edt_padded(mask: np.ndarray) -> np.ndarray:
    """Squared distances for a mask whose outer ring is background."""
    h = mask.shape[0]
    idx = np.arange(h)[:, None]
    background = ~mask
    above = np.maximum.accumulate(np.where(background, idx, -h), axis=0)
    below = np.minimum.accumulate(np.where(background, idx, 2 * h)[::-1], axis=0)[::-1]
    g = np.minimum(idx - above, below - idx).astype(np.float64)
    g2 = g * g
    d2 = g2.copy()
    # offsets along the row: once dx^2 exceeds the largest distance found, no offset can lower any
    dx = 1
    while dx < mask.shape[1] and dx * dx < d2.max():
        np.minimum(d2[:, dx:], g2[:, :-dx] + dx * dx, out=d2[:, dx:])
        np.minimum(d2[:, :-dx], g2[:, dx:] + dx * dx, out=d2[:, :-dx])
        dx += 1
    return d2


def interior_points(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> (N, 2) float32 XY pixel indices of the pixel farthest from the boundary.

    Distance is the exact Euclidean distance to the nearest pixel outside the mask (the image
    border counts as outside, as when the mask is zero-padded before a distance transform); ties
    go to the tied pixel nearest their centroid. Empty masks give (-1, -1).
    """
    masks = np.asarray(masks, bool)
    n = len(masks)
    out = np.full((n, 2), -1.0, np.float32)
    for i in range(n):
        dist = distance_to_background(masks[i])
        top = dist.max()
        if top <= 0:
            continue
        ys, xs = np.nonzero(dist >= top - 1e-4)
        cy, cx = ys.mean(), xs.mean()
        j = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
        out[i] = (xs[j], ys[j])
    return out
