"""WebDataset shards: list them, name them, read their samples.

A shard is a tar (``.tar``, or gzip-compressed ``.tar.gz`` / ``.tgz``) whose members
``<key>.<ext>`` are grouped by key; :mod:`ovsam_ray.data.tar_reader` states the rules (every image
member is one row, keys unique within a shard, skipped members counted, text made UTF-8-safe).
Reading never raises for bad data: a truncated or corrupt tar yields every sample read before the
damage, the last one read as an error sample, then ONE *damage marker* (``key is None``) that
tells the caller the shard is damaged. I/O errors (network, permissions, a shard that vanished)
do propagate, so the caller's retry policy can deal with them.
"""

from __future__ import annotations

import glob as _glob
import logging
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from braceexpand import braceexpand

from ovsam_ray import storage
from ovsam_ray.data.tar_reader import (
    IMAGE_EXTENSIONS,
    MAX_MEMBER_BYTES,
    ROUTINE_SKIPS,
    TarRead,
    make_sample,
    read_tar,
    split_member_name,
)
from ovsam_ray.errors import OVSAMRayError

__all__ = [
    "IMAGE_CLASSES_FILE",
    "IMAGE_EXTENSIONS",
    "MAX_MEMBER_BYTES",
    "SHARD_SUFFIXES",
    "ShardRead",
    "ShardSpecError",
    "is_damage_marker",
    "iter_shard_samples",
    "list_shards",
    "read_shard",
    "shard_name",
    "shard_names",
    "split_member_name",
]

log = logging.getLogger(__name__)

#: File name endings of shards (case-insensitive): what a folder listing picks up, and what
#: :func:`shard_name` removes.
#: The converters' per-image class table beside the shards (DESIGN §5.2).
IMAGE_CLASSES_FILE = "_image_classes.parquet"
SHARD_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_GLOB_CHARS = re.compile(r"[*?\[]")
# in an output file name: undecodable bytes (as surrogates), backslashes, control characters
_NAME_UNSAFE_RE = re.compile("[\\\\\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


class ShardSpecError(OVSAMRayError, ValueError):
    """The shard specification matched nothing (or named shards that do not exist)."""


# --- listing -------------------------------------------------------------------------------------


def list_shards(spec: str | Iterable[str], *, s3_endpoint: str | None = None) -> list[str]:
    """Resolve a shard specification into a sorted, de-duplicated list of shard URLs.

    ``spec`` may be (or be a list of): a file; a brace range ``dir/shards-{000000..000099}.tar``;
    a glob ``dir/*.tar`` or ``s3://bucket/prefix/shard-*.tar``; a directory or ``s3://`` prefix,
    meaning every shard below it (``*.tar``, ``*.tar.gz``, ``*.tgz``, any case). Brace ranges are
    expanded first, so each piece may also be a glob. A named shard that does not exist, or a
    pattern that matches nothing, raises :class:`ShardSpecError` — a silently shorter dataset is
    worse than a failed start. URLs are returned as found: a local name that is not UTF-8 keeps
    Python's surrogate escapes (so it can be opened); use :func:`shard_name` for anything stored
    or shown, or :func:`ovsam_ray.storage.safe_text` / :func:`ovsam_ray.storage.safe_for_log` on the URL.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise ShardSpecError("no shard specification given")
    found: set[str] = set()
    missing: list[str] = []
    for piece in (p for s in specs for p in braceexpand(s)):
        urls = _resolve_piece(piece, s3_endpoint=s3_endpoint)
        if not urls:
            missing.append(piece)
        found.update(urls)
    if missing:
        shown = ", ".join(storage.redact(m) for m in missing[:5])
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ShardSpecError(
            f"no shards found for {shown}{more}; expected .tar/.tar.gz/.tgz files, a glob or a directory"
        )
    _refuse_special_files(found)
    _refuse_one_file_twice(found)
    return sorted(found)


def _refuse_special_files(urls: set[str]) -> None:
    """A local FIFO, socket or device named like a shard would block the reader or be read once
    and differ on the rerun: refused by name, never read and never silently left out."""
    special = sorted(u for u in urls if not storage.is_remote(u) and not stat.S_ISREG(os.stat(u).st_mode))
    if special:
        raise ShardSpecError(
            f"{storage.safe_for_log(special[0], limit=200)} is not a regular file (a FIFO, socket or "
            "device): a shard must be a tar file" + (f" ({len(special) - 1} more)" if len(special) > 1 else "")
        )


def _refuse_one_file_twice(urls: set[str]) -> None:
    """One local file listed under two names (a symbolic link to another shard of the listing)
    would be labelled twice: every image exactly once, so refuse, naming both."""
    by_file: dict[str, list[str]] = {}
    for url in urls:
        if not storage.is_remote(url):
            by_file.setdefault(os.path.realpath(url), []).append(url)
    twice = [sorted(names) for names in by_file.values() if len(names) > 1]
    if twice:
        shown = "; ".join(
            " and ".join(storage.safe_for_log(u, limit=120) for u in names[:3]) for names in sorted(twice)[:3]
        )
        raise ShardSpecError(
            f"the same shard file is listed under two names (a symbolic link; its images would be "
            f"labelled twice): {shown}; list each shard once"
        )


def _resolve_piece(piece: str, *, s3_endpoint: str | None) -> list[str]:
    fs, path = storage.get_filesystem(piece, s3_endpoint=s3_endpoint)
    if _GLOB_CHARS.search(path):
        if not storage.is_remote(piece):  # FIFOs and devices too: list_shards refuses them by name
            return [p for p in _glob.glob(path, recursive=True) if os.path.exists(p) and not os.path.isdir(p)]
        matches = fs.glob(path, detail=True)  # one listing, no request per match
        return [storage.to_url(fs, p) for p, info in matches.items() if info.get("type") == "file"]
    if fs.isdir(path):
        files = storage.list_files(piece, recursive=True, s3_endpoint=s3_endpoint)
        return [u for u in files if u.lower().endswith(SHARD_SUFFIXES)]
    if fs.isfile(path) or (not storage.is_remote(piece) and os.path.exists(path) and not os.path.isdir(path)):
        return [storage.to_url(fs, path)]
    return []


def shard_name(url: str) -> str:
    """The shard's output name: its basename without ``.tar`` / ``.tar.gz`` / ``.tgz``
    (``s3://b/x/shard-000003.tar`` -> ``shard-000003``); output files are named after it.

    Made safe for a file name, by a fixed rule (the same input always gives the same name):
      - an undecodable byte of the file name (a non-UTF-8 local name) becomes ``%NN`` (its hex),
        and so do a backslash (``%5C``) and control characters (``%0A``...);
      - a name that is empty (a file called ``.tar``) or starts with ``.``, ``_`` or ``@`` gets a
        leading ``@`` (``.tar`` -> ``@``, ``_a.tar`` -> ``@_a``, ``@b.tar`` -> ``@@b``): pandas,
        pyarrow and Spark skip files whose names start with ``.`` or ``_``, and the ``@`` is
        itself escaped so that two different names never meet.
    A literal ``%`` is kept as is, so the rule is not reversible; only a folder holding both
    ``a%FF.tar`` and a file whose name has the byte 0xFF at that place could collide.
    """
    name = url.rstrip("/").rsplit("/", 1)[-1]
    for suffix in SHARD_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    name = _NAME_UNSAFE_RE.sub(_percent_escape, name)
    if not name or name[0] in "._@":
        name = "@" + name
    return name


def shard_names(urls: list[str]) -> list[str]:
    """:func:`shard_name` of each URL; raises :class:`ShardSpecError` naming the colliding shards
    when two give one name (``a/s.tar`` and ``b/s.tar``): output files are named after them."""
    names = [shard_name(u) for u in urls]
    by_name: dict[str, list[str]] = {}
    for url, name in zip(urls, names):
        by_name.setdefault(name, []).append(url)
    clashes = [found for found in by_name.values() if len(found) > 1]
    if clashes:
        shown = "; ".join(
            " and ".join(storage.safe_for_log(storage.redact(u), limit=120) for u in found[:3]) for found in clashes[:3]
        )
        more = f" (and {len(clashes) - 3} more)" if len(clashes) > 3 else ""
        raise ShardSpecError(f"input shards must have distinct file names (they name the output files): {shown}{more}")
    return names


def _percent_escape(match: re.Match[str]) -> str:
    cp = ord(match.group())
    if 0xDC80 <= cp <= 0xDCFF:  # an undecodable byte, as Python's "surrogateescape" keeps it
        return f"%{cp - 0xDC00:02X}"
    return "".join(f"%{b:02X}" for b in match.group().encode("utf-8", "surrogatepass"))


# --- reading -------------------------------------------------------------------------------------


def is_damage_marker(sample: dict[str, Any]) -> bool:
    """True for the final marker :func:`iter_shard_samples` yields for a damaged shard."""
    return sample.get("key") is None


def _read(url: str, s3_endpoint: str | None) -> tuple[str, TarRead]:
    shard = shard_name(url)
    with storage.open_url(url, "rb", s3_endpoint=s3_endpoint) as f:
        read = read_tar(f, shard)
    _log_read(shard, read)
    return shard, read


def _log_read(shard: str, read: TarRead) -> None:
    if read.skipped:
        unusual = any(reason not in ROUTINE_SKIPS for reason in read.skipped)
        details = "; ".join(
            f"{n} {reason} (e.g. {', '.join(storage.safe_for_log(m, limit=80) for m in read.skipped_examples[reason])})"
            for reason, n in read.skipped.items()
        )
        log.log(
            logging.WARNING if unusual else logging.INFO,
            "shard %s: skipped %d members: %s",
            storage.safe_for_log(shard),
            sum(read.skipped.values()),
            details,
        )
    errors = [s for s in read.samples if s["error"] is not None]
    if errors:
        first = errors[0]
        log.warning(
            "shard %s: %d of %d samples are errors (first: %s: %s)",
            storage.safe_for_log(shard),
            len(errors),
            len(read.samples),
            storage.safe_for_log(first["key"], limit=80),
            storage.safe_for_log(first["error"]),
        )
    if read.damage is not None:
        log.warning("shard %s is damaged: %s", storage.safe_for_log(shard), storage.safe_for_log(read.damage))


def iter_shard_samples(url: str, *, s3_endpoint: str | None = None) -> Iterator[dict[str, Any]]:
    """Yield the samples of one WebDataset tar shard, in the order their keys first appear.

    Each sample is ``{"key", "shard", "image_bytes", "image_ext", "json_bytes", "error"}``
    (``shard`` is :func:`shard_name`; ``error`` is ``None`` for a readable sample, else a message
    and ``image_bytes`` may be ``None``). Keys are unique within the shard and, like every string
    here, encode as UTF-8. A damaged tar ends with one marker whose ``key`` is ``None`` and whose
    ``error`` describes the damage (see :func:`is_damage_marker`). The whole shard is read before
    the first sample is yielded (members of one key may lie anywhere in the tar). Skipped members
    are logged; :func:`read_shard` also returns their counts.
    """
    shard, read = _read(url, s3_endpoint)
    yield from read.samples
    if read.damage is not None:
        yield make_sample(None, shard, f"damaged shard {shard}: {read.damage}")


@dataclass
class ShardRead:
    """One shard read into memory: its samples (damage marker removed) and what happened.

    Attributes:
        url: the shard as listed.
        shard: :func:`shard_name` of ``url``.
        samples: one per image member (see :mod:`ovsam_ray.data.tar_reader`), keys unique.
        damage: the damage marker's message, or ``None`` for a sound tar.
        skipped: how many members gave no row, per reason (directories, ``.txt`` captions,
            members without an extension, a second ``.json`` of a key...); for the shard's stats.
        skipped_examples: a few member names per reason (UTF-8-safe, not log-safe: pass them
            through :func:`ovsam_ray.storage.safe_for_log` before logging).
    """

    url: str
    shard: str
    samples: list[dict[str, Any]] = field(default_factory=list)
    damage: str | None = None
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    @property
    def num_errors(self) -> int:
        return sum(1 for s in self.samples if s["error"] is not None)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())


def read_shard(url: str, *, s3_endpoint: str | None = None) -> ShardRead:
    """Read a whole shard; ``damage`` is the damage marker's message, or ``None`` for a sound tar."""
    shard, read = _read(url, s3_endpoint)
    damage = None if read.damage is None else f"damaged shard {shard}: {read.damage}"
    return ShardRead(
        url=url,
        shard=shard,
        samples=read.samples,
        damage=damage,
        skipped=read.skipped,
        skipped_examples=read.skipped_examples,
    )
