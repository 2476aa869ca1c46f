"""WebDataset shards: list them, name them, read their samples.

A shard is a plain tar whose members ``<key>.<ext>`` are grouped by key (WebDataset convention:
the key is the member path up to the first dot of its basename, members of one sample are
adjacent). Reading never raises for bad data: a sample without an image is an *error sample*,
and a truncated or corrupt tar yields every sample read before the damage, then the sample being
read when it happened (as an error sample, because its image did exist), then ONE *damage marker*
(``key is None``) that tells the caller the shard is damaged. I/O errors (network, permissions,
a shard that vanished) do propagate, so the caller's retry policy can deal with them.
"""

from __future__ import annotations

import glob as _glob
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from braceexpand import braceexpand

from ovsam_ray import io

__all__ = [
    "IMAGE_EXTENSIONS",
    "ShardRead",
    "ShardSpecError",
    "is_damage_marker",
    "iter_shard_samples",
    "list_shards",
    "read_shard",
    "shard_name",
    "split_member_name",
]

#: Member extensions read as the sample's image, in order of preference.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp", "gif", "ppm")
#: Members larger than this are not read into memory; their sample becomes an error sample.
MAX_MEMBER_BYTES = 256 * 1024 * 1024
_GLOB_CHARS = re.compile(r"[*?\[]")


class ShardSpecError(ValueError):
    """The shard specification matched nothing (or named shards that do not exist)."""


# --- listing -------------------------------------------------------------------------------------


def list_shards(spec: str | Iterable[str], *, s3_endpoint: str | None = None) -> list[str]:
    """Resolve a shard specification into a sorted, de-duplicated list of shard URLs.

    ``spec`` may be (or be a list of): a file; a brace range ``dir/shards-{000000..000099}.tar``;
    a glob ``dir/*.tar`` or ``s3://bucket/prefix/shard-*.tar``; a directory or ``s3://`` prefix,
    meaning every ``*.tar`` below it. Brace ranges are expanded first, so each piece may also be a
    glob. A named shard that does not exist, or a pattern that matches nothing, raises
    :class:`ShardSpecError` — a silently shorter dataset is worse than a failed start.
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
        shown = ", ".join(io.redact(m) for m in missing[:5])
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ShardSpecError(f"no shards found for {shown}{more}; expected .tar files, a glob or a directory")
    return sorted(found)


def _resolve_piece(piece: str, *, s3_endpoint: str | None) -> list[str]:
    fs, path = io.get_filesystem(piece, s3_endpoint=s3_endpoint)
    if _GLOB_CHARS.search(path):
        if not io.is_remote(piece):
            return [p for p in _glob.glob(path, recursive=True) if os.path.isfile(p)]
        matches = fs.glob(path, detail=True)  # one listing, no request per match
        return [io.to_url(fs, p) for p, info in matches.items() if info.get("type") == "file"]
    if fs.isdir(path):
        return io.list_files(piece, suffix=".tar", recursive=True, s3_endpoint=s3_endpoint)
    if fs.isfile(path):
        return [io.to_url(fs, path)]
    return []


def shard_name(url: str) -> str:
    """The shard's basename without ``.tar`` (``s3://b/x/shard-000003.tar`` -> ``shard-000003``);
    output files are named after it."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


# --- reading -------------------------------------------------------------------------------------


def split_member_name(name: str) -> tuple[str, str] | None:
    """``"a/b.c.jpg" -> ("a/b", "c.jpg")`` (key up to the first dot of the basename, lower-cased
    extension); ``None`` for names without an extension."""
    name = name[2:] if name.startswith("./") else name
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem or not ext:
        return None
    return (f"{head}/{stem}" if head else stem), ext.lower()


def _sample(key: str | None, shard: str, error: str | None = None, **fields: Any) -> dict[str, Any]:
    return {
        "key": key,
        "shard": shard,
        "image_bytes": fields.get("image_bytes"),
        "image_ext": fields.get("image_ext"),
        "json_bytes": fields.get("json_bytes"),
        "error": error,
    }


def is_damage_marker(sample: dict[str, Any]) -> bool:
    """True for the final marker :func:`iter_shard_samples` yields for a damaged shard."""
    return sample.get("key") is None


class _Group:
    """The members of one key collected so far."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.files: dict[str, bytes] = {}
        self.errors: list[str] = []

    def to_sample(self, shard: str, extra_error: str | None = None) -> dict[str, Any]:
        image_ext = next((e for e in _image_exts(self.files)), None)
        errors = list(self.errors)
        if extra_error:
            errors.append(extra_error)
        if image_ext is None and not errors:
            found = ", ".join(sorted(self.files)) or "nothing"
            errors.append(f"no image member (expected one of {'/'.join(IMAGE_EXTENSIONS[:4])}; found {found})")
        return _sample(
            self.key,
            shard,
            "; ".join(errors) or None,
            image_bytes=self.files.get(image_ext) if image_ext else None,
            image_ext=image_ext,
            json_bytes=self.files.get("json"),
        )


def _image_exts(files: dict[str, bytes]) -> Iterator[str]:
    # only a plain "<key>.jpg"-style member is the image; "<key>.seg.png" is another field
    return (ext for ext in IMAGE_EXTENSIONS if ext in files)


def iter_shard_samples(url: str, *, s3_endpoint: str | None = None) -> Iterator[dict[str, Any]]:
    """Yield the samples of one WebDataset tar shard, in order.

    Each sample is ``{"key", "shard", "image_bytes", "image_ext", "json_bytes", "error"}``
    (``shard`` is :func:`shard_name`; ``error`` is ``None`` for a readable sample, else a message
    and ``image_bytes`` may be ``None``). A damaged tar ends with one marker whose ``key`` is
    ``None`` and whose ``error`` describes the damage (see :func:`is_damage_marker`).
    """
    shard = shard_name(url)
    group: _Group | None = None
    with io.open_url(url, "rb", s3_endpoint=s3_endpoint) as f:
        try:
            tf = tarfile.open(fileobj=f, mode="r:")
        except tarfile.TarError as e:
            yield _sample(None, shard, f"damaged shard {shard}: not a readable tar ({e})")
            return
        try:
            for member in tf:
                parts = split_member_name(member.name)
                if not member.isfile() or parts is None or _is_meta(member.name):
                    continue
                key, ext = parts
                if group is not None and key != group.key:
                    yield group.to_sample(shard)
                    group = None
                if group is None:
                    group = _Group(key)
                _read_member(tf, member, ext, group)
            damage = _check_end_of_archive(f, tf.offset)
        except (tarfile.TarError, EOFError) as e:
            damage = f"tar truncated or corrupt ({e})"
        finally:
            tf.close()
    if damage is not None and group is not None:
        yield group.to_sample(shard, f"shard damaged while reading this sample: {damage}")
    elif group is not None:
        yield group.to_sample(shard)
    if damage is not None:
        yield _sample(None, shard, f"damaged shard {shard}: {damage}")


def _is_meta(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base.startswith("__") and base.split(".", 1)[0].endswith("__")


def _read_member(tf: tarfile.TarFile, member: tarfile.TarInfo, ext: str, group: _Group) -> None:
    if member.size > MAX_MEMBER_BYTES:
        group.errors.append(f"member {member.name} is {member.size} bytes (limit {MAX_MEMBER_BYTES})")
        return
    if ext in group.files:
        group.errors.append(f"duplicate member {member.name}")
        return
    fileobj = tf.extractfile(member)
    group.files[ext] = fileobj.read() if fileobj is not None else b""


def _check_end_of_archive(f: Any, offset: int) -> str | None:
    """tarfile stops silently at a truncated or garbage header; a complete tar continues with a
    zero block right after the last member, so look for it."""
    f.seek(offset)
    block = f.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE:
        return f"tar truncated after byte {offset} (no end-of-archive block)"
    if block.count(0) != tarfile.BLOCKSIZE:
        return f"corrupt tar header at byte {offset}"
    return None


@dataclass
class ShardRead:
    """One shard read into memory: its image samples (damage marker removed) and what happened."""

    url: str
    shard: str
    samples: list[dict[str, Any]] = field(default_factory=list)
    damage: str | None = None

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    @property
    def num_errors(self) -> int:
        return sum(1 for s in self.samples if s["error"] is not None)


def read_shard(url: str, *, s3_endpoint: str | None = None) -> ShardRead:
    """Read a whole shard; ``damage`` is the damage marker's message, or ``None`` for a sound tar."""
    out = ShardRead(url=url, shard=shard_name(url))
    for sample in iter_shard_samples(url, s3_endpoint=s3_endpoint):
        if is_damage_marker(sample):
            out.damage = sample["error"]
        else:
            out.samples.append(sample)
    return out
