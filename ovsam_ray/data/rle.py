"""Binary masks <-> COCO RLE, mask areas and mask boxes (numpy, no torch).

RLEs are COCO's compressed form as ``pycocotools.mask`` produces it, with ``counts`` decoded to
``str`` so that it fits JSON and Parquet: ``{"size": [H, W], "counts": "..."}`` (column-major,
as COCO defines it). Boxes are XYXY with an exclusive right/bottom edge:
``[x_first, y_first, x_last + 1, y_last + 1]``; an empty mask gives ``[0, 0, 0, 0]``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

__all__ = [
    "annotation_mask",
    "annotation_rle",
    "box_fill_mask",
    "box_fill_rles",
    "boxes_from_binary_masks",
    "compress_rles",
    "decode_rle",
    "encode_masks",
    "mask_areas",
    "rle_area",
]


@contextmanager
def _quiet_pycocotools() -> Iterator[None]:
    # pycocotools' Cython arrays predate NumPy 2's __array__(copy=...) protocol and warn on every call
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
        yield


def _as_masks(masks: np.ndarray) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {masks.shape}")
    return masks.astype(bool, copy=False)


def encode_masks(masks: np.ndarray) -> list[dict[str, Any]]:
    """Encode ``(N, H, W)`` boolean masks as N COCO RLEs ``{"size": [H, W], "counts": str}``."""
    masks = _as_masks(masks)
    if masks.shape[0] == 0:
        return []
    fortran = np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8))
    encoded = mask_utils.encode(fortran)
    return [{"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")} for r in encoded]


def compress_rles(rles: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """COCO's uncompressed RLEs ``{"size": [H, W], "counts": ints}`` (e.g. run lengths computed on
    the GPU, ``ovsam_ray.model.rle_torch``) -> compressed ``{"size": [H, W], "counts": str}``.

    pycocotools itself compresses them, so the strings are byte-identical to ``encode_masks`` of
    the same masks.
    """
    if not rles:
        return []
    objs = [{"size": [int(s) for s in r["size"]], "counts": r["counts"]} for r in rles]
    with _quiet_pycocotools():
        coco = mask_utils.frPyObjects(objs, *objs[0]["size"])  # each RLE's own size is used
    return [{"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")} for r in coco]


def _to_coco_rle(rle: dict[str, Any]) -> dict[str, Any]:
    size = [int(s) for s in rle["size"]]
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed RLE (COCO's iscrowd annotations)
        return mask_utils.frPyObjects({"size": size, "counts": counts}, size[0], size[1])
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return {"size": size, "counts": counts}


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """Decode one RLE (compressed ``str``/``bytes`` counts, or COCO's uncompressed list) into an
    ``(H, W)`` boolean mask."""
    with _quiet_pycocotools():
        return mask_utils.decode(_to_coco_rle(rle)).astype(bool)


def rle_area(rle: dict[str, Any]) -> int:
    """Number of foreground pixels of an RLE, without decoding it."""
    with _quiet_pycocotools():
        return int(mask_utils.area(_to_coco_rle(rle)))


def mask_areas(masks: np.ndarray) -> np.ndarray:
    """``(N,)`` int64 foreground pixel counts of ``(N, H, W)`` masks."""
    masks = _as_masks(masks)
    return masks.sum(axis=(1, 2), dtype=np.int64)


def box_fill_mask(box: Sequence[float], height: int, width: int) -> np.ndarray:
    """(H, W) bool mask of the pixels whose centres lie inside an XYXY box."""
    x0, y0, x1, y1 = (float(v) for v in box)
    xs = np.arange(width) + 0.5
    ys = np.arange(height) + 0.5
    return ((ys[:, None] >= y0) & (ys[:, None] <= y1)) & ((xs[None, :] >= x0) & (xs[None, :] <= x1))


def annotation_rle(ann: dict[str, Any], height: int, width: int) -> dict[str, Any] | None:
    """Compressed COCO RLE (``counts`` as ``str``) of a COCO-style annotation's ``segmentation``
    in an image of ``height`` x ``width``: polygons (those with fewer than three points are
    ignored), COCO's uncompressed RLE (crowd regions) or a compressed RLE. ``None`` when there is
    no usable segmentation: none given, no polygon left, an RLE whose size is not the image's, or
    data pycocotools cannot read. The one reading of annotations shared by training and evaluation."""
    segm = ann.get("segmentation")
    try:
        with _quiet_pycocotools():
            if isinstance(segm, list) and segm and all(isinstance(p, list) for p in segm):
                polys = [[float(v) for v in p] for p in segm if len(p) >= 6]
                if not polys:
                    return None
                rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
            elif isinstance(segm, dict) and "counts" in segm:
                if [int(v) for v in segm.get("size", [])] != [height, width]:
                    return None
                rle = _to_coco_rle(segm)
            else:
                return None
    except (ValueError, TypeError, KeyError, OverflowError):
        return None
    counts = rle["counts"]
    return {
        "size": [int(v) for v in rle["size"]],
        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
    }


def annotation_mask(ann: dict[str, Any], height: int, width: int) -> np.ndarray | None:
    """(H, W) bool mask of an annotation's ``segmentation``; ``None`` when it has no usable one
    (see :func:`annotation_rle`)."""
    rle = annotation_rle(ann, height, width)
    if rle is None:
        return None
    try:
        return decode_rle(rle)
    except (ValueError, TypeError, OverflowError):  # corrupt counts
        return None


def boxes_from_binary_masks(masks: np.ndarray) -> np.ndarray:
    """``(N, 4)`` float32 XYXY boxes ``[x_first, y_first, x_last + 1, y_last + 1]`` of ``(N, H, W)``
    masks; all zeros for an empty mask, ``(0, 4)`` for ``N = 0``."""
    masks = _as_masks(masks)
    n, h, w = masks.shape
    boxes = np.zeros((n, 4), np.float32)
    if n == 0 or h == 0 or w == 0:
        return boxes
    cols = np.any(masks, axis=1)  # (N, W)
    rows = np.any(masks, axis=2)  # (N, H)
    nonempty = cols.any(axis=1)
    x_first = cols.argmax(axis=1)
    x_last = w - 1 - cols[:, ::-1].argmax(axis=1)
    y_first = rows.argmax(axis=1)
    y_last = h - 1 - rows[:, ::-1].argmax(axis=1)
    stacked = np.stack([x_first, y_first, x_last + 1, y_last + 1], axis=1).astype(np.float32)
    boxes[nonempty] = stacked[nonempty]
    return boxes


def box_fill_rles(boxes: np.ndarray, *, height: int, width: int) -> tuple[list[dict[str, Any]], np.ndarray, np.ndarray]:
    """Masks that fill ``(N, 4)`` XYXY boxes (the pixels whose centres lie inside, as
    :func:`box_fill_mask`), computed as run lengths without drawing them.

    Returns ``(rles, mask_boxes, areas)``: N compressed COCO RLEs byte-identical to
    :func:`encode_masks` of the drawn masks, ``(N, 4)`` float32 mask boxes and ``(N,)`` int64 areas.
    """
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    c0 = np.clip(np.ceil(b[:, 0] - 0.5), 0, width).astype(np.int64)
    c1 = np.clip(np.floor(b[:, 2] - 0.5), -1, width - 1).astype(np.int64)
    r0 = np.clip(np.ceil(b[:, 1] - 0.5), 0, height).astype(np.int64)
    r1 = np.clip(np.floor(b[:, 3] - 0.5), -1, height - 1).astype(np.int64)
    empty = (c1 < c0) | (r1 < r0)
    h = np.where(empty, 0, r1 - r0 + 1)
    cols = np.where(empty, 0, c1 - c0 + 1)
    total = height * width
    counts = []
    for i in range(len(b)):
        if empty[i]:
            counts.append([total])
            continue
        start, hi, n = int(c0[i] * height + r0[i]), int(h[i]), int(cols[i])
        runs = [start, hi * n] if hi == height else [start] + [hi, height - hi] * (n - 1) + [hi]
        tail = total - start - (n - 1) * height - hi
        counts.append(runs + [tail] if tail else runs)
    rles = compress_rles([{"size": [height, width], "counts": c} for c in counts])
    mask_boxes = np.stack([c0, r0, c1 + 1, r1 + 1], axis=1).astype(np.float32).reshape(-1, 4)
    mask_boxes[empty] = 0
    return rles, mask_boxes, (h * cols).astype(np.int64)
