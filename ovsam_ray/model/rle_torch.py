"""COCO run lengths of binary masks, computed where the masks live (GPU or CPU).

Shipping full-size masks to the host costs N*H*W bytes per image; their run lengths are a few
hundred integers per mask. The host then compresses the run lengths into COCO's string with
pycocotools (``ovsam_ray.data.rle.compress_rles``), byte-identical to ``pycocotools.mask.encode``.
"""

from __future__ import annotations

import torch


def mask_run_lengths(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H, W) bool -> (counts (T,) int32, lengths (N,) int64), COCO's uncompressed RLE.

    Each mask is read in column-major (Fortran) order, as COCO does; its runs alternate zeros and
    ones and start with a run of zeros that may be 0 long, exactly as pycocotools' ``rleEncode``
    (an all-zero mask is ``[H*W]``, an all-one mask ``[0, H*W]``, a 0-pixel mask ``[0]``). Mask
    i's runs are ``counts[o_i : o_i + lengths[i]]`` with ``o = cumsum(lengths) - lengths``.
    One host sync (the number of runs is data dependent).
    """
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {tuple(masks.shape)}")
    n, height, width = masks.shape
    area = height * width
    dtype = torch.int32 if area < 2**31 - 1 else torch.int64
    if n == 0:
        return masks.new_zeros(0, dtype=dtype), masks.new_zeros(0, dtype=torch.int64)
    if area == 0:
        return masks.new_zeros(n, dtype=dtype), masks.new_ones(n, dtype=torch.int64)
    flat = masks.bool().transpose(1, 2).reshape(-1)  # every mask in column-major pixel order
    # A run starts where a pixel differs from the one before; a mask's first pixel counts as
    # "after a 0", so a set first pixel closes a 0-long zero run.
    starts = torch.empty_like(flat)
    torch.ne(flat[1:], flat[:-1], out=starts[1:])
    starts[::area] = flat[::area]
    where = torch.nonzero(starts).squeeze(1)
    mask_of = torch.div(where, area, rounding_mode="floor")
    pos = where - mask_of * area
    changes = torch.bincount(mask_of, minlength=n)
    # Mask i holds changes_i + 1 runs. Its k-th change (global change index c) ends the run in
    # slot c + i and starts the one in slot c + i + 1; a mask's last run ends at H*W.
    total = int(where.numel()) + n
    slot = torch.arange(where.numel(), device=masks.device) + mask_of
    run_end = torch.full((total,), area, dtype=torch.int64, device=masks.device)
    run_start = torch.zeros(total, dtype=torch.int64, device=masks.device)
    run_end[slot] = pos
    run_start[slot + 1] = pos
    return (run_end - run_start).to(dtype), changes + 1
