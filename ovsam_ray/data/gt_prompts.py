"""Prompts from ground-truth annotations, and the ground-truth mask of an object.

The paper's interactive protocol (Table 1) prompts with each object's ground-truth box, or with
the object's interior point farthest from its boundary (with the box given to the CLIP branch).
:func:`gt_prompts` builds those prompt fields of the shard JSON (DESIGN §4) from COCO-style
``annotations`` and records which annotation each prompt came from (``box_annotations``,
``point_annotations``: indices into ``annotations``), so that scores can be matched back to
objects. Crowd regions and annotations without a usable box are not prompted.
"""

from __future__ import annotations

import io as _io
import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from ovsam_ray import storage
from ovsam_ray.data.points import interior_points
from ovsam_ray.data.rle import annotation_mask, box_fill_mask
from ovsam_ray.data.shards import iter_shard_samples
from ovsam_ray.data.synthetic import tar_bytes
from ovsam_ray.errors import ConfigError

__all__ = [
    "PROMPT_FIELDS",
    "PROMPT_MODES",
    "gt_prompts",
    "is_promptable",
    "object_mask",
    "rewrite_shard_prompts",
    "with_gt_prompts",
]

PROMPT_MODES = ("box", "point", "both", "none")
#: JSON fields that describe prompts; :func:`with_gt_prompts` replaces all of them.
PROMPT_FIELDS = ("boxes", "scores", "labels", "points", "point_boxes", "box_annotations", "point_annotations")


def object_mask(ann: dict[str, Any], height: int, width: int) -> np.ndarray:
    """(H, W) bool ground-truth mask of an object: its segmentation
    (:func:`~ovsam_ray.data.rle.annotation_mask`), else its box filled, else empty."""
    mask = annotation_mask(ann, height, width)
    if mask is not None:
        return mask
    box = _xyxy(ann)
    return box_fill_mask(box, height, width) if box is not None else np.zeros((height, width), bool)


def _xyxy(ann: dict[str, Any]) -> list[float] | None:
    bbox = ann.get("bbox")
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return None
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        return None
    return [x, y, x + w, y + h]


def is_promptable(ann: dict[str, Any]) -> bool:
    """An object the protocol prompts: not a crowd region, with a finite, non-empty box."""
    return not ann.get("iscrowd") and _xyxy(ann) is not None


def gt_prompts(
    annotations: list[dict[str, Any]],
    *,
    height: int,
    width: int,
    mode: str = "box",
    keep: Callable[[dict[str, Any]], bool] | None = None,
) -> dict[str, Any]:
    """Prompt fields for one image from its annotations.

    ``mode``: ``box`` (``boxes``: XYXY ground-truth boxes, ``labels``: category names), ``point``
    (``points``: interior point farthest from the boundary, ``point_boxes``: the object's box),
    ``both`` or ``none``. ``keep`` further restricts the prompted annotations (e.g. to classes of
    the vocabulary). An object whose mask is empty gets no point prompt.
    """
    if mode not in PROMPT_MODES:
        raise ConfigError(f"prompt mode {mode!r}: choose one of {PROMPT_MODES}")
    chosen = [i for i, a in enumerate(annotations) if is_promptable(a) and (keep is None or keep(a))]
    out: dict[str, Any] = {}
    if mode in ("box", "both"):
        out["boxes"] = [_xyxy(annotations[i]) for i in chosen]
        out["labels"] = [_category_name(annotations[i]) for i in chosen]
        out["box_annotations"] = chosen
    if mode in ("point", "both"):
        masks = (
            np.stack([object_mask(annotations[i], height, width) for i in chosen])
            if chosen
            else np.zeros((0, height, width), bool)
        )
        points = interior_points(masks)
        has_point = [j for j in range(len(chosen)) if points[j, 0] >= 0]
        out["points"] = [[float(v) for v in points[j]] for j in has_point]
        out["point_boxes"] = [_xyxy(annotations[chosen[j]]) for j in has_point]
        out["point_annotations"] = [chosen[j] for j in has_point]
    return out


def _category_name(ann: dict[str, Any]) -> str | None:
    name = ann.get("category_name")
    if name is None and ann.get("category_id") is not None:
        return str(ann["category_id"])
    return None if name is None else str(name)


def _image_size(meta: dict[str, Any], image_bytes: bytes | None) -> tuple[int, int]:
    """(height, width) from the JSON, else an annotation's RLE size, else the image header."""
    if isinstance(meta.get("height"), int) and isinstance(meta.get("width"), int):
        return meta["height"], meta["width"]
    for ann in meta.get("annotations") or []:
        segm = ann.get("segmentation")
        if isinstance(segm, dict) and "size" in segm:
            return int(segm["size"][0]), int(segm["size"][1])
    with Image.open(_io.BytesIO(image_bytes or b"")) as im:
        return im.height, im.width


def with_gt_prompts(
    meta: dict[str, Any],
    image_bytes: bytes | None = None,
    *,
    mode: str = "box",
    keep: Callable[[dict[str, Any]], bool] | None = None,
) -> dict[str, Any]:
    """A copy of a sample's JSON whose prompts are replaced by ground-truth prompts (see :func:`gt_prompts`)."""
    out = {k: v for k, v in meta.items() if k not in PROMPT_FIELDS}
    anns = meta.get("annotations") or []
    if mode == "none":
        return out
    height, width = _image_size(meta, image_bytes) if mode in ("point", "both") else (1, 1)
    out.update(gt_prompts(anns, height=height, width=width, mode=mode, keep=keep))
    return out


def rewrite_shard_prompts(
    src_url: str,
    dst_url: str,
    *,
    mode: str = "both",
    keep: Callable[[dict[str, Any]], bool] | None = None,
    s3_endpoint: str | None = None,
) -> dict[str, int]:
    """Copy a shard (image + JSON members) with ground-truth prompts in every JSON; ``dst_url`` may
    equal ``src_url`` (the shard is read whole first and written atomically). Samples without an
    image are dropped; a JSON that does not parse is copied unchanged (the label job reports it).
    Returns counts: ``images``, ``prompts``, ``unparsed``."""
    members: list[tuple[str, bytes]] = []
    counts = {"images": 0, "prompts": 0, "unparsed": 0}
    for s in iter_shard_samples(src_url, s3_endpoint=s3_endpoint):
        if s["key"] is None or s["image_bytes"] is None:
            continue
        members.append((f"{s['key']}.{s['image_ext']}", s["image_bytes"]))
        counts["images"] += 1
        if s["json_bytes"] is None:
            continue
        data = s["json_bytes"]
        try:
            meta = json.loads(data)
            if not isinstance(meta, dict):
                raise ValueError("not an object")
            meta = with_gt_prompts(meta, s["image_bytes"], mode=mode, keep=keep)
        except (ValueError, TypeError, KeyError, OSError):
            counts["unparsed"] += 1
        else:
            counts["prompts"] += len(meta.get("boxes") or []) + len(meta.get("points") or [])
            data = json.dumps(meta, separators=(",", ":")).encode()
        members.append((f"{s['key']}.json", data))
    storage.atomic_write_bytes(dst_url, tar_bytes(members), s3_endpoint=s3_endpoint)
    return counts
