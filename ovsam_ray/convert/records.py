"""Checks shared by the converters' record validation: ids, numbers, boxes, segmentations, image paths.

A converter reads files other tools wrote, so every field is data: a wrong type, a ``null``, a number
beyond float range (``json`` reads ``1e400`` as ``inf``), a name that leads outside ``--images``. Each
format validates its records in one place (``coco._image_problem``, ``sa1b._annotation_problem``...)
with these checks, which return ``None`` for a usable value or the reason it is not. A bad record is
skipped and counted with that reason (:meth:`~ovsam_ray.data.tar_writer.ConvertSummary.skip_record`);
a file that is unusable as a whole raises :class:`ConvertError`, one line naming the file.
"""

from __future__ import annotations

import json
import math
from typing import Any

from ovsam_ray import storage
from ovsam_ray.errors import OVSAMRayError
from ovsam_ray.locations import canonical_location

__all__ = [
    "MAX_ID",
    "ConvertError",
    "all_numbers",
    "bbox_problem",
    "coordinates_problem",
    "id_problem",
    "id_text",
    "image_path_problem",
    "is_number",
    "kind",
    "load_json",
    "name_problem",
    "parse_json",
    "plain_json_problem",
    "segmentation_problem",
    "shown",
    "side_problem",
]

#: Integer ids are stored as int64 downstream (``_image_classes.parquet``).
MAX_ID = 2**63 - 1
#: Text ids become sample keys; tar member names and file systems bound their length.
MAX_ID_CHARS = 200
#: An image side beyond JPEG's limit is a typo or an attack, not a picture (point prompts allocate H*W).
MAX_SIDE = 65535
#: Coordinates (boxes, polygons) lie within this of the origin: pycocotools rasterises polygons on a
#: 5x grid in C ints, and crashes the process (or allocates gigabytes) on coordinates near 1e9.
MAX_COORDINATE = 2 * MAX_SIDE
#: Fields copied verbatim (LVIS's per-image lists) nest this deep at most.
MAX_COPIED_DEPTH = 4


class ConvertError(OVSAMRayError, ValueError):
    """An input file a converter cannot use at all; the message (one line) names the file and the record."""


def load_json(url: str, *, s3_endpoint: str | None = None) -> Any:
    """Parse a JSON file from a local path or URL (:func:`parse_json`)."""
    return parse_json(storage.read_bytes(url, s3_endpoint=s3_endpoint), storage.redact(url))


def parse_json(data: bytes, where: str) -> Any:
    """Parse JSON bytes; :class:`ConvertError` names ``where`` when they are not UTF-8 JSON or nest too
    deeply to read. Integers beyond Python's digit limit read as inf (refused where they are used)."""
    shown_where = storage.safe_for_log(where)
    try:
        return _loads(data)
    except json.JSONDecodeError as e:
        raise ConvertError(f"{shown_where} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except UnicodeDecodeError as e:
        raise ConvertError(f"{shown_where} is not UTF-8 JSON (bad byte at offset {e.start})") from None
    except RecursionError:
        raise ConvertError(f"{shown_where} is nested too deeply to read") from None


def _loads(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise
    except ValueError:  # an integer longer than Python's int/str digit limit: read it as inf, refused where used
        return json.loads(data, parse_int=_int_or_inf)


def _int_or_inf(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return math.inf if not text.startswith("-") else -math.inf


def kind(value: Any) -> str:
    """``null``, ``bool``, ``text``... : how a JSON value is named in a reason."""
    names = {
        type(None): "null",
        bool: "a bool",
        int: "an integer",
        float: "a number",
        str: "text",
        list: "a list",
        dict: "an object",
    }
    return names.get(type(value), f"a {type(value).__name__}")


def shown(value: Any) -> str:
    """A value from data for a reason: repr, escaped and cut to one short line."""
    try:
        text = repr(value)
    except RecursionError:  # a list as deep as the parser allows, repr'd from deeper in the stack
        text = f"<{kind(value)} nested too deeply>"
    return storage.safe_for_log(text, limit=60)


def is_number(value: Any) -> bool:
    """A finite JSON number: not a bool, not inf/NaN, not an integer beyond float range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


_NUMBER_TYPES = {int, float}


def all_numbers(values: list[Any]) -> bool:
    """Every value a finite number; one pass in C over the long polygon lists of a large dataset."""
    if not set(map(type, values)) <= _NUMBER_TYPES:  # exact types: a bool is not a number here
        return False
    try:
        return math.isfinite(math.fsum(values))
    except (OverflowError, ValueError):  # an int beyond float range, inf - inf, or coordinates near 1e308
        return False


def coordinates_problem(values: list[Any], what: str) -> str | None:
    """Finite numbers within ``MAX_COORDINATE`` of the origin (boxes, polygon points)."""
    if not all_numbers(values):
        return f"{what} {shown(values)} holds a value that is not a finite number"
    if values and not -MAX_COORDINATE <= min(values) <= max(values) <= MAX_COORDINATE:
        return f"{what} has a coordinate beyond +-{MAX_COORDINATE}"
    return None


def id_problem(value: Any, what: str = "id") -> str | None:
    """Ids are integers 0..2^63-1 or non-empty UTF-8 text of at most 200 characters."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return f"{what} must be an integer or text, not {kind(value)}"
    if isinstance(value, int) and not 0 <= value <= MAX_ID:
        return f"{what} {shown(value)} is outside 0..2^63-1"
    if isinstance(value, str):
        return name_problem(value, what, limit=MAX_ID_CHARS)
    return None


def id_text(value: int | str) -> str:
    """The one identity of an id: ``1`` and ``"1"`` name the same record (labels store ids as text)."""
    return str(value)


def name_problem(value: Any, what: str = "name", *, limit: int = 1000) -> str | None:
    """Names are non-empty text that UTF-8 can encode (Parquet and S3 keys need it)."""
    if not isinstance(value, str):
        return f"{what} must be text, not {kind(value)}"
    if not value.strip():
        return f"{what} is empty"
    if len(value) > limit:
        return f"{what} is longer than {limit} characters"
    if storage.safe_text(value) is not value:
        return f"{what} {shown(value)} is not valid UTF-8 text"
    return None


def side_problem(value: Any, what: str) -> str | None:
    """An image side: a positive integer (``null``/absent is the caller's call)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{what} must be a positive integer, not {kind(value)}"
    if not 0 < value <= MAX_SIDE:
        return f"{what} {shown(value)} is not in 1..{MAX_SIDE}"
    return None


def bbox_problem(value: Any, what: str = "bbox") -> str | None:
    """``[x, y, w, h]``: four finite numbers, ``w`` and ``h`` not negative."""
    if not isinstance(value, list) or len(value) != 4:
        return f"{what} must be a list of 4 numbers [x, y, w, h], not {kind(value)}"
    problem = coordinates_problem(value, what)
    if problem:
        return problem
    if value[2] < 0 or value[3] < 0:
        return f"{what} {shown(value)} has a negative width or height"
    return None


def segmentation_problem(value: Any, what: str = "segmentation") -> str | None:
    """Polygons (a list of lists of finite numbers) or an RLE object (``size`` [h, w], ``counts`` text or
    a list of non-negative integers)."""
    if isinstance(value, list):
        if not all(isinstance(p, list) for p in value):
            return f"{what} polygons must be lists of numbers"
        return next((p for poly in value if (p := coordinates_problem(poly, f"{what} polygon"))), None)
    if not isinstance(value, dict):
        return f"{what} must be polygons or an RLE object, not {kind(value)}"
    size, counts = value.get("size"), value.get("counts")
    if not isinstance(size, list) or len(size) != 2 or any(side_problem(v, "size") for v in size):
        return f"{what} RLE size must be [height, width] of positive integers, not {shown(size)}"
    if isinstance(counts, str):
        return None if counts.isascii() else f"{what} RLE counts must be ASCII text"
    if not (isinstance(counts, list) and all(type(c) is int and c >= 0 for c in counts)):
        return f"{what} RLE counts must be text or a list of non-negative integers, not {kind(counts)}"
    if sum(counts) != size[0] * size[1]:  # pycocotools corrupts its heap decoding runs longer than the mask
        return f"{what} RLE counts add up to {sum(counts)}, not height x width = {size[0] * size[1]}"
    return None


def plain_json_problem(value: Any, what: str, depth: int = MAX_COPIED_DEPTH) -> str | None:
    """A value copied as it is: finite numbers, UTF-8 text, nesting at most ``depth`` deep."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return None if is_number(value) else f"{what} holds {shown(value)}, not a finite number"
    if isinstance(value, str):
        return None if storage.safe_text(value) is value else f"{what} holds text that is not valid UTF-8"
    if depth <= 0 or not isinstance(value, (list, dict)):
        return f"{what} is nested too deeply"
    items = value.values() if isinstance(value, dict) else value
    keys = [k for k in value if storage.safe_text(k) is not k] if isinstance(value, dict) else []
    if keys:
        return f"{what} has a key that is not valid UTF-8"
    return next((p for v in items if (p := plain_json_problem(v, what, depth - 1))), None)


def image_path_problem(root: str, relative: Any) -> str | None:
    """Why ``relative`` (a ``file_name`` from data) may not be read below ``root`` (``--images``), or
    ``None``. Refused like a key that would leave the output (:func:`ovsam_ray.storage.safe_join`): not text,
    absolute, with a ``..`` component, a backslash or a NUL; locally also a path whose links lead outside
    ``root`` (a data file cannot make the converter copy files from elsewhere into the shards)."""
    if not isinstance(relative, str):
        return f"file_name must be text, not {kind(relative)}"
    try:
        url = storage.safe_join(root, relative)
    except storage.UnsafePathError as e:
        return f"file_name leaves --images: {e}"
    if storage.is_remote(root):
        return None
    if not canonical_location(root).contains(canonical_location(url)):
        return f"file_name {shown(relative)} leads outside --images through a link"
    return None
