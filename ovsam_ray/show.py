"""``ovsam-ray show``: overlay PNGs of sampled labelled images (masks, boxes, top label + score).

Rows are sampled uniformly from the committed label files in one streaming pass (reservoir
sampling, seeded: the same arguments give the same images). Each image is read from its input
shard — ``shards``, else the ``input`` in the label output's run record — and decoded as the
label job decoded it (EXIF orientation applied), so masks line up. Output:
``<output>/<shard>__<key>.png``.
"""

from __future__ import annotations

import colorsys
import io as _io
import logging
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ovsam_ray import io
from ovsam_ray.data.decode import DecodeError, decode_image
from ovsam_ray.data.rle import decode_rle
from ovsam_ray.data.shards import iter_shard_samples
from ovsam_ray.export.reader import iter_label_rows, source_shards

__all__ = ["colour", "render_overlay", "sample_rows", "show"]

log = logging.getLogger(__name__)


def colour(i: int) -> tuple[int, int, int]:
    """A distinct, saturated RGB colour for instance ``i`` (golden-ratio hue steps)."""
    r, g, b = colorsys.hsv_to_rgb((0.13 + 0.618034 * i) % 1.0, 0.85, 1.0)
    return int(255 * r), int(255 * g), int(255 * b)


def render_overlay(image: np.ndarray, instances: Sequence[dict[str, Any]], *, alpha: float = 0.45,
                   min_score: float = 0.0) -> Image.Image:
    """Draw each instance on an (H, W, 3) uint8 image: its mask blended in a colour, the mask's box,
    the point prompt (if any) and ``label score`` above the box. Returns a new RGB image."""
    canvas = image.astype(np.float32).copy()
    shown = [inst for inst in instances if (inst.get("label_score") or 0.0) >= min_score]
    for i, inst in enumerate(shown):
        mask = decode_rle(inst["rle"])
        if mask.shape != canvas.shape[:2]:
            continue
        canvas[mask] = (1 - alpha) * canvas[mask] + alpha * np.asarray(colour(i), np.float32)
    out = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    for i, inst in enumerate(shown):
        c = colour(i)
        x0, y0, x1, y1 = (float(v) for v in inst.get("bbox") or (0, 0, 0, 0))
        if x1 > x0 and y1 > y0:
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=c, width=2)
        if inst.get("point") is not None:
            px, py = (float(v) for v in inst["point"])
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=c, outline=(0, 0, 0))
        text = f"{inst.get('label')} {float(inst.get('label_score') or 0.0):.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        ty = max(0.0, y0 - (bottom - top) - 4)
        tx = max(0.0, min(x0, out.width - (right - left) - 4))  # keep the label inside the image
        draw.rectangle([tx, ty, tx + right - left + 4, ty + bottom - top + 4], fill=c)
        draw.text((tx + 2, ty + 2 - top), text, fill=(0, 0, 0), font=font)
    return out


def sample_rows(labels: str, n: int, *, seed: int = 0, s3_endpoint: str | None = None) -> list[dict[str, Any]]:
    """Up to ``n`` ``ok`` rows drawn uniformly in one pass (reservoir sampling), in output order."""
    rng = random.Random(seed)
    reservoir: list[tuple[int, dict[str, Any]]] = []
    seen = 0
    for row in iter_label_rows(labels, s3_endpoint=s3_endpoint):
        if row["status"] != "ok":
            continue
        if len(reservoir) < n:
            reservoir.append((seen, row))
        else:
            j = rng.randrange(seen + 1)
            if j < n:
                reservoir[j] = (seen, row)
        seen += 1
    return [row for _, row in sorted(reservoir, key=lambda p: p[0])]


def _images(shard_url: str | None, keys: set[str], s3_endpoint: str | None) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    if shard_url is None:
        return out
    for s in iter_shard_samples(shard_url, s3_endpoint=s3_endpoint):
        if s["key"] in keys and s["image_bytes"]:
            try:
                out[s["key"]] = decode_image(s["image_bytes"])
            except DecodeError as e:
                log.warning("%s/%s: %s", shard_url, s["key"], e)
    return out


def show(labels: str, output: str, *, n: int = 8, shards: str | None = None, seed: int = 0,
         min_score: float = 0.0, s3_endpoint: str | None = None) -> list[str]:
    """Write overlay PNGs of ``n`` sampled images under ``output``; returns their URLs. An image
    that cannot be read from its shard is drawn on grey (and logged)."""
    if n < 1:
        raise ValueError(f"n={n}: must be >= 1")
    rows = sample_rows(labels, n, seed=seed, s3_endpoint=s3_endpoint)
    urls = source_shards(labels, shards, s3_endpoint=s3_endpoint)
    by_shard: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_shard.setdefault(row["shard"], []).append(row)
    written = []
    for shard, shard_rows in by_shard.items():
        images = _images(urls.get(shard), {r["key"] for r in shard_rows}, s3_endpoint)
        for row in shard_rows:
            image = images.get(row["key"])
            if image is None or image.shape[:2] != (row["height"], row["width"]):
                log.warning("image %s/%s not found in its shard: drawing on grey", shard, row["key"])
                image = np.full((row["height"], row["width"], 3), 128, np.uint8)
            buf = _io.BytesIO()
            render_overlay(image, row["instances"] or [], min_score=min_score).save(buf, format="PNG")
            url = io.join(output, f"{shard}__{row['key'].replace('/', '_')}.png")
            io.atomic_write_bytes(url, buf.getvalue(), s3_endpoint=s3_endpoint)
            written.append(url)
    return written
