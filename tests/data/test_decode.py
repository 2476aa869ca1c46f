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
from PIL import Image, ImageFile

from ovsam_ray.data.decode import (
    DEFAULT_MAX_PROMPTS,
    DecodeError,
    Prompts,
    decode_image,
    decode_sample,
    min_encoded_bytes,
    parse_prompts_json,
    to_rgb,
)


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
        (
            _encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), "JPEG")[:900],
            "truncated",
        ),
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
    p = parse_prompts_json(
        _json(
            {
                "boxes": [[1, 2, 30, 40], [5, 5, 6, 6]],
                "scores": [0.9, None],
                "labels": ["dog", 7],
                "points": [[3, 4], [99, -1]],
                "point_boxes": [[0, 0, 10, 10], None],
                "image_id": 42,
                "annotations": anns,
            }
        ),
        width=50,
        height=45,
    )
    np.testing.assert_array_equal(p.boxes, [[1, 2, 30, 40], [5, 5, 6, 6]])
    assert p.box_scores[0] == pytest.approx(0.9) and math.isnan(p.box_scores[1])
    assert p.box_labels == ["dog", "7"] and p.box_indices.tolist() == [0, 1]
    np.testing.assert_array_equal(p.points, [[3, 4], [49, 0]])  # clipped to the pixel grid
    assert p.point_boxes.shape == (2, 4) and np.isnan(p.point_boxes[1]).all()
    assert p.image_id == "42" and p.annotations == anns
    assert p.warnings == ["points 1 clipped to the pixel grid of the 50x45 image"]


def test_box_policy_reorder_clip_keep_zero_area_drop_invalid():
    p = parse_prompts_json(
        b'{"boxes": [[50, 40, 10, 5], [-10, -10, 100, 100], [20, 20, 20, 30], [NaN, 1, 2, 3],'
        b' [70, 50, 80, 60], [1, 2, 3], [1, 2, 3, Infinity], [null, 1, 2, 3], ["1", 2, 3, 4], [true, 1, 2, 3]],'
        b' "labels": ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]}',
        width=64,
        height=48,
    )
    np.testing.assert_array_equal(p.boxes, [[10, 5, 50, 40], [0, 0, 64, 48], [20, 20, 20, 30], [64, 48, 64, 48]])
    assert p.box_labels == ["a", "b", "c", "e"] and p.box_indices.tolist() == [0, 1, 2, 4]
    assert len(p.warnings) == 8
    assert p.warnings[0].startswith("box 3 dropped") and "NaN" in p.warnings[0]
    assert p.warnings[-2:] == ["boxes 0 re-ordered (x0 > x1 or y0 > y1)", "boxes 1, 4 clipped to the 64x48 image"]


def test_invalid_points_dropped_with_their_boxes():
    p = parse_prompts_json(
        _json({"points": [[1, 1], [float("nan"), 2], [2, 2, 2]], "point_boxes": [[0, 0, 5, 5], [0, 0, 1, 1], "x"]}),
        width=8,
        height=8,
    )
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


# --- hostile inputs: truncated data, text that is not UTF-8, numbers too large, too many prompts ---


def _noise_jpeg(width: int, height: int, mode: str = "RGB") -> bytes:
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    return _encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, shape, np.uint8), mode), "JPEG")


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_truncated_jpeg_with_an_end_marker_is_an_error(mode):
    # a few hundred bytes + EOI: libjpeg fills the claimed 2000x1500 with grey and Pillow calls it fine
    data = _noise_jpeg(2000, 1500, mode)
    cut = data[: data.find(b"\xff\xda") + 300] + b"\xff\xd9"
    with pytest.raises(DecodeError, match=r"truncated image data: \d+ bytes cannot hold a 2000x1500 JPEG"):
        decode_image(cut)
    assert decode_sample({"key": "k", "shard": "s", "image_bytes": cut, "json_bytes": None}).error.startswith(
        "truncated image data"
    )


def test_truncated_images_stay_errors_when_pillow_is_told_to_load_them(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some libraries do globally
    data = _noise_jpeg(64, 64)
    with pytest.raises(DecodeError, match="truncated"):
        decode_image(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize(
    "im, fmt, kw",
    [
        (Image.new("RGB", (2000, 2000)), "JPEG", {}),
        (Image.new("L", (2000, 2000)), "JPEG", {"progressive": True, "optimize": True}),
        (Image.new("RGB", (2000, 2000), (9, 9, 9)), "JPEG", {"subsampling": 2, "quality": 1, "optimize": True}),
        (Image.new("1", (4000, 4000)), "PNG", {"optimize": True}),
        (Image.new("P", (3000, 3000)), "GIF", {}),
    ],
)
def test_flat_images_are_above_the_truncation_floor(im, fmt, kw):
    data = _encode(im, fmt, **kw)
    assert len(data) >= min_encoded_bytes(Image.open(_io.BytesIO(data)).format, *im.size, data)
    assert decode_image(data).shape == (im.size[1], im.size[0], 3)


def test_truncation_floor_golden_values():
    assert min_encoded_bytes("JPEG", 8000, 8000) == 125_000
    assert min_encoded_bytes("JPEG", 1, 1) == 0
    assert min_encoded_bytes("PNG", 8000, 8000) == 7_280
    assert min_encoded_bytes("WEBP", 8000, 8000) == 0
    arithmetic = b"\xff\xd8\xff\xc9\x00\x0b\x08\x1f\x40\x1f\x40\x01\x01\x11\x00"
    assert min_encoded_bytes("JPEG", 8000, 8000, arithmetic) == 0


def test_lone_surrogates_in_json_strings_are_escaped():
    data = (
        b'{"image_id": "id\\ud800", "boxes": [[0, 0, 1, 1]], "labels": ["dog\\udfff"],'
        b' "annotations": [{"category_name": "\\udcff", "\\ud800key": 1}]}'
    )
    p = parse_prompts_json(data, width=4, height=4)
    assert p.image_id == "id\\ud800" and p.box_labels == ["dog\\udfff"]
    assert p.annotations == [{"category_name": "\\xff", "\\ud800key": 1}]
    for text in (p.image_id, *p.box_labels, *p.annotations[0], p.annotations[0]["category_name"]):
        text.encode("utf-8")
    assert p.warnings == []


def test_json_bytes_not_utf8_keep_the_image():
    p = parse_prompts_json(b'{"image_id": "caf\xe9", "boxes": [[0, 0, 1, 1]], "labels": ["\xff"]}', width=4, height=4)
    assert p.image_id == "caf\\xe9" and p.box_labels == ["\\xff"] and p.num_boxes == 1
    assert len(p.warnings) == 1 and "not UTF-8 (first bad byte at 17)" in p.warnings[0]


def test_numbers_too_large_drop_only_their_prompt():
    huge = "9" * 5000  # beyond Python's int/str digit limit
    data = (
        f'{{"boxes": [[0, 0, 1e400, 1], [0, 0, 1e39, 1], [0, 0, {10**400}, 1], [0, 0, {huge}, 1], [1, 1, 2, 2]],'
        f' "scores": [0.1, 0.2, 0.3, 0.4, 1e39], "labels": ["a", "b", "c", "d", {huge}],'
        f' "points": [[1e39, 1], [1, {10**400}], [1, 1]], "image_id": {10**400}}}'
    ).encode()
    p = parse_prompts_json(data, width=4, height=4)
    assert p.boxes.tolist() == [[1, 1, 2, 2]] and p.box_indices.tolist() == [4]
    assert math.isnan(p.box_scores[0]) and p.box_labels == ["inf"]
    assert p.points.tolist() == [[1, 1]] and p.point_indices.tolist() == [2]
    assert [w.split(":")[0] for w in p.warnings] == [
        "box 0 dropped",
        "box 1 dropped",
        "box 2 dropped",
        "box 3 dropped",
        "score 4 ignored",
        "point 0 dropped",
        "point 1 dropped",
    ]
    assert p.image_id == str(10**400)
    png = _encode(Image.new("RGB", (4, 4)))
    assert decode_sample({"key": "k", "shard": "s", "image_bytes": png, "json_bytes": data}).ok


def test_max_prompts_keeps_the_first_ones():
    data = _json({"boxes": [[0, 0, 1, 1]] * 5, "points": [[1, 1]] * 3, "point_boxes": [None] * 3})
    p = parse_prompts_json(data, width=4, height=4, max_prompts=6)
    assert (p.num_boxes, p.num_points, p.point_boxes.shape) == (5, 1, (1, 4))
    assert p.warnings == ["2 points dropped from index 1 on: more than max_prompts=6 prompts"]
    p = parse_prompts_json(data, width=4, height=4, max_prompts=3)
    assert (p.num_boxes, p.num_points) == (3, 0) and len(p.warnings) == 2
    assert DEFAULT_MAX_PROMPTS == 1000
    many = _json({"boxes": [[0, 0, 1, 1]] * 1001})
    assert parse_prompts_json(many, width=4, height=4).num_boxes == 1000
    png = _encode(Image.new("RGB", (4, 4)))
    decoded = decode_sample({"key": "k", "shard": "s", "image_bytes": png, "json_bytes": many}, max_prompts=10)
    assert decoded.prompts.num_boxes == 10 and "max_prompts=10" in decoded.prompts.warnings[0]
