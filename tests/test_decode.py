"""Decode stage: every image mode and bad-image kind; prompt JSON policy."""

from __future__ import annotations

import io as _io
import json
import math
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from ovsam_ray.data.decode import DecodeError, Prompts, decode_image, decode_sample, parse_prompts_json, to_rgb


def _encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = _io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG signature + IHDR claiming a size, and no pixel data (a decompression-bomb probe)."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


RGB = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3) * 3


def test_rgb_roundtrip_png_is_exact():
    out = decode_image(_encode(Image.fromarray(RGB)))
    assert out.dtype == np.uint8 and out.shape == (4, 6, 3) and out.flags.writeable
    np.testing.assert_array_equal(out, RGB)


@pytest.mark.parametrize(
    "mode, fmt, expected_pixel",
    [
        ("L", "PNG", None),
        ("1", "PNG", None),
        ("LA", "PNG", None),
        ("RGBA", "PNG", None),
        ("P", "PNG", None),
        ("CMYK", "JPEG", None),
        ("YCbCr", "JPEG", None),
    ],
)
def test_every_mode_decodes_to_rgb(mode, fmt, expected_pixel):
    im = Image.fromarray(RGB).convert(mode)
    out = decode_image(_encode(im, fmt))
    assert out.shape == (4, 6, 3) and out.dtype == np.uint8


def test_alpha_is_dropped_not_composited():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[..., 3] = 0  # fully transparent
    out = decode_image(_encode(Image.fromarray(rgba, "RGBA")))
    assert (out == (200, 100, 50)).all()
    la = Image.fromarray(np.stack([np.full((2, 2), 77, np.uint8), np.zeros((2, 2), np.uint8)], -1), "LA")
    assert (decode_image(_encode(la)) == 77).all()


def test_palette_with_transparency():
    im = Image.fromarray(RGB).convert("P")
    out = decode_image(_encode(im, transparency=0))
    assert out.shape == (4, 6, 3)


def test_sixteen_bit_and_float_scaling():
    grey16 = Image.fromarray(np.array([[0, 257, 65535]], np.uint16))
    assert grey16.mode == "I;16"
    np.testing.assert_array_equal(decode_image(_encode(grey16))[0, :, 0], [0, 1, 255])
    assert to_rgb(Image.fromarray(np.array([[0, 100, 255]], np.int32)))[0, :, 1].tolist() == [0, 100, 255]
    assert to_rgb(Image.fromarray(np.array([[0, 65535]], np.int32)))[0, :, 2].tolist() == [0, 255]
    assert to_rgb(Image.fromarray(np.array([[-5, 5]], np.int32)))[0, :, 0].tolist() == [0, 255]
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0, np.nan]], np.float32))
    assert to_rgb(unit)[0, :, 0].tolist() == [0, 128, 255, 0]
    wide = Image.fromarray(np.array([[-1.0, 3.0]], np.float32))
    assert to_rgb(wide)[0, :, 0].tolist() == [0, 255]
    f_tiff = decode_image(_encode(Image.fromarray(np.full((3, 5), 0.25, np.float32)), "TIFF"))
    assert f_tiff.shape == (3, 5, 3) and (f_tiff == 64).all()


def test_exif_orientation_is_applied():
    img = np.zeros((4, 6, 3), np.uint8)
    img[0, 0] = 255  # top-left marker
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    out = decode_image(_encode(Image.fromarray(img), "PNG", exif=exif.tobytes()))
    assert out.shape == (6, 4, 3)
    assert out[0, -1].tolist() == [255, 255, 255]  # top-left went to top-right


def test_one_pixel_image():
    out = decode_image(_encode(Image.new("RGB", (1, 1), (1, 2, 3))))
    assert out.shape == (1, 1, 3) and out[0, 0].tolist() == [1, 2, 3]


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty image"),
        (b"\x00\x01garbage" * 20, "not a recognised image"),
        (_encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), "JPEG")[:900],
         "truncated"),
    ],
)
def test_bad_bytes_raise_decode_error(data, message):
    with pytest.raises(DecodeError, match=message):
        decode_image(data)


def test_pixel_limit_checked_before_decoding_without_warnings():
    with pytest.raises(DecodeError, match=r"too large: 10x10 = 100 pixels > 99"):
        decode_image(_encode(Image.new("RGB", (10, 10))), max_pixels=99)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's bomb warning must not escape (or crash under -W error)
        with pytest.raises(DecodeError, match="too large"):
            decode_image(_png_header_only(10_000, 10_000))  # 1e8 px: Pillow warns, we refuse
        with pytest.raises(DecodeError, match="too large"):
            decode_image(_png_header_only(20_000, 20_000))  # above Pillow's hard limit
    assert issubclass(DecodeError, ValueError)


# --- prompts -------------------------------------------------------------------------------------


def _json(obj) -> bytes:
    return json.dumps(obj).encode()


def test_no_json_gives_empty_prompts():
    p = parse_prompts_json(None, width=10, height=10)
    assert p.boxes.shape == (0, 4) and p.boxes.dtype == np.float32
    assert p.points.shape == (0, 2) and p.point_boxes is None
    assert (p.num_boxes, p.num_points, p.image_id, p.annotations, p.warnings) == (0, 0, None, [], [])
    assert parse_prompts_json(b"{}", width=1, height=1).boxes.shape == (0, 4)


def test_full_json():
    anns = [{"bbox": [1, 2, 3, 4], "category_id": 3, "segmentation": [[1, 2, 3, 4, 5, 6]], "iscrowd": 0}]
    p = parse_prompts_json(_json({
        "boxes": [[1, 2, 30, 40], [5, 5, 6, 6]], "scores": [0.9, None], "labels": ["dog", 7],
        "points": [[3, 4], [99, -1]], "point_boxes": [[0, 0, 10, 10], None],
        "image_id": 42, "annotations": anns,
    }), width=50, height=45)
    np.testing.assert_array_equal(p.boxes, [[1, 2, 30, 40], [5, 5, 6, 6]])
    assert p.box_scores[0] == pytest.approx(0.9) and math.isnan(p.box_scores[1])
    assert p.box_labels == ["dog", "7"] and p.box_indices.tolist() == [0, 1]
    np.testing.assert_array_equal(p.points, [[3, 4], [49, 0]])  # clipped to the pixel grid
    assert p.point_boxes.shape == (2, 4) and np.isnan(p.point_boxes[1]).all()
    assert p.image_id == "42" and p.annotations == anns and p.warnings == []


def test_box_policy_reorder_clip_keep_zero_area_drop_invalid():
    p = parse_prompts_json(
        b'{"boxes": [[50, 40, 10, 5], [-10, -10, 100, 100], [20, 20, 20, 30], [NaN, 1, 2, 3],'
        b' [70, 50, 80, 60], [1, 2, 3], [1, 2, 3, Infinity], [null, 1, 2, 3], ["1", 2, 3, 4], [true, 1, 2, 3]],'
        b' "labels": ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]}',
        width=64, height=48,
    )
    np.testing.assert_array_equal(p.boxes, [[10, 5, 50, 40], [0, 0, 64, 48], [20, 20, 20, 30], [64, 48, 64, 48]])
    assert p.box_labels == ["a", "b", "c", "e"] and p.box_indices.tolist() == [0, 1, 2, 4]
    assert len(p.warnings) == 6
    assert p.warnings[0].startswith("box 3 dropped") and "NaN" in p.warnings[0]


def test_invalid_points_dropped_with_their_boxes():
    p = parse_prompts_json(_json({"points": [[1, 1], [float("nan"), 2], [2, 2, 2]],
                                  "point_boxes": [[0, 0, 5, 5], [0, 0, 1, 1], "x"]}), width=8, height=8)
    assert p.points.tolist() == [[1, 1]] and p.point_indices.tolist() == [0]
    assert p.point_boxes.tolist() == [[0, 0, 5, 5]]
    assert [w.split(":")[0] for w in p.warnings] == ["point 1 dropped", "point 2 dropped"]


@pytest.mark.parametrize(
    "data, message",
    [
        (b'{"boxes": [[1, 2, 3', "malformed prompt JSON"),
        (b"", "malformed prompt JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[1, 2]", "must be an object"),
        (b'{"boxes": {"a": 1}}', "'boxes' must be a list"),
        (b'{"boxes": [[0, 0, 1, 1]], "scores": [0.5, 0.6]}', "'scores' has 2 entries for 1 prompts"),
        (b'{"points": [[0, 0]], "point_boxes": []}', "'point_boxes' has 0 entries"),
        (b'{"annotations": [1, 2]}', "annotations"),
        (b"[" * 100_000 + b"]" * 100_000, "malformed prompt JSON"),
    ],
)
def test_malformed_json_raises(data, message):
    with pytest.raises(DecodeError, match=message):
        parse_prompts_json(data, width=10, height=10)


def test_decode_sample_never_raises():
    png = _encode(Image.new("RGB", (5, 4)))
    base = {"key": "k", "shard": "s", "image_ext": "png", "error": None}
    ok = decode_sample({**base, "image_bytes": png, "json_bytes": b'{"image_id": "x"}'})
    assert ok.ok and (ok.width, ok.height) == (5, 4) and isinstance(ok.prompts, Prompts)
    assert ok.prompts.image_id == "x"
    assert decode_sample({**base, "image_bytes": png, "json_bytes": b"{"}).error.startswith("malformed")
    assert "empty image" in decode_sample({**base, "image_bytes": None, "json_bytes": None}).error
    reader_error = decode_sample({**base, "image_bytes": None, "json_bytes": None, "error": "no image member"})
    assert reader_error.error == "no image member" and reader_error.width is None
    assert "too large" in decode_sample({**base, "image_bytes": png, "json_bytes": None}, max_pixels=10).error
