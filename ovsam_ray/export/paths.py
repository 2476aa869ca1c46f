"""The one rule that turns names from data (a shard name, an image key) into file names, for every
exporter and ``show``: every labelled image gets its own file, inside the export folder, whatever
its key.

``data_file_name("shard-000000", "dir/000123", "jpg") == "shard-000000/dir/000123.jpg"``: ordinary
names are kept as they are. Otherwise, per ``/``-separated component of the key (the shard is one
component, a ``/`` in it included):

- ``%``, ``/`` (in a shard), ``\\``, control characters (C0, DEL, C1, U+2028/U+2029) become
  ``%XX`` per UTF-8 byte; a lone surrogate (a raw undecodable byte) becomes ``%uDCXX``. A key the
  tar reader made UTF-8-safe (``caf\\xe9``) keeps its escape: ``caf%5Cxe9``.
- A leading ``.`` becomes ``%2E`` (no hidden files, no ``.`` or ``..``); an empty component
  (``a//b``, a leading or trailing ``/``) becomes ``%``.
- A folder component ending in ``.<one of SUFFIXES>`` has that dot escaped (``d.jpg/x`` ->
  ``d%2Ejpg/x.jpg``), so a folder never has the name of a file: the keys ``d`` and ``d.jpg/x``
  both export.
- A component that would pass :data:`NAME_BYTES` with any suffix keeps its start and ends with
  ``%~`` and 20 hex digits of its SHA-256 (stable across runs and machines); a key whose path
  would pass :data:`PATH_BYTES` becomes one such component. The exported record keeps the
  original key. The name without its suffix does not depend on the suffix.

The escapes are reversible (``%`` itself is escaped), so two different (shard, key) pairs never
get one file name, except by a SHA-256 collision of shortened names.
"""

from __future__ import annotations

import hashlib
import re

from ovsam_ray.data.tar_reader import IMAGE_EXTENSIONS

__all__ = ["NAME_BYTES", "PATH_BYTES", "SUFFIXES", "data_file_name"]

#: Longest component written, in UTF-8 bytes. The OS limit is 255; the rest is room for a
#: writer's temporary name (``.<name>.tmp-<32 hex>``, see ``export.output.open_output``).
NAME_BYTES = 200
#: Longest relative path (PATH_MAX is 4096 with the export root in front of it).
PATH_BYTES = 1024
#: The extensions an exporter may append (images, labels, overlays, shards).
SUFFIXES = frozenset(IMAGE_EXTENSIONS) | {"json", "txt", "png", "tar"}

_ESCAPE_RE = re.compile("[%/\\\\\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_HASH_HEX = 20
_STEM_BYTES = NAME_BYTES - 1 - max(len(s) for s in SUFFIXES)
_KEY_PATH_BYTES = PATH_BYTES - NAME_BYTES - 1  # room for the shard folder in front


def _escape_char(match: re.Match[str]) -> str:
    ch = match.group()
    if "\ud800" <= ch <= "\udfff":  # UTF-8 cannot encode it; %uXXXX cannot be confused with %XX
        return f"%u{ord(ch):04X}"
    return "".join(f"%{b:02X}" for b in ch.encode("utf-8"))


def _escape(component: str, *, folder: bool) -> str:
    if not component:
        return "%"
    text = _ESCAPE_RE.sub(_escape_char, component)
    if text.startswith("."):
        text = "%2E" + text[1:]
    stem, dot, ext = text.rpartition(".")
    if folder and dot and ext.lower() in SUFFIXES:
        text = f"{stem}%2E{ext}"
    return text


def _fit(text: str, original: str) -> str:
    """``text``, or, past NAME_BYTES, its start + ``%~<hash of original>``. Room is kept for the
    longest suffix whatever the suffix, so that one key has one stem in every export (YOLO pairs
    ``images/X.jpeg`` with ``labels/X.txt``)."""
    if len(text.encode("utf-8")) <= _STEM_BYTES:
        return text
    digest = hashlib.sha256(original.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_HEX]
    room = _STEM_BYTES - len(digest) - 2
    head = text.encode("utf-8")[:room].decode("utf-8", "ignore")  # cut on a character boundary
    return f"{head}%~{digest}"


def data_file_name(shard: str | None, key: str | None, ext: str | None) -> str:
    """The relative file name (``/``-separated) of ``<shard>/<key>.<ext>`` under an export folder.

    ``shard`` or ``key`` may be ``None`` (``<shard>.tar``, a tar member ``<key>.json``); ``ext``
    is one of :data:`SUFFIXES`, or ``None`` for a name without an extension (then it is not
    kept apart from folder names). See the module docstring for the rule; the result never
    starts with ``/``, has no empty, ``.`` or ``..`` component and no component over NAME_BYTES.
    """
    if ext is not None and ext not in SUFFIXES:
        raise ValueError(f"extension {ext!r} is not one of {sorted(SUFFIXES)}")
    if shard is None and key is None:
        raise ValueError("data_file_name needs a shard or a key")
    parts = ([] if shard is None else [shard]) + ([] if key is None else key.split("/"))
    names = [_fit(_escape(p, folder=True), p) for p in parts[:-1]]
    names.append(_fit(_escape(parts[-1], folder=False), parts[-1]))
    # decided on the key alone, so that <key> in a tar and <shard>/<key> on disk share one stem
    key_names = names[len(parts) - len(key.split("/")) :] if key is not None else []
    if key is not None and len("/".join(key_names).encode("utf-8")) > _KEY_PATH_BYTES:
        names = names[: len(names) - len(key_names)] + [_fit(_escape(key, folder=False), key)]
    return "/".join(names) + (f".{ext}" if ext else "")
