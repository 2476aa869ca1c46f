"""One WebDataset tar (plain or gzip-compressed) -> its samples, one per image member.

The rules, for every shard whatever its author did:

- **Names.** Member names are decoded as UTF-8; undecodable bytes become ``\\xNN`` (see
  :func:`ovsam_ray.storage.safe_text`), so keys and messages always encode as UTF-8. A leading ``./``
  is dropped. The key is the path up to the first dot of the basename *after its leading dots*,
  the extension is the rest, lower-cased (``a/b.c.jpg`` -> ``a/b`` + ``c.jpg``; the hidden
  ``a/.b.jpg`` -> ``a/.b`` + ``jpg``). The sample's image is the member whose extension is one of
  :data:`IMAGE_EXTENSIONS` (``<key>.seg.png`` is another field, not the image); its prompts are
  ``<key>.json``.
- **Grouping.** Members are grouped by key over the whole tar, not only when adjacent, so a JSON
  written far from its image still joins it, and a shard never yields two samples with one key.
  Samples come in the order their keys first appear. The whole shard's image and JSON bytes are
  held until the end of the tar (a shard is one unit of work anyway).
- **One row per image member.** The first image member of a key is the sample's image. Every
  further image member of that key (``a.png`` after ``a.jpg``, or a second ``a.jpg``) becomes its
  own *error* sample, keyed by its member name (``a.png``; ``a.png#2``, ``#3``... if that name
  repeats) — a key a normal member can never produce, as its basename has a dot after the stem —
  with an error naming both members. A JSON without an image is an error sample too (``no image
  member``), except WebDataset metadata (``__meta__.json``: a key whose basename is ``__*__``).
- **Links.** Hard links and symbolic links are followed *inside the tar only* (nothing is ever
  read from disk): a link whose target is not a file of the same tar (absolute, ``..``, missing,
  a chain of more than :data:`MAX_LINK_HOPS`) makes the sample an error naming the link.
- **Skipped.** Everything else (directories, devices and FIFOs, members without a key or an
  extension, other extensions such as ``.txt`` or ``.seg.png``, metadata, macOS AppleDouble files
  ``._name.jpg`` — recognised by their content, not only their name —, a second ``<key>.json``:
  the first one is used) is counted per reason in :attr:`TarRead.skipped`, never silently lost.
- **Damage.** A truncated or corrupt tar keeps every sample read before the damage; the sample
  whose member was read last is made an error (it may have lost a member), and
  :attr:`TarRead.damage` says what happened, naming the member and the byte offset. A header
  tarfile rejects mid-stream (a PAX ``size`` far past the end of the file, a PAX record with a
  bad length) is damage too, never an exception. I/O errors of the file object propagate.
"""

from __future__ import annotations

import gzip
import posixpath
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import IO, Any

from ovsam_ray.storage import safe_text

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_LINK_HOPS",
    "MAX_MEMBER_BYTES",
    "TarRead",
    "make_sample",
    "read_tar",
    "split_member_name",
]

#: Member extensions read as the sample's image.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp", "gif", "ppm")
#: Members larger than this are not read into memory; their sample becomes an error sample.
MAX_MEMBER_BYTES = 256 * 1024 * 1024
#: Longest chain of links followed to reach a file.
MAX_LINK_HOPS = 8
#: How many member names :attr:`TarRead.skipped_examples` keeps per reason.
MAX_EXAMPLES = 3

# Reasons a member is skipped (the keys of TarRead.skipped).
SKIP_DIRECTORY = "directory"
SKIP_SPECIAL = "not a file or link (device, FIFO...)"
SKIP_NO_EXTENSION = "no key or no extension"
SKIP_OTHER_EXTENSION = "neither an image nor .json"
SKIP_METADATA = "WebDataset metadata (__*__ without an image)"
SKIP_DUPLICATE_JSON = "second .json of a key (the first is used)"
SKIP_APPLEDOUBLE = "macOS AppleDouble file (._name)"
#: Reasons that are normal in a well-formed shard (not worth a warning).
ROUTINE_SKIPS = frozenset({SKIP_DIRECTORY, SKIP_OTHER_EXTENSION, SKIP_METADATA, SKIP_APPLEDOUBLE})

_GZIP_MAGIC = b"\x1f\x8b"
_APPLEDOUBLE_MAGIC = b"\x00\x05\x16\x07"
# zlib.error / BadGzipFile: a corrupt .tar.gz; EOFError: one cut short
_DAMAGE_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)
# What tarfile raises on a header it cannot use mid-stream besides its own errors: a PAX number
# beyond what a seek takes (OverflowError, ValueError) — data, not an I/O failure.
_HEADER_ERRORS = (*_DAMAGE_ERRORS, OverflowError, ValueError)


def split_member_name(name: str) -> tuple[str, str] | None:
    """``"a/b.c.jpg" -> ("a/b", "c.jpg")``, ``"a/.b.JPG" -> ("a/.b", "jpg")`` (key up to the first
    dot of the basename after its leading dots, lower-cased extension); ``None`` for names without
    a key or an extension (``"noext"``, ``".hidden"``, ``"dir/"``)."""
    while name.startswith("./"):
        name = name[2:]
    head, _, base = name.rpartition("/")
    dots = len(base) - len(base.lstrip("."))
    stem, dot, ext = base[dots:].partition(".")
    if not dot or not stem or not ext:
        return None
    stem = base[:dots] + stem
    return (f"{head}/{stem}" if head else stem), ext.lower()


def make_sample(
    key: str | None,
    shard: str,
    error: str | None = None,
    *,
    image_bytes: bytes | None = None,
    image_ext: str | None = None,
    json_bytes: bytes | None = None,
) -> dict[str, Any]:
    """A sample dict: ``{"key", "shard", "image_bytes", "image_ext", "json_bytes", "error"}``."""
    return {
        "key": key,
        "shard": shard,
        "image_bytes": image_bytes,
        "image_ext": image_ext,
        "json_bytes": json_bytes,
        "error": error,
    }


@dataclass
class TarRead:
    """What :func:`read_tar` found in one tar.

    Attributes:
        samples: one dict per row (see :func:`make_sample`), keys unique.
        damage: why the tar could not be read to its end, or ``None``.
        skipped: member count per reason for members that gave no row (module docstring).
        skipped_examples: up to :data:`MAX_EXAMPLES` member names per reason, for the log.
    """

    samples: list[dict[str, Any]] = field(default_factory=list)
    damage: str | None = None
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)


class _Group:
    """The members of one row collected so far."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.image_member: str | None = None
        self.image_ext: str | None = None
        self.image_bytes: bytes | None = None
        self.json_member: str | None = None
        self.json_bytes: bytes | None = None
        self.errors: list[str] = []

    def to_sample(self, shard: str) -> dict[str, Any]:
        errors = list(self.errors)
        if self.image_member is None and not errors:
            found = self.json_member or "nothing"
            errors.append(f"no image member (expected one of {'/'.join(IMAGE_EXTENSIONS[:4])}; found {found})")
        return make_sample(
            self.key,
            shard,
            "; ".join(errors) or None,
            image_bytes=self.image_bytes,
            image_ext=self.image_ext,
            json_bytes=self.json_bytes,
        )


class _Collector:
    def __init__(self, shard: str) -> None:
        self.shard = shard
        self.groups: dict[str, _Group] = {}
        self.by_name: dict[str, tarfile.TarInfo] = {}  # first file or link of each (raw) name
        self.links: list[tuple[_Group, str, tarfile.TarInfo, str]] = []
        self.repeats: dict[str, int] = {}
        self.skipped: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.last: _Group | None = None

    def skip(self, reason: str, name: str) -> None:
        self.skipped[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(name)

    def add(self, tf: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        name = safe_text(_strip_dot_slash(member.name))
        if member.isdir():
            return self.skip(SKIP_DIRECTORY, name)
        if not (member.isfile() or member.islnk() or member.issym()):
            return self.skip(SKIP_SPECIAL, name)
        self.by_name.setdefault(posixpath.normpath(_strip_dot_slash(member.name)), member)
        parts = split_member_name(name)
        if parts is None:
            return self.skip(SKIP_NO_EXTENSION, name)
        key, ext = parts
        if ext in IMAGE_EXTENSIONS:
            data = None
            if name.rpartition("/")[2].startswith("._") and member.isfile() and member.size <= MAX_MEMBER_BYTES:
                data = _read_data(tf, member)
                if data.startswith(_APPLEDOUBLE_MAGIC):
                    return self.skip(SKIP_APPLEDOUBLE, name)
            self._add_image(tf, member, name, key, ext, data)
        elif ext == "json":
            self._add_json(tf, member, name, key)
        else:
            self.skip(SKIP_OTHER_EXTENSION, name)

    def _group(self, key: str) -> _Group:
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = _Group(key)
        self.last = group
        return group

    def _add_image(
        self, tf: tarfile.TarFile, member: tarfile.TarInfo, name: str, key: str, ext: str, data: bytes | None
    ) -> None:
        group = self._group(key)
        if group.image_member is None:
            group.image_member, group.image_ext = name, ext
            if data is not None:
                group.image_bytes = data
            else:
                self._read(tf, member, name, group, "image_bytes")
            return
        extra = self._group(self._unused_key(name))
        extra.image_member, extra.image_ext = name, ext
        first = group.image_member
        what = f"duplicate member {name}" if first == name else f"second image {name} for key '{key}'"
        extra.errors.append(f"{what}: the sample '{key}' uses {first}; one image per key, so this one is not labelled")

    def _add_json(self, tf: tarfile.TarFile, member: tarfile.TarInfo, name: str, key: str) -> None:
        group = self._group(key)
        if group.json_member is not None:
            return self.skip(SKIP_DUPLICATE_JSON, name)
        group.json_member = name
        self._read(tf, member, name, group, "json_bytes")

    def _unused_key(self, name: str) -> str:
        n = self.repeats.get(name, 1)  # remembered, so that many repeats of one name stay linear
        key = name if n == 1 else f"{name}#{n}"
        while key in self.groups:
            n += 1
            key = f"{name}#{n}"
        self.repeats[name] = n + 1
        return key

    def _read(self, tf: tarfile.TarFile, member: tarfile.TarInfo, name: str, group: _Group, attr: str) -> None:
        if member.islnk() or member.issym():
            self.links.append((group, attr, member, name))  # targets may come later in the tar
            return
        if member.size > MAX_MEMBER_BYTES:
            group.errors.append(f"member {name} is {member.size} bytes (limit {MAX_MEMBER_BYTES})")
            return
        setattr(group, attr, _read_data(tf, member))

    def resolve_links(self, tf: tarfile.TarFile) -> None:
        for group, attr, member, name in self.links:
            target, problem = self._link_target(member)
            if target is None:
                group.errors.append(f"member {name} is a {problem}")
                continue
            try:
                self._read(tf, target, name, group, attr)
            except _DAMAGE_ERRORS as e:
                group.errors.append(f"member {name}: cannot read its link target ({safe_text(str(e))})")

    def _link_target(self, member: tarfile.TarInfo) -> tuple[tarfile.TarInfo | None, str]:
        hops = 0
        while member.islnk() or member.issym():
            kind = "hard link" if member.islnk() else "symbolic link"
            shown = f"{kind} to {safe_text(member.linkname)}"
            if hops == MAX_LINK_HOPS:
                return None, f"{shown} in a chain of more than {MAX_LINK_HOPS} links"
            link = member.linkname
            if member.issym() and not link.startswith("/"):
                link = posixpath.join(posixpath.dirname(_strip_dot_slash(member.name)), link)
            target = posixpath.normpath(link) if link else ""
            if link.startswith("/") or target == ".." or target.startswith("../"):
                return None, f"{shown}, outside the shard (links are only followed inside it)"
            found = self.by_name.get(target)
            if found is None:
                return None, f"{shown}, which is not in the shard"
            member, hops = found, hops + 1
        return member, ""

    def finish(self, damage: str | None) -> TarRead:
        if damage is not None and self.last is not None:
            self.last.errors.append(f"shard damaged while reading this sample: {damage}")
        samples = []
        for group in self.groups.values():
            if group.image_member is None and not group.errors and _is_metadata(group.key):
                self.skip(SKIP_METADATA, group.json_member or group.key)
                continue
            samples.append(group.to_sample(self.shard))
        return TarRead(samples=samples, damage=damage, skipped=dict(self.skipped), skipped_examples=self.examples)


def _read_data(tf: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    fileobj = tf.extractfile(member)
    return fileobj.read() if fileobj is not None else b""


def _strip_dot_slash(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name


def _is_metadata(key: str) -> bool:
    base = key.rsplit("/", 1)[-1]
    return len(base) > 4 and base.startswith("__") and base.endswith("__")


def read_tar(fileobj: IO[bytes], shard: str) -> TarRead:
    """Read one WebDataset tar from a seekable binary file object (see the module docstring).

    ``shard`` is the name written into every sample. A gzip-compressed tar (``.tar.gz``,
    ``.tgz``) is recognised by its content, whatever its name. Bad data never raises: an
    unreadable tar gives no samples and ``damage``, a header rejected mid-stream keeps the samples
    before it and ``damage`` names the member and the byte offset.
    """
    collector = _Collector(shard)
    gzipped = fileobj.read(2) == _GZIP_MAGIC
    size = None if gzipped else fileobj.seek(0, 2)  # a member may not claim bytes past the end
    fileobj.seek(0)
    try:
        tf = tarfile.open(fileobj=fileobj, mode="r:gz" if gzipped else "r:", encoding="utf-8", errors="surrogateescape")
    except _DAMAGE_ERRORS as e:
        return TarRead(damage=f"not a readable tar ({safe_text(str(e))})")
    try:
        damage = _read_members(tf, collector, size)
        collector.resolve_links(tf)
    finally:
        tf.close()
    return collector.finish(damage)


def _read_members(tf: tarfile.TarFile, collector: _Collector, size: int | None) -> str | None:
    """Give every member to ``collector``; return the damage that ended the tar early, or None.

    tarfile trusts a header's ``size`` (a PAX record may say 10**30) and seeks there; on a real
    file that is an OSError, so a member whose data would end past the file stops the reading first.
    """
    where, after = "the first header (byte 0)", "no member read"
    try:
        while (member := tf.next()) is not None:
            name = safe_text(_strip_dot_slash(member.name))
            where = f"member {name} (header at byte {member.offset})"
            collector.add(tf, member)
            if size is not None and tf.offset > size:
                return f"{where} claims {member.size} bytes, past the end of the file ({size} bytes)"
            after = f"after member {name}"
            where = f"the header at byte {tf.offset} ({after})"
        return _check_end_of_archive(tf.fileobj, tf.offset, after)
    except _HEADER_ERRORS as e:
        return f"tar truncated or corrupt at {where}: {type(e).__name__}: {safe_text(str(e))}"


def _check_end_of_archive(f: Any, offset: int, after: str) -> str | None:
    """tarfile stops silently at a truncated or garbage header; a complete tar continues with a
    zero block right after the last member, so look for it."""
    f.seek(offset)
    block = f.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE:
        return f"tar truncated after byte {offset} (no end-of-archive block; {after})"
    if block.count(0) != tarfile.BLOCKSIZE:
        return f"corrupt tar header at byte {offset} ({after})"
    return None
