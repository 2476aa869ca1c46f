"""Where a command reads and writes, compared as locations, never as strings.

Every command that writes checks its outputs against its inputs here before it touches storage:
``relabel --input X --output ./X`` must not pass because ``"./X" != "X"``. A location is the real
path of a local file or folder (``~``, ``.``, ``..``, repeated and trailing slashes resolved,
symlinks followed, even for a path that does not exist yet) or, on an object store, the bucket
and the key with empty and ``.`` segments dropped (``s3://b//x/./`` is ``s3://b/x``).
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterable
from typing import NamedTuple

from ovsam_ray import storage
from ovsam_ray.errors import OVSAMRayError

__all__ = ["Location", "OverlappingLocationsError", "canonical_location", "check_disjoint", "pattern_root"]

_SCHEME_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_PATTERN_CHARS = "*?[{"


class OverlappingLocationsError(OVSAMRayError, ValueError):
    """An output is an input, holds an input, or lies inside one."""


class Location(NamedTuple):
    """One place in storage: ``scheme`` (``file``, ``s3``...), ``root`` (the bucket; ``""`` for
    local paths) and ``parts`` (the path's components below it)."""

    scheme: str
    root: str
    parts: tuple[str, ...]

    def contains(self, other: Location) -> bool:
        """True when ``other`` is this location or lies below it."""
        return (self.scheme, self.root) == (other.scheme, other.root) and other.parts[: len(self.parts)] == self.parts


def canonical_location(url: str) -> Location:
    """``url`` (a local path, ``file://``, ``s3://``/``s3a://`` or another fsspec URL) as a
    :class:`Location`; two spellings of one place give equal locations."""
    match = _SCHEME_RE.match(url)
    scheme = match.group(1).lower() if match else "file"
    if scheme in ("file", "local"):
        path = url[match.end() :] if match else url
        real = os.path.realpath(os.path.expanduser(path or "."))
        return Location("file", "", tuple(p for p in real.split(os.sep) if p))
    scheme = "s3" if scheme == "s3a" else scheme
    rest = url[match.end() :] if match else url
    root, _, key = rest.partition("/")
    # Object keys are literal text, but the tools that write them drop empty and "." segments;
    # ".." is resolved too, which can only make two keys compare equal (a refusal), never apart.
    key = posixpath.normpath("/" + key).lstrip("/")
    return Location(scheme, root, tuple(p for p in key.split("/") if p))


def pattern_root(spec: str) -> str:
    """The folder an input specification reads below: the spec itself without pattern characters,
    else the folder before the first ``*``, ``?``, ``[`` or ``{`` (``d/**/*.tar`` -> ``d``,
    ``d/s-{0..9}.tar`` -> ``d``)."""
    cuts = [spec.index(c) for c in _PATTERN_CHARS if c in spec]
    if not cuts:
        return spec
    static = spec[: min(cuts)]
    if "/" not in static:
        return "."
    return static.rsplit("/", 1)[0] or "/"


def _input_roots(spec: str) -> list[str]:
    """The folders (or files) an input specification reads: a brace range over folders
    (``d/{a,b}/s.tar``) is expanded, one within a file name (``s-{000..999}.tar``) is not."""
    brace = spec.find("{")
    if brace >= 0 and "/" in spec[brace:] and not any(c in spec[:brace] for c in "*?["):
        from braceexpand import braceexpand

        return sorted({pattern_root(piece) for piece in braceexpand(spec)})
    return [pattern_root(spec)]


def check_disjoint(inputs: Iterable[tuple[str, str | None]], outputs: Iterable[tuple[str, str | None]]) -> None:
    """Raise :class:`OverlappingLocationsError` (one line naming both) when an output equals,
    contains or lies inside an input. ``inputs``/``outputs``: ``(flag, url)`` pairs (``("--input",
    "data/*.tar")``); a ``None`` url is skipped; an input pattern stands for the folders it reads
    below (:func:`pattern_root`)."""
    ins = [(flag, url, canonical_location(root)) for flag, url in inputs if url for root in _input_roots(url)]
    for out_flag, out_url in outputs:
        if not out_url:
            continue
        out = canonical_location(out_url)
        for in_flag, in_url, inp in ins:
            if out == inp:
                how = "is the same location as"
            elif inp.contains(out):
                how = "lies inside"
            elif out.contains(inp):
                how = "contains"
            else:
                continue
            raise OverlappingLocationsError(
                f"{out_flag} {storage.redact(out_url)} {how} {in_flag} {storage.redact(in_url)}: "
                "a command never writes where it reads; choose an output location outside the input"
            )
