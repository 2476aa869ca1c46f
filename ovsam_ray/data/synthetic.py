"""Synthetic WebDataset shards for the demo and the tests: coloured shapes with exact masks.

Each image holds ``min_objects..max_objects`` shapes (classes in :data:`SHAPE_CLASSES`) in random
colours, sizes, rotations and positions over a noisy background; later shapes may partly hide
earlier ones. Every sample is ``<key>.jpg`` (or ``.png``) plus ``<key>.json`` with ``boxes`` (the
*visible* extent of each shape, xyxy pixels), ``labels``, ``image_id`` and COCO-style
``annotations`` whose ``segmentation`` is the RLE of the visible mask. Output is a deterministic
function of the arguments (byte-identical tars for the same seed).
"""

from __future__ import annotations

import io as _io
import json
import math
import tarfile
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ovsam_ray import storage
from ovsam_ray.data.rle import boxes_from_binary_masks, encode_masks
from ovsam_ray.errors import ConfigError

__all__ = [
    "SHAPE_CLASSES",
    "generate_shards",
    "render_image",
    "shape_vocabulary_names",
    "tar_bytes",
]

SHAPE_CLASSES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "hexagon",
    "ellipse",
    "pentagon",
    "cross",
)
_MIN_VISIBLE_PIXELS = 40
_MIN_VISIBLE_FRACTION = 0.5


def shape_vocabulary_names() -> list[str]:
    """The class names of the synthetic data, in ``category_id`` order."""
    return list(SHAPE_CLASSES)


# --- drawing -------------------------------------------------------------------------------------


def _regular(n: int, radius: float, start: float) -> list[tuple[float, float]]:
    return [
        (radius * math.cos(start + 2 * math.pi * k / n), radius * math.sin(start + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _outline(kind: str, radius: float, aspect: float) -> list[tuple[float, float]]:
    """Polygon of a shape centred on 0 before rotation."""
    if kind == "circle":
        return _regular(48, radius, 0.0)
    if kind == "ellipse":
        return [(x, y * aspect) for x, y in _regular(48, radius, 0.0)]
    if kind == "square":
        return _regular(4, radius, math.pi / 4)
    if kind == "triangle":
        return _regular(3, radius, -math.pi / 2)
    if kind == "pentagon":
        return _regular(5, radius, -math.pi / 2)
    if kind == "hexagon":
        return _regular(6, radius, 0.0)
    if kind == "star":
        outer, inner = _regular(5, radius, -math.pi / 2), _regular(5, radius * 0.45, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    if kind == "cross":
        a, b = radius, radius * 0.35
        return [
            (-b, -a),
            (b, -a),
            (b, -b),
            (a, -b),
            (a, b),
            (b, b),
            (b, a),
            (-b, a),
            (-b, b),
            (-a, b),
            (-a, -b),
            (-b, -b),
        ]
    raise ValueError(f"unknown shape {kind!r}; known: {SHAPE_CLASSES}")


def _shape_mask(
    kind: str, size: tuple[int, int], center: tuple[float, float], radius: float, angle: float, aspect: float
) -> np.ndarray:
    cos, sin = math.cos(angle), math.sin(angle)
    pts = [(center[0] + x * cos - y * sin, center[1] + x * sin + y * cos) for x, y in _outline(kind, radius, aspect)]
    canvas = Image.new("L", size, 0)
    ImageDraw.Draw(canvas).polygon(pts, fill=1)
    return np.asarray(canvas, dtype=bool)


def _random_colour(rng: np.random.Generator, avoid: np.ndarray) -> np.ndarray:
    colour = rng.integers(0, 256, 3)
    for _ in range(20):  # keep shapes distinguishable from the background
        if np.abs(colour - avoid).sum() >= 150:
            break
        colour = rng.integers(0, 256, 3)
    return colour


def render_image(
    rng: np.random.Generator, width: int, height: int, min_objects: int = 1, max_objects: int = 4
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Draw one image: ``(H, W, 3)`` uint8, shape names, ``(N, H, W)`` bool *visible* masks."""
    background = rng.integers(0, 256, 3)
    pixels = np.broadcast_to(background, (height, width, 3)).astype(np.float32).copy()
    wanted = int(rng.integers(min_objects, max_objects + 1))
    kinds: list[str] = []
    visible: list[np.ndarray] = []
    short = min(width, height)
    for _ in range(wanted * 30):
        if len(kinds) == wanted:
            break
        kind = SHAPE_CLASSES[int(rng.integers(len(SHAPE_CLASSES)))]
        radius = float(rng.uniform(0.1, 0.28)) * short * (0.6 if len(visible) > 2 else 1.0)
        center = (float(rng.uniform(0, width)), float(rng.uniform(0, height)))
        mask = _shape_mask(
            kind, (width, height), center, radius, float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(0.4, 0.7))
        )
        covered = [v & ~mask for v in visible]
        if mask.sum() < _MIN_VISIBLE_PIXELS or any(
            c.sum() < max(_MIN_VISIBLE_PIXELS, _MIN_VISIBLE_FRACTION * v.sum()) for c, v in zip(covered, visible)
        ):
            continue
        pixels[mask] = _random_colour(rng, background)
        visible = covered + [mask]
        kinds.append(kind)
    pixels += rng.normal(0.0, 6.0, pixels.shape)
    image = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    masks = np.stack(visible) if visible else np.zeros((0, height, width), bool)
    return image, kinds, masks


def _annotations(kinds: list[str], masks: np.ndarray) -> tuple[np.ndarray, list[dict[str, Any]]]:
    boxes = boxes_from_binary_masks(masks)
    anns = []
    for j, (kind, box, rle, mask) in enumerate(zip(kinds, boxes, encode_masks(masks), masks)):
        x0, y0, x1, y1 = (float(v) for v in box)
        anns.append(
            {
                "id": j,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "category_id": SHAPE_CLASSES.index(kind),
                "category_name": kind,
                "segmentation": rle,
                "area": int(mask.sum()),
                "iscrowd": 0,
            }
        )
    return boxes, anns


def encode_image(image: np.ndarray, fmt: str = "jpg", **save_kwargs: Any) -> bytes:
    """PNG/JPEG bytes of an array or Pillow image (JPEG quality 90 unless told)."""
    im = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buf = _io.BytesIO()
    if fmt in ("jpg", "jpeg"):
        im.save(buf, format="JPEG", quality=save_kwargs.pop("quality", 90), **save_kwargs)
    else:
        im.save(buf, format={"png": "PNG", "tif": "TIFF", "tiff": "TIFF", "webp": "WEBP"}[fmt], **save_kwargs)
    return buf.getvalue()


def tar_bytes(members: Sequence[tuple[str, bytes]]) -> bytes:
    """A tar holding ``members`` in order, with fixed metadata (mtime 0, uid 0) for determinism."""
    buf = _io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tf.addfile(info, _io.BytesIO(data))
    return buf.getvalue()


def _image_size(spec: Any, rng: np.random.Generator) -> tuple[int, int]:
    if isinstance(spec[0], (int, np.integer)):
        return int(spec[0]), int(spec[1])
    (w0, h0), (w1, h1) = spec
    return int(rng.integers(w0, w1 + 1)), int(rng.integers(h0, h1 + 1))


def generate_shards(
    output_dir_or_url: str,
    *,
    num_images: int,
    images_per_shard: int,
    seed: int = 0,
    image_size: tuple[int, int] | tuple[tuple[int, int], tuple[int, int]] = (256, 192),
    min_objects: int = 1,
    max_objects: int = 4,
    image_format: str = "jpg",
    s3_endpoint: str | None = None,
) -> list[str]:
    """Write ``ceil(num_images / images_per_shard)`` shards ``shard-000000.tar``... and return
    their URLs. ``image_size`` is ``(W, H)`` or a range ``((W_min, H_min), (W_max, H_max))``.
    Image ``i`` (key ``f"{i:09d}"``, ``image_id`` ``i``) depends only on ``(seed, i)``."""
    if num_images < 0 or images_per_shard < 1 or not 0 <= min_objects <= max_objects:
        raise ConfigError("need num_images >= 0, images_per_shard >= 1 and 0 <= min_objects <= max_objects")
    urls = []
    for shard_index, start in enumerate(range(0, num_images, images_per_shard)):
        members = []
        for index in range(start, min(start + images_per_shard, num_images)):
            rng = np.random.default_rng([seed, index])
            width, height = _image_size(image_size, rng)
            image, kinds, masks = render_image(rng, width, height, min_objects, max_objects)
            boxes, anns = _annotations(kinds, masks)
            meta = {"image_id": index, "boxes": boxes.tolist(), "labels": kinds, "annotations": anns}
            key = f"{index:09d}"
            members += [
                (f"{key}.{image_format}", encode_image(image, image_format)),
                (f"{key}.json", json.dumps(meta).encode()),
            ]
        url = storage.join(output_dir_or_url, f"shard-{shard_index:06d}.tar")
        storage.atomic_write_bytes(url, tar_bytes(members), s3_endpoint=s3_endpoint)
        urls.append(url)
    return urls
