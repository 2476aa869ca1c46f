"""Paths built from label data (shard names, keys, extensions) must stay inside the export folder.

Kept small and private so it can be swapped for ``io.safe_join`` once that lands."""

from __future__ import annotations

import re

from ovsam_ray import io

_DRIVE = re.compile(r"^[A-Za-z]:")


def _safe_relpath(*parts: str) -> str:
    """``parts`` joined with ``/`` after checking each piece of data: ``ValueError`` for a NUL, an
    absolute path (``/x``, ``\\x``, ``C:x``, ``s3://x``), an empty, ``.`` or ``..`` component or a
    backslash (a separator on Windows). Keys may hold ``/`` (WebDataset keys with folders)."""
    pieces = []
    for part in parts:
        text = str(part)
        if "\x00" in text or "\\" in text or text.startswith("/") or _DRIVE.match(text) or "://" in text:
            raise ValueError(f"unsafe name {text!r}: NUL, backslash or absolute path")
        for piece in text.split("/"):
            if piece in ("", ".", ".."):
                raise ValueError(f"unsafe name {text!r}: empty, '.' or '..' path component")
        pieces.append(text)
    return "/".join(pieces)


def _safe_join(root: str, *parts: str) -> str:
    """``root`` joined with the checked ``parts`` (see :func:`_safe_relpath`); never leaves ``root``."""
    return io.join(root, _safe_relpath(*parts))
