"""Bad-input shards for the tests: one small shard per bad-input kind of DESIGN §7, with what
decoding it and labelling it must give (error rows, never a crash)."""

from __future__ import annotations

import io as _io
import json
import math
import tarfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from ovsam_ray import storage
from ovsam_ray.data.synthetic import encode_image, tar_bytes

#: The decode pixel limit :func:`make_bad_input_shards`' expectations assume.
BAD_INPUT_MAX_PIXELS = 50_000


@dataclass
class BadShard:
    """A shard with one kind of bad input and what decoding it must give.

    ``expected_statuses`` are the row statuses, in order, with ``max_pixels=BAD_INPUT_MAX_PIXELS``;
    ``damaged`` says whether the reader reports the tar itself as damaged; ``expected`` holds
    kind-specific facts (decoded shapes, number of boxes kept, warnings...).
    """

    kind: str
    url: str
    expected_statuses: list[str]
    damaged: bool = False
    expected: dict[str, Any] = field(default_factory=dict)

    @property
    def expected_rows(self) -> int:
        return len(self.expected_statuses)


def _mode_images(rng: np.random.Generator) -> list[tuple[str, bytes]]:
    rgb = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    grey16 = Image.fromarray(rng.integers(0, 65536, (48, 64), dtype=np.uint16))
    p_trans = rgb.convert("P")
    p_trans.info["transparency"] = 0
    return [
        ("mode_l.png", encode_image(rgb.convert("L"), "png")),
        ("mode_la.png", encode_image(rgb.convert("LA"), "png")),
        ("mode_rgba.png", encode_image(rgb.convert("RGBA"), "png")),
        ("mode_p.png", encode_image(rgb.convert("P"), "png")),
        ("mode_pt.png", encode_image(p_trans, "png", transparency=0)),
        ("mode_cmyk.jpg", encode_image(rgb.convert("CMYK"), "jpg")),
        ("mode_i16.png", encode_image(grey16, "png")),
        ("mode_i.tif", encode_image(grey16.convert("I"), "tif")),
        ("mode_f.tif", encode_image(Image.fromarray(rng.random((48, 64), dtype=np.float32)), "tif")),
        ("mode_1.png", encode_image(rgb.convert("1"), "png")),
    ]


def _bad_shard_members(rng: np.random.Generator) -> dict[str, tuple[list[tuple[str, bytes]], list[str], dict]]:
    noisy = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    jpeg = encode_image(noisy, "jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    boxes = [[50, 40, 10, 5], [-10, -10, 100, 100], [20, 20, 20, 30], [math.nan, 1, 2, 3], [70, 50, 80, 60]]
    modes = _mode_images(rng)
    return {
        "zero_byte_image": ([("a.jpg", b"")], ["error"], {}),
        "undecodable_image": ([("a.jpg", rng.bytes(300))], ["error"], {}),
        "truncated_jpeg": ([("a.jpg", jpeg[: len(jpeg) // 2])], ["error"], {}),
        "odd_modes": (modes, ["ok"] * len(modes), {"shape": (48, 64, 3)}),
        "exif_rotated": ([("a.jpg", encode_image(noisy, "jpg", exif=exif.tobytes()))], ["ok"], {"shape": (64, 48, 3)}),
        "one_pixel": ([("a.png", encode_image(noisy[:1, :1], "png"))], ["ok"], {"shape": (1, 1, 3)}),
        "too_large": ([("a.png", encode_image(np.zeros((200, 300, 3), np.uint8), "png"))], ["error"], {}),
        "malformed_json": ([("a.jpg", jpeg), ("a.json", b'{"boxes": [[1, 2, 3')], ["error"], {}),
        "bad_boxes": (
            [("a.jpg", jpeg), ("a.json", json.dumps({"boxes": boxes}).encode())],
            ["ok"],
            {
                "num_boxes": 4,
                "num_warnings": 3,  # NaN box dropped, one re-ordered, two clipped
                "boxes": [[10, 5, 50, 40], [0, 0, 64, 48], [20, 20, 20, 30], [64, 48, 64, 48]],
            },
        ),
        "missing_image": ([("a.jpg", jpeg), ("b.json", b"{}")], ["ok", "error"], {}),
    }


def make_bad_input_shards(output_dir_or_url: str, *, s3_endpoint: str | None = None) -> dict[str, BadShard]:
    """Write one small shard per bad-input kind (``<kind>.tar``) and return them by kind.

    Kinds: zero_byte_image, undecodable_image, truncated_jpeg, odd_modes (L, LA, RGBA, P, P with
    transparency, CMYK, I;16, I, F, 1), exif_rotated, one_pixel, too_large (over
    :data:`BAD_INPUT_MAX_PIXELS`), malformed_json, bad_boxes (inverted, outside, zero-area, NaN,
    fully outside), missing_image (a JSON without image), truncated_tar (cut inside the third
    image) and empty_tar (zero bytes).
    """
    rng = np.random.default_rng(1234)
    out: dict[str, BadShard] = {}
    for kind, (members, statuses, expected) in _bad_shard_members(rng).items():
        out[kind] = _write_bad(output_dir_or_url, kind, tar_bytes(members), statuses, expected, s3_endpoint)
    good = encode_image(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), "jpg")
    full = tar_bytes([(f"{k}.{ext}", data) for k in ("a", "b", "c") for ext, data in (("jpg", good), ("json", b"{}"))])
    with tarfile.open(fileobj=_io.BytesIO(full)) as tf:
        third = tf.getmember("c.jpg")
    cut = full[: third.offset_data + third.size // 2]
    out["truncated_tar"] = _write_bad(
        output_dir_or_url, "truncated_tar", cut, ["ok", "ok", "error"], {}, s3_endpoint, damaged=True
    )
    out["empty_tar"] = _write_bad(output_dir_or_url, "empty_tar", b"", [], {}, s3_endpoint, damaged=True)
    return out


def _write_bad(
    root: str,
    kind: str,
    data: bytes,
    statuses: list[str],
    expected: dict,
    s3_endpoint: str | None,
    damaged: bool = False,
) -> BadShard:
    url = storage.join(root, f"{kind}.tar")
    storage.atomic_write_bytes(url, data, s3_endpoint=s3_endpoint)
    return BadShard(kind=kind, url=url, expected_statuses=statuses, damaged=damaged, expected=expected)
