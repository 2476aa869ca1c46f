"""``ovsam-ray show``: overlay PNGs of sampled labelled images (masks, boxes, top label + score).

Rows are sampled uniformly from the committed label files in one streaming pass (reservoir
sampling, seeded: the same arguments give the same images). Each image is read from its input
shard — ``shards``, else the ``input`` in the label output's run record — and decoded as the
label job decoded it (EXIF orientation applied), so masks line up. Output:
``<output>/<shard>/<key>.png`` (a safe file name, see
:func:`~ovsam_ray.export.paths.data_file_name`), and with ``sheet`` one
``<output>/contact_sheet.png`` holding all of them as thumbnails. Text size and line widths scale
with the image (readable on a 4000-pixel photo as on a 640-pixel one); labels are placed
where they do not cover each other.
"""

from __future__ import annotations

import colorsys
import io as _io
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ovsam_ray import storage
from ovsam_ray.data.decode import DecodeError, decode_image
from ovsam_ray.data.rle import decode_rle
from ovsam_ray.data.shards import iter_shard_samples
from ovsam_ray.errors import ConfigError
from ovsam_ray.export.paths import data_file_name
from ovsam_ray.labels.reader import iter_label_rows, source_shards
from ovsam_ray.written import writing

__all__ = ["colour", "contact_sheet", "drawing_scale", "place_labels", "render_overlay", "sample_rows", "show"]

Box = tuple[float, float, float, float]

log = logging.getLogger(__name__)


def colour(i: int) -> tuple[int, int, int]:
    """A distinct, saturated RGB colour for instance ``i`` (golden-ratio hue steps)."""
    r, g, b = colorsys.hsv_to_rgb((0.13 + 0.618034 * i) % 1.0, 0.85, 1.0)
    return int(255 * r), int(255 * g), int(255 * b)


def drawing_scale(width: int, height: int) -> tuple[int, int]:
    """(font size in pixels, line width) for an image: fixed up to 640 pixels on the long side,
    then proportional to it, so labels stay readable once the image is shown scaled to a screen."""
    s = max(1.0, max(width, height) / 640)
    return round(11 * s), max(2, round(2 * s))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_labels(boxes: Sequence[Box], sizes: Sequence[tuple[float, float]], width: int, height: int) -> list[Box]:
    """Label rectangles (x0, y0, x1, y1) for objects ``boxes`` (XYXY pixels) and label ``sizes``
    (w, h), placed greedily in order: above the box, inside its top, below it, then further down
    below the box, the first spot inside the image that covers no earlier label (if none is free,
    the spot above the box)."""
    placed: list[Box] = []
    for (x0, y0, _x1, y1), (w, h) in zip(boxes, sizes):
        x = max(0.0, min(x0, width - w))
        tops = [y0 - h, y0, y1] + [y1 + k * h for k in range(1, int(height / max(h, 1)) + 1)]
        spots = [(x, max(0.0, min(t, height - h))) for t in tops]
        free = [p for p in spots if not any(_overlaps((p[0], p[1], p[0] + w, p[1] + h), q) for q in placed)]
        px, py = (free or spots)[0]
        placed.append((px, py, px + w, py + h))
    return placed


def render_overlay(
    image: np.ndarray, instances: Sequence[dict[str, Any]], *, alpha: float = 0.45, min_score: float = 0.0
) -> Image.Image:
    """Draw each instance on an (H, W, 3) uint8 image: its mask blended in a colour, the mask's box,
    the point prompt (if any) and ``label score`` near the box (see :func:`place_labels`), sized
    by :func:`drawing_scale`. Returns a new RGB image."""
    canvas = image.astype(np.float32).copy()
    shown = [inst for inst in instances if (inst.get("label_score") or 0.0) >= min_score]
    for i, inst in enumerate(shown):
        mask = decode_rle(inst["rle"])
        if mask.shape != canvas.shape[:2]:
            continue
        canvas[mask] = (1 - alpha) * canvas[mask] + alpha * np.asarray(colour(i), np.float32)
    out = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    size, line = drawing_scale(out.width, out.height)
    font, pad = _font(size), max(2, line)
    boxes, texts, sizes = [], [], []
    for i, inst in enumerate(shown):
        c = colour(i)
        x0, y0, x1, y1 = (float(v) for v in inst.get("bbox") or (0, 0, 0, 0))
        if x1 > x0 and y1 > y0:
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=c, width=line)
        if inst.get("point") is not None:
            px, py = (float(v) for v in inst["point"])
            r = 1.5 * line
            draw.ellipse([px - r, py - r, px + r, py + r], fill=c, outline=(0, 0, 0))
        text = f"{inst.get('label')} {float(inst.get('label_score') or 0.0):.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        boxes.append((x0, y0, x1, y1))
        texts.append((text, top))
        sizes.append((right - left + 2 * pad, bottom - top + 2 * pad))
    for i, ((text, top), (tx, ty, tx1, ty1)) in enumerate(
        zip(texts, place_labels(boxes, sizes, out.width, out.height))
    ):
        draw.rectangle([tx, ty, tx1 - 1, ty1 - 1], fill=colour(i))
        draw.text((tx + pad, ty + pad - top), text, fill=(0, 0, 0), font=font)
    return out


def write_overlay(
    image_url: str, instances: Sequence[dict[str, Any]], output: str, *, s3_endpoint: str | None = None
) -> str:
    """Draw ``instances`` (``predict``'s, or a label row's) on the image at ``image_url`` with
    :func:`render_overlay` and write it as a PNG to ``output``; returns ``output``."""
    from ovsam_ray.data.decode import read_image

    if not output.lower().endswith(".png"):
        raise ConfigError(f"--overlay {output}: give a .png file name")
    image = read_image(image_url, s3_endpoint=s3_endpoint)
    storage.atomic_write_bytes(output, _png(render_overlay(image, instances)), s3_endpoint=s3_endpoint)
    return output


def contact_sheet(
    images: Sequence[Image.Image], captions: Sequence[str] = (), *, cell: int = 384, columns: int | None = None
) -> Image.Image:
    """One RGB image holding ``images`` as thumbnails (longest side ``cell``) on a grid of
    ``columns`` (default: about square), each with its caption below it."""
    columns = columns or max(1, int(np.ceil(np.sqrt(len(images)))))
    rows = max(1, -(-len(images) // columns))
    font = _font(max(11, cell // 28))
    caption_h = max(14, cell // 20)
    sheet = Image.new("RGB", (columns * cell, rows * (cell + caption_h)), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    for i, im in enumerate(images):
        thumb = im.convert("RGB")
        thumb.thumbnail((cell, cell))
        x, y = (i % columns) * cell, (i // columns) * (cell + caption_h)
        sheet.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
        if i < len(captions):
            draw.text((x + 4, y + cell + 1), captions[i], fill=(230, 230, 230), font=font)
    return sheet


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


def _png(image: Image.Image) -> bytes:
    buf = _io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@dataclass(frozen=True)
class ShowConfig:
    """``ovsam-ray show``: the arguments of :func:`show` (``input`` is its ``labels``)."""

    input: str = field(metadata={"help": "label output"})
    output: str = field(metadata={"help": "folder for the PNGs"})
    n: int = field(default=8, metadata={"flag": "-n", "help": "number of images"})
    shards: str | None = field(default=None, metadata={"help": "input shards (default: the label run record's input)"})
    seed: int = field(default=0, metadata={"help": "seed of the sample of images"})
    min_score: float = field(default=0.0, metadata={"help": "draw only the instances scored at least this"})
    sheet: bool = field(default=False, metadata={"help": "also one contact_sheet.png of all N overlays"})
    overwrite: bool = field(
        default=False,
        metadata={"help": "replace the PNGs of an earlier show in --output (never anyone else's files)"},
    )
    s3_endpoint: str | None = field(
        default=None, metadata={"help": "S3-compatible endpoint URL (else AWS_ENDPOINT_URL)"}
    )


def show(
    labels: str,
    output: str,
    *,
    n: int = 8,
    shards: str | None = None,
    seed: int = 0,
    min_score: float = 0.0,
    sheet: bool = False,
    overwrite: bool = False,
    s3_endpoint: str | None = None,
) -> list[str]:
    """Write overlay PNGs of ``n`` sampled images under ``output`` (and with ``sheet`` a contact
    sheet of them, listed last); returns their URLs. An image that cannot be read from its shard is
    drawn on grey (and logged). A PNG of the same name already there is refused unless an earlier
    ``show`` wrote it (see :mod:`ovsam_ray.written`)."""
    if n < 1:
        raise ConfigError(f"n={n}: must be >= 1")
    rows = sample_rows(labels, n, seed=seed, s3_endpoint=s3_endpoint)
    names = [data_file_name(r["shard"], r["key"], "png") for r in rows] + (["contact_sheet.png"] if sheet else [])
    with writing(output, "show", names, overwrite=overwrite, s3_endpoint=s3_endpoint):
        return _write_overlays(
            rows, labels, output, shards=shards, min_score=min_score, sheet=sheet, s3_endpoint=s3_endpoint
        )


def _write_overlays(
    rows: list[dict[str, Any]],
    labels: str,
    output: str,
    *,
    shards: str | None,
    min_score: float,
    sheet: bool,
    s3_endpoint: str | None,
) -> list[str]:
    urls = source_shards(labels, shards, s3_endpoint=s3_endpoint)
    by_shard: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_shard.setdefault(row["shard"], []).append(row)
    written, thumbs, captions = [], [], []
    for shard, shard_rows in by_shard.items():
        images = _images(urls.get(shard), {r["key"] for r in shard_rows}, s3_endpoint)
        for row in shard_rows:
            image = images.get(row["key"])
            if image is None or image.shape[:2] != (row["height"], row["width"]):
                log.warning(
                    "image %s/%s not found in its shard: drawing on grey",
                    storage.safe_for_log(shard),
                    storage.safe_for_log(row["key"]),
                )
                image = np.full((row["height"], row["width"], 3), 128, np.uint8)
            overlay = render_overlay(image, row["instances"] or [], min_score=min_score)
            url = storage.join(output, data_file_name(shard, row["key"], "png"))
            storage.atomic_write_bytes(url, _png(overlay), s3_endpoint=s3_endpoint)
            written.append(url)
            if sheet:
                overlay.thumbnail((384, 384))
                thumbs.append(overlay)
                captions.append(storage.safe_for_log(f"{shard}/{row['key']}", limit=60))  # one line, fits a cell
    if sheet:
        url = storage.join(output, "contact_sheet.png")
        storage.atomic_write_bytes(url, _png(contact_sheet(thumbs, captions)), s3_endpoint=s3_endpoint)
        written.append(url)
    return written
