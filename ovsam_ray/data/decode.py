"""Decode stage: image bytes -> RGB array, shard JSON -> prompts (:mod:`.prompt_json`). Errors are data.

Everything a bad input can do here ends in :class:`DecodeError` with a readable message (which the
label job writes into the row's ``error`` column); nothing else escapes for bad data. Every string
taken from a shard's JSON is made UTF-8-safe with :func:`ovsam_ray.storage.safe_text`.

Coordinates are pixels of the image *as displayed*, i.e. after its EXIF orientation is applied —
the frame in which viewers, detectors that honour EXIF, and OpenCV's ``imread`` see the image.
"""

from __future__ import annotations

import io as _io
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ovsam_ray import storage
from ovsam_ray.data.prompt_json import DEFAULT_MAX_PROMPTS, DecodeError, Prompts, parse_prompts_json

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_PROMPTS",
    "DecodeError",
    "DecodedSample",
    "Prompts",
    "decode_image",
    "decode_sample",
    "parse_prompts_json",
    "read_image",
    "to_rgb",
]

log = logging.getLogger(__name__)

#: Same as Pillow's default decompression-bomb threshold (~ 9459 x 9459).
DEFAULT_MAX_PIXELS = 89_478_485
# JPEG start-of-frame markers of arithmetic-coded images (no bits-per-block floor, see below)
_JPEG_ARITHMETIC_SOF = frozenset({0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


# --- images --------------------------------------------------------------------------------------


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes into a ``(H, W, 3)`` uint8 RGB array, EXIF orientation applied.

    Memory is bounded before any pixel is decoded, from the header: the pixel count must not
    exceed ``max_pixels`` (so a decompression bomb costs nothing), and the data must be long
    enough for the size the header claims (:func:`min_encoded_bytes`) — a few hundred bytes that
    claim 9000 x 9000 pixels are truncated data, which the JPEG decoder would otherwise fill with
    grey at the full size's memory cost and call fine. Truncated data is always an error:
    Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is forced back to ``False`` (with a warning) if
    another library set it. Pillow's own bomb warning is silenced (this check replaces it);
    images above Pillow's hard limit (``2 * Image.MAX_IMAGE_PIXELS``) are refused by Pillow
    whatever ``max_pixels`` says. Multi-frame images (GIF, animated WebP) give their first
    frame. A malformed EXIF block is ignored (orientation left as stored). Modes: see
    :func:`to_rgb`.

    Raises:
        DecodeError: zero bytes, unknown format, truncated or corrupt data, too many pixels.
    """
    if not data:
        raise DecodeError("empty image (0 bytes)")
    _refuse_truncated_loads()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im: Image.Image = Image.open(_io.BytesIO(data))
            width, height = im.size
            if width * height > max_pixels:
                raise DecodeError(f"image too large: {width}x{height} = {width * height} pixels > {max_pixels}")
            if width < 1 or height < 1:
                raise DecodeError(f"image has no pixels ({width}x{height})")
            needed = min_encoded_bytes(im.format, width, height, data)
            if len(data) < needed:
                raise DecodeError(
                    f"truncated image data: {len(data)} bytes cannot hold a {width}x{height} "
                    f"{im.format} (at least {needed} bytes)"
                )
            im.load()
    except DecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise DecodeError(f"image too large: {e}") from None
    except UnidentifiedImageError:
        raise DecodeError(f"not a recognised image format ({len(data)} bytes)") from None
    except OSError as e:
        raise DecodeError(f"truncated or corrupt image: {e}") from None
    except Exception as e:  # noqa: BLE001 - Pillow plugins raise SyntaxError, ValueError, struct.error, ...
        raise DecodeError(f"corrupt image: {type(e).__name__}: {e}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "corrupt EXIF" warnings, once per bad image, are noise
            im = ImageOps.exif_transpose(im) or im
    except Exception:  # noqa: BLE001 - malformed EXIF: keep the stored orientation rather than lose the image
        pass
    try:
        return to_rgb(im)
    except DecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - any conversion failure is this image's error row
        raise DecodeError(f"cannot convert mode {im.mode} to RGB: {e}") from None


def read_image(url: str, *, s3_endpoint: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The image file at ``url`` (a path or any fsspec URL) as ``decode_image`` decodes it:
    ``(H, W, 3)`` uint8 RGB, EXIF orientation applied."""
    return decode_image(storage.read_bytes(url, s3_endpoint=s3_endpoint), max_pixels=max_pixels)


def _refuse_truncated_loads() -> None:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # A process-wide Pillow switch: with it, truncated data decodes to grey and looks fine.
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        log.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES was True; set back to False so that truncated "
            "images are reported as errors"
        )


def min_encoded_bytes(image_format: str | None, width: int, height: int, data: bytes = b"") -> int:
    """The fewest bytes a *complete* ``width`` x ``height`` image of ``image_format`` (Pillow's
    name) can take; fewer means the data is truncated. A floor that no valid file goes below:

    - JPEG/MPO (Huffman-coded): every scan codes each 8x8 block of the full-resolution component
      with at least one bit, so ``ceil(W/8) * ceil(H/8) / 8`` bytes (a flat 8000x8000 JPEG is
      twice that). Arithmetic-coded JPEGs (rare) have no such floor: 0.
    - PNG: deflate never compresses more than 1032:1 (the floor uses 1100:1, for margin), and
      the filtered data holds at least one bit per pixel plus a filter byte per row.
    - GIF: every LZW code (>= 3 bits) gives at most 4096 pixels.
    - Others: 0 (their decoders report truncation themselves).
    """
    if image_format in ("JPEG", "MPO"):
        if _jpeg_sof_marker(data) in _JPEG_ARITHMETIC_SOF:
            return 0
        return math.ceil(width / 8) * math.ceil(height / 8) // 8
    if image_format == "PNG":
        return height * (1 + math.ceil(width / 8)) // 1100
    if image_format == "GIF":
        return width * height // 4096 * 3 // 8
    return 0


def _jpeg_sof_marker(data: bytes) -> int | None:
    """The second byte of the first start-of-frame marker (0xC0 baseline... 0xCF), or None."""
    i = 2  # after SOI
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
        elif marker in (0xD9, 0xDA):  # end of image / start of scan: no frame header before
            return None
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker
        else:
            i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


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


def decode_sample(
    sample: dict[str, Any], *, max_pixels: int = DEFAULT_MAX_PIXELS, max_prompts: int = DEFAULT_MAX_PROMPTS
) -> DecodedSample:
    """Decode one sample from :func:`~ovsam_ray.data.shards.iter_shard_samples`; never raises for
    bad data (a reader error, an undecodable image or malformed JSON become ``error``; dropped or
    clipped prompts become ``prompts.warnings``). ``max_prompts``: see :func:`parse_prompts_json`."""
    out = DecodedSample(key=sample["key"], shard=sample["shard"])
    if sample.get("error"):
        out.error = sample["error"]
        return out
    try:
        image = decode_image(sample.get("image_bytes") or b"", max_pixels=max_pixels)
        prompts = parse_prompts_json(
            sample.get("json_bytes"), width=image.shape[1], height=image.shape[0], max_prompts=max_prompts
        )
    except DecodeError as e:
        out.error = str(e)
        return out
    out.image, out.prompts = image, prompts
    return out
