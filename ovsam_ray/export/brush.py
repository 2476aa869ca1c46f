"""Binary mask <-> Label Studio brush RLE (``"format": "rle"`` of ``brushlabels`` results).

Label Studio stores a brush mask as the RGBA image flattened in row-major order (H x W x 4 bytes;
the converter writes the mask value to all four channels), run-length coded into a bit stream:
a 32-bit element count, the word size minus 1 (5 bits, 8 here), four run-length field widths minus
1 (4 bits each: 3, 4, 8, 16), then per run a flag bit (1 = a run of one value, 0 = literal words),
a 2-bit index into the field widths, the run length minus 1 in that many bits, and the value(s)
in 8 bits each; the stream is zero-padded to whole bytes, which are the list of ints stored.
This is the format of Label Studio's own converter (``label_studio_converter.brush``,
``label_studio_sdk.converter.brush``): its ``decode_rle`` reads what :func:`mask_to_brush_rle` writes.
"""

from __future__ import annotations

import numpy as np

__all__ = ["brush_rle_to_mask", "mask_to_brush_rle"]

_WORD = 8
_SIZES = (3, 4, 8, 16)


def _runs(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate([[0], change])
    lengths = np.diff(np.concatenate([starts, [flat.size]]))
    return lengths, flat[starts]


def mask_to_brush_rle(mask: np.ndarray) -> list[int]:
    """(H, W) bool mask -> Label Studio brush RLE bytes (ints 0..255); mask pixels are 255 in all
    four RGBA channels, the rest 0. Lossless: see :func:`brush_rle_to_mask`."""
    flat = np.repeat(np.asarray(mask, bool).ravel().astype(np.uint8) * 255, 4)
    bits = [f"{flat.size:032b}", f"{_WORD - 1:05b}", *(f"{s - 1:04b}" for s in _SIZES)]
    if flat.size:
        for length, value in zip(*_runs(flat)):
            length = int(length)
            while length:
                n = min(length, 1 << _SIZES[-1])
                if n == 1:  # a single word: a literal run of one
                    bits.append(f"0000{0:0{_SIZES[0]}b}{int(value):08b}")
                else:
                    idx = next(i for i, s in enumerate(_SIZES) if n - 1 < (1 << s))
                    bits.append(f"1{idx:02b}{n - 1:0{_SIZES[idx]}b}{int(value):08b}")
                length -= n
    stream = "".join(bits)
    stream += "0" * (-len(stream) % 8)
    return list(int(stream, 2).to_bytes(len(stream) // 8, "big"))


def brush_rle_to_mask(rle: list[int], height: int, width: int) -> np.ndarray:
    """Label Studio brush RLE -> (H, W) bool mask (the alpha channel > 0)."""
    bits = np.unpackbits(np.asarray(rle, np.uint8))
    pos = 0

    def read(n: int) -> int:
        nonlocal pos
        value = int("".join(map(str, bits[pos : pos + n])) or "0", 2)
        pos += n
        return value

    num = read(32)
    word = read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    out = np.zeros(num, np.uint8)
    i = 0
    while i < num:
        flag = read(1)
        j = i + 1 + read(sizes[read(2)])
        if flag:
            out[i:j] = read(word)
        else:
            for k in range(i, j):
                out[k] = read(word)
        i = j
    return out.reshape(height, width, 4)[..., 3] > 0
