"""Binary mask -> polygons (numpy only; no OpenCV): the outlines YOLO and Label Studio expect.

The outline follows pixel edges, so the polygon encloses exactly the mask's pixels before
simplification: every boundary edge between a mask pixel and a background pixel is a directed
segment with the mask on its right; the segments are linked into closed loops (at a vertex where
two diagonal pixels touch, the loop turns toward the mask, i.e. 4-connectivity). Outer loops run
clockwise on screen (positive shoelace area in image coordinates), holes the other way. Loops are
reduced to their corners and simplified with Ramer-Douglas-Peucker (``tolerance`` pixels).
"""

from __future__ import annotations

import numpy as np

__all__ = ["join_polygons", "mask_to_polygons", "polygon_area", "simplify_polygon"]

# direction d: 0 right, 1 down, 2 left, 3 up (image coordinates, y down)
_STEP = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]])


def _boundary_edges(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start vertices (E, 2) as (x, y) corner coordinates and directions (E,) of all boundary edges."""
    p = np.pad(mask, 1)
    inside = p[1:-1, 1:-1]
    starts, dirs = [], []
    # neighbour outside above/right/below/left -> top/right/bottom/left edge of the pixel
    for d, (neighbour, dx, dy) in enumerate(
        ((p[:-2, 1:-1], 0, 0), (p[1:-1, 2:], 1, 0), (p[2:, 1:-1], 1, 1), (p[1:-1, :-2], 0, 1))
    ):
        ys, xs = np.nonzero(inside & ~neighbour)
        starts.append(np.stack([xs + dx, ys + dy], axis=1))
        dirs.append(np.full(len(xs), d))
    return np.concatenate(starts), np.concatenate(dirs)


def _loops(mask: np.ndarray) -> list[np.ndarray]:
    starts, dirs = _boundary_edges(mask)
    outgoing: dict[tuple[int, int], list[int]] = {}
    for i, (x, y) in enumerate(starts.tolist()):
        outgoing.setdefault((x, y), []).append(i)
    used = np.zeros(len(starts), bool)
    loops = []
    for first in range(len(starts)):
        if used[first]:
            continue
        corners, edge = [], first
        while not used[edge]:
            used[edge] = True
            d = int(dirs[edge])
            end = starts[edge] + _STEP[d]
            candidates = [e for e in outgoing.get((int(end[0]), int(end[1])), []) if not used[e]]
            if not candidates:
                corners.append(end)
                break
            # prefer turning toward the mask (right), then straight, then left
            nxt = min(candidates, key=lambda e: (int(dirs[e]) - d - 1) % 4)
            if int(dirs[nxt]) != d:
                corners.append(end)
            edge = nxt
        if len(corners) >= 3:
            loops.append(np.asarray(corners, np.float64))
    return loops


def polygon_area(points: np.ndarray) -> float:
    """Shoelace area of an (N, 2) closed polygon; positive for outer loops of :func:`mask_to_polygons`."""
    x, y = points[:, 0], points[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _rdp(points: np.ndarray, tolerance: float) -> np.ndarray:
    """Ramer-Douglas-Peucker on an open chain (endpoints kept), iterative."""
    keep = np.zeros(len(points), bool)
    keep[0] = keep[-1] = True
    stack = [(0, len(points) - 1)]
    while stack:
        a, b = stack.pop()
        if b - a < 2:
            continue
        seg = points[b] - points[a]
        rel = points[a + 1 : b] - points[a]
        norm = np.hypot(*seg)
        dist = np.abs(seg[0] * rel[:, 1] - seg[1] * rel[:, 0]) / norm if norm > 0 else np.hypot(rel[:, 0], rel[:, 1])
        j = int(np.argmax(dist))
        if dist[j] > tolerance:
            keep[a + 1 + j] = True
            stack += [(a, a + 1 + j), (a + 1 + j, b)]
    return points[keep]


def simplify_polygon(points: np.ndarray, tolerance: float = 1.0) -> np.ndarray:
    """Simplify a closed (N, 2) polygon: split at the vertex farthest from the first, RDP each half."""
    if tolerance <= 0 or len(points) <= 4:
        return points
    far = int(np.argmax(np.hypot(*(points - points[0]).T)))
    first = _rdp(points[: far + 1], tolerance)
    second = _rdp(np.concatenate([points[far:], points[:1]]), tolerance)
    out = np.concatenate([first[:-1], second[:-1]])
    return out if len(out) >= 3 else points


def mask_to_polygons(mask: np.ndarray, *, tolerance: float = 1.0, min_area: float = 1.0) -> list[np.ndarray]:
    """Outer outlines of an (H, W) mask's 4-connected parts as (N, 2) float XY arrays in pixel
    corner coordinates, largest first; holes are dropped; parts smaller than ``min_area`` pixels
    are left out. An empty mask gives ``[]``."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        return []
    outer = [(polygon_area(loop), loop) for loop in _loops(mask)]
    outer = [(a, loop) for a, loop in outer if a >= min_area]
    outer.sort(key=lambda p: -p[0])
    return [simplify_polygon(loop, tolerance) for _, loop in outer]


def _nearest(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """Indices of the closest pair of vertices, one of ``a`` and one of ``b``."""
    d = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    i, j = np.unravel_index(int(np.argmin(d)), d.shape)
    return int(i), int(j)


def join_polygons(polygons: list[np.ndarray]) -> np.ndarray:
    """One (N, 2) outline through every part of a multi-part mask, as Ultralytics' own COCO
    converter writes a YOLO line (``merge_multi_segment``): consecutive parts are linked at their
    closest vertices by a zero-width bridge walked there and back, so the filled outline covers
    every part and its area is the parts' sum. One polygon comes back as it is; ``[]`` gives an
    empty array."""
    segs = [np.asarray(p, np.float64).reshape(-1, 2) for p in polygons]
    if len(segs) <= 1:
        return segs[0] if segs else np.zeros((0, 2), np.float64)
    n = len(segs)
    entry, leave = [0] * n, [0] * n
    for i in range(1, n):
        leave[i - 1], entry[i] = _nearest(segs[i - 1], segs[i])
    forward, back = [], []
    for i, seg in enumerate(segs):
        start = leave[i] if i == 0 else entry[i]
        ring = np.roll(seg, -start, axis=0)
        ring = np.concatenate([ring, ring[:1]])  # closed, from the vertex the path arrives at
        if i in (0, n - 1):
            forward.append(ring)
        else:  # there: entry -> exit; and back: exit -> entry
            k = (leave[i] - entry[i]) % len(seg)
            forward.append(ring[: k + 1])
            back.append(ring[k:])
    return np.concatenate(forward + back[::-1])
