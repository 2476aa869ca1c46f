"""Decode stage: image bytes -> RGB array, shard JSON -> prompts. Errors are data.

Everything a bad input can do here ends in :class:`DecodeError` with a readable message (which the
label job writes into the row's ``error`` column); nothing else escapes for bad data.

Coordinates are pixels of the image *as displayed*, i.e. after its EXIF orientation is applied —
the frame in which viewers, detectors that honour EXIF, and OpenCV's ``imread`` see the image.
"""

from __future__ import annotations

import io as _io
import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DecodeError",
    "DecodedSample",
    "Prompts",
    "decode_image",
    "decode_sample",
    "parse_prompts_json",
    "to_rgb",
]

#: Same as Pillow's default decompression-bomb threshold (~ 9459 x 9459).
DEFAULT_MAX_PIXELS = 89_478_485


class DecodeError(ValueError):
    """An input (image bytes or prompt JSON) that cannot be used; the message says why."""


# --- images --------------------------------------------------------------------------------------


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes into a ``(H, W, 3)`` uint8 RGB array, EXIF orientation applied.

    The pixel count is checked from the header, before any pixel is decoded, so a decompression
    bomb costs nothing. Pillow's own bomb warning is silenced (this check replaces it); images
    above Pillow's hard limit (``2 * Image.MAX_IMAGE_PIXELS``) are refused by Pillow whatever
    ``max_pixels`` says. Multi-frame images (GIF, animated WebP) give their first frame. A
    malformed EXIF block is ignored (orientation left as stored). Modes: see :func:`to_rgb`.

    Raises:
        DecodeError: zero bytes, unknown format, truncated or corrupt data, too many pixels.
    """
    if not data:
        raise DecodeError("empty image (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(_io.BytesIO(data))
            width, height = im.size
            if width * height > max_pixels:
                raise DecodeError(f"image too large: {width}x{height} = {width * height} pixels > {max_pixels}")
            if width < 1 or height < 1:
                raise DecodeError(f"image has no pixels ({width}x{height})")
            im.load()
    except DecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise DecodeError(f"image too large: {e}") from None
    except UnidentifiedImageError:
        raise DecodeError(f"not a recognised image format ({len(data)} bytes)") from None
    except OSError as e:
        raise DecodeError(f"truncated or corrupt image: {e}") from None
    except Exception as e:  # Pillow plugins raise SyntaxError, ValueError, struct.error, ...
        raise DecodeError(f"corrupt image: {type(e).__name__}: {e}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "corrupt EXIF" warnings, once per bad image, are noise
            im = ImageOps.exif_transpose(im) or im
    except Exception:  # malformed EXIF: keep the stored orientation rather than lose the image
        pass
    try:
        return to_rgb(im)
    except DecodeError:
        raise
    except Exception as e:
        raise DecodeError(f"cannot convert mode {im.mode} to RGB: {e}") from None


def to_rgb(im: Image.Image) -> np.ndarray:
    """Convert any Pillow mode to a writable ``(H, W, 3)`` uint8 RGB array.

    - ``RGB`` as is; ``L``, ``1``, ``CMYK``, ``YCbCr``... via Pillow's conversion.
    - Alpha (``LA``, ``RGBA``, ``PA``, ``P`` with transparency) is *dropped*, not composited:
      the colour channels are kept as stored, as OpenCV's ``imread(IMREAD_COLOR)`` does in the
      reference pipelines.
    - 16-bit (``I;16*``) is scaled by 255/65535. ``I`` (32-bit int) is used as is when it fits
      0..255, scaled as 16-bit when it fits 0..65535, else min-max stretched. ``F`` (float) is
      scaled by 255 when it fits 0..1, used as is when it fits 0..255, else min-max stretched;
      NaN becomes 0. The result is replicated to three grey channels.
    """
    mode = im.mode
    if mode == "RGB":
        return np.array(im, dtype=np.uint8)
    if mode.startswith("I;16") or mode in ("I", "F"):
        grey = _to_uint8_grey(np.asarray(im), mode)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    elif mode in ("La", "RGBa"):
        im = im.convert("RGBA") if mode == "RGBa" else im.convert("LA")
    if im.mode in ("RGBA", "RGBX"):
        return np.array(im, dtype=np.uint8)[:, :, :3].copy()
    if im.mode in ("LA", "PA"):
        im = im.convert("RGBA")
        return np.array(im, dtype=np.uint8)[:, :, :3].copy()
    return np.array(im.convert("RGB"), dtype=np.uint8)


def _to_uint8_grey(arr: np.ndarray, mode: str) -> np.ndarray:
    values = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode.startswith("I;16") or (mode == "I" and lo >= 0 and hi > 255 and hi <= 65535):
        scaled = values * (255.0 / 65535.0)
    elif lo >= 0 and hi <= 1.0 and mode == "F":
        scaled = values * 255.0
    elif lo >= 0 and hi <= 255:
        scaled = values
    else:
        scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


# --- prompts -------------------------------------------------------------------------------------


@dataclass
class Prompts:
    """Prompts of one image from its shard JSON, validated and in image pixels (xyxy).

    Attributes:
        boxes: (N, 4) float32 xyxy, clipped to ``[0, W] x [0, H]``, x0 <= x1, y0 <= y1.
        box_scores: (N,) float32 detector scores; NaN where the JSON gave none.
        box_labels: N detector class names (``None`` where not given).
        box_indices: (N,) int64 position of each kept box in the JSON's ``boxes`` list.
        points: (M, 2) float32 xy, clipped to the pixel grid ``[0, W-1] x [0, H-1]``.
        point_boxes: (M, 4) float32 xyxy box given with each point (NaN row: none), or ``None``
            when the JSON has no ``point_boxes``.
        point_indices: (M,) int64 position of each kept point in the JSON's ``points`` list.
        image_id: the JSON's ``image_id`` as a string, or ``None``.
        annotations: the JSON's ``annotations`` (COCO-style dicts), unchanged.
        warnings: one message per prompt that was dropped (the image itself is still usable).
    """

    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    box_scores: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    box_labels: list[str | None] = field(default_factory=list)
    box_indices: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))
    point_boxes: np.ndarray | None = None
    point_indices: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    image_id: str | None = None
    annotations: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def num_boxes(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def num_points(self) -> int:
        return int(self.points.shape[0])


def parse_prompts_json(data: bytes | None, *, width: int, height: int) -> Prompts:
    """Parse a sample's JSON (DESIGN §4: ``boxes``, ``scores``, ``labels``, ``points``,
    ``point_boxes``, ``image_id``, ``annotations``; all optional) for a ``width`` x ``height`` image.

    Policy — one bad prompt must not cost the whole image, a broken file must be reported:
      - ``None`` (no JSON member) gives empty prompts.
      - Not UTF-8 / not JSON / not an object, or per-prompt lists (``scores``, ``labels``,
        ``point_boxes``) whose length differs from their ``boxes``/``points``: :class:`DecodeError`.
      - A box that is not 4 finite numbers (NaN, inf, null, text, wrong length) is dropped and
        named in ``warnings``. Inverted boxes are re-ordered, then boxes are clipped to the image;
        zero-area boxes (also after clipping a box lying outside the image) are kept — the model
        handles them and the row shows what was asked.
      - A point that is not 2 finite numbers is dropped (with its point box) and named in
        ``warnings``; points are clipped to the pixel grid. A bad point box becomes a NaN row
        (no box for that point) with a warning.
    """
    if width < 1 or height < 1:
        raise DecodeError(f"invalid image size {width}x{height}")
    if data is None:
        return Prompts()
    obj = _load_json_object(data)
    out = Prompts(image_id=_image_id(obj.get("image_id")), annotations=_annotations(obj.get("annotations")))
    _parse_boxes(obj, width, height, out)
    _parse_points(obj, width, height, out)
    return out


def _load_json_object(data: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DecodeError(f"prompt JSON is not UTF-8: {e}") from None
    except json.JSONDecodeError as e:
        raise DecodeError(f"malformed prompt JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise DecodeError("malformed prompt JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise DecodeError(f"prompt JSON must be an object, got {type(obj).__name__}")
    return obj


def _list_field(obj: dict[str, Any], name: str, length: int | None = None) -> list[Any] | None:
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, list):
        raise DecodeError(f"prompt JSON field {name!r} must be a list, got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise DecodeError(f"prompt JSON field {name!r} has {len(value)} entries for {length} prompts")
    return value


def _numbers(value: Any, n: int) -> list[float] | None:
    """``value`` as ``n`` finite floats, or None."""
    if not isinstance(value, (list, tuple)) or len(value) != n:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return None
    out = [float(v) for v in value]
    return out if all(math.isfinite(v) for v in out) else None


def _parse_boxes(obj: dict[str, Any], width: int, height: int, out: Prompts) -> None:
    raw = _list_field(obj, "boxes") or []
    scores = _list_field(obj, "scores", len(raw))
    labels = _list_field(obj, "labels", len(raw))
    boxes, kept_scores, kept_labels, kept = [], [], [], []
    for i, box in enumerate(raw):
        xyxy = _numbers(box, 4)
        if xyxy is None:
            out.warnings.append(f"box {i} dropped: expected 4 finite numbers, got {_short(box)}")
            continue
        boxes.append(_clip_box(xyxy, width, height))
        score = scores[i] if scores is not None else None
        kept_scores.append(float(score) if _numbers([score], 1) else math.nan)
        label = labels[i] if labels is not None else None
        kept_labels.append(None if label is None else str(label))
        kept.append(i)
    if boxes:
        out.boxes = np.asarray(boxes, np.float32)
        out.box_scores = np.asarray(kept_scores, np.float32)
        out.box_indices = np.asarray(kept, np.int64)
    out.box_labels = kept_labels


def _clip_box(xyxy: list[float], width: int, height: int) -> list[float]:
    x0, y0, x1, y1 = xyxy
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    return [min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width),
            min(max(y1, 0.0), height)]


def _parse_points(obj: dict[str, Any], width: int, height: int, out: Prompts) -> None:
    raw = _list_field(obj, "points") or []
    raw_boxes = _list_field(obj, "point_boxes", len(raw))
    points, point_boxes, kept = [], [], []
    for i, point in enumerate(raw):
        xy = _numbers(point, 2)
        if xy is None:
            out.warnings.append(f"point {i} dropped: expected 2 finite numbers, got {_short(point)}")
            continue
        points.append([min(max(xy[0], 0.0), width - 1.0), min(max(xy[1], 0.0), height - 1.0)])
        kept.append(i)
        if raw_boxes is not None:
            box = raw_boxes[i]
            xyxy = _numbers(box, 4)
            if xyxy is None and box is not None:
                out.warnings.append(f"point box {i} ignored: expected 4 finite numbers, got {_short(box)}")
            point_boxes.append(_clip_box(xyxy, width, height) if xyxy else [math.nan] * 4)
    if points:
        out.points = np.asarray(points, np.float32)
        out.point_indices = np.asarray(kept, np.int64)
    if raw_boxes is not None:
        out.point_boxes = np.asarray(point_boxes, np.float32).reshape(-1, 4)


def _image_id(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _annotations(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(a, dict) for a in value):
        raise DecodeError("prompt JSON field 'annotations' must be a list of objects")
    return value


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- one sample ----------------------------------------------------------------------------------


@dataclass
class DecodedSample:
    """A shard sample after the decode stage: either ``image`` + ``prompts`` or an ``error``."""

    key: str
    shard: str
    image: np.ndarray | None = None
    prompts: Prompts | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def width(self) -> int | None:
        return None if self.image is None else int(self.image.shape[1])

    @property
    def height(self) -> int | None:
        return None if self.image is None else int(self.image.shape[0])


def decode_sample(sample: dict[str, Any], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedSample:
    """Decode one sample from :func:`~ovsam_ray.data.shards.iter_shard_samples`; never raises for
    bad data (a reader error, an undecodable image or malformed JSON become ``error``)."""
    out = DecodedSample(key=sample["key"], shard=sample["shard"])
    if sample.get("error"):
        out.error = sample["error"]
        return out
    try:
        image = decode_image(sample.get("image_bytes") or b"", max_pixels=max_pixels)
        prompts = parse_prompts_json(sample.get("json_bytes"), width=image.shape[1], height=image.shape[0])
    except DecodeError as e:
        out.error = str(e)
        return out
    out.image, out.prompts = image, prompts
    return out
