"""A shard sample's JSON -> validated prompts in image pixels. Errors are data.

One bad prompt never costs the image: it is dropped, and every dropped, clipped or re-ordered
prompt is named in :attr:`Prompts.warnings`, which the label job carries to the row. Only a file
that is not a JSON object (or whose lists disagree in length) is a :class:`DecodeError`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ovsam_ray.errors import OVSAMRayError
from ovsam_ray.storage import safe_text

__all__ = ["DEFAULT_MAX_PROMPTS", "DecodeError", "Prompts", "parse_prompts_json"]

#: Prompts (boxes first, then points) kept per image; the rest are dropped with one warning.
DEFAULT_MAX_PROMPTS = 1000
#: Coordinates and scores are stored as float32: a larger magnitude is not a usable number.
FLOAT32_MAX = float(np.finfo(np.float32).max)
# a JSON escape that may produce a lone surrogate (U+D800..U+DFFF)
_SURROGATE_ESCAPE_RE = re.compile(rb"\\u[dD][89a-fA-F]")
_MAX_LISTED = 10  # indices named in one aggregated warning


class DecodeError(OVSAMRayError, ValueError):
    """An input (image bytes or prompt JSON) that cannot be used; the message says why."""


@dataclass
class Prompts:
    """Prompts of one image from its shard JSON, validated and in image pixels (xyxy).

    Attributes:
        boxes: (N, 4) float32 xyxy, clipped to ``[0, W] x [0, H]``, x0 <= x1, y0 <= y1.
        box_scores: (N,) float32 detector scores; NaN where the JSON gave none (or no usable one).
        box_labels: N detector class names (``None`` where not given).
        box_indices: (N,) int64 position of each kept box in the JSON's ``boxes`` list.
        points: (M, 2) float32 xy, clipped to the pixel grid ``[0, W-1] x [0, H-1]``.
        point_boxes: (M, 4) float32 xyxy box given with each point (NaN row: none), or ``None``
            when the JSON has no ``point_boxes``.
        point_indices: (M,) int64 position of each kept point in the JSON's ``points`` list.
        image_id: the JSON's ``image_id`` as a string, or ``None``.
        annotations: the JSON's ``annotations`` (COCO-style dicts), unchanged but for text made
            UTF-8-safe.
        warnings: what was dropped, ignored, clipped or re-ordered (the image is still usable):
            one message per dropped prompt, one per kind of change listing the prompt indices.
    """

    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    box_scores: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    box_labels: list[str | None] = field(default_factory=list)
    box_indices: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))
    point_boxes: np.ndarray | None = None
    point_indices: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    image_id: str | None = None
    annotations: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def num_boxes(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def num_points(self) -> int:
        return int(self.points.shape[0])


def parse_prompts_json(
    data: bytes | None, *, width: int, height: int, max_prompts: int = DEFAULT_MAX_PROMPTS
) -> Prompts:
    """Parse a sample's JSON (DESIGN §4: ``boxes``, ``scores``, ``labels``, ``points``,
    ``point_boxes``, ``image_id``, ``annotations``; all optional) for a ``width`` x ``height`` image.

    Policy — one bad prompt must not cost the whole image, a broken file must be reported:
      - ``None`` (no JSON member) gives empty prompts.
      - Not JSON / not an object, or per-prompt lists (``scores``, ``labels``, ``point_boxes``)
        whose length differs from their ``boxes``/``points``: :class:`DecodeError`.
      - Text: bytes that are not UTF-8 and lone surrogates (``"\\ud800"``) in any string are
        escaped by :func:`ovsam_ray.storage.safe_text` (``\\xNN`` / ``\\uXXXX``), with a warning for
        the former; the image is still labelled.
      - Numbers: a coordinate must be finite and within float32 range (``1e39``, ``1e400`` and
        5000-digit integers are not); a score that is not becomes NaN with a warning.
      - A box that is not 4 such numbers (NaN, inf, null, text, wrong length) is dropped and
        named in ``warnings``. Inverted boxes are re-ordered, then boxes are clipped to the image
        (one warning each, listing the boxes); zero-area boxes (also after clipping a box lying
        outside the image) are kept — the model handles them and the row shows what was asked.
      - A point that is not 2 such numbers is dropped (with its point box) and named in
        ``warnings``; points are clipped to the pixel grid (one warning). A bad point box
        becomes a NaN row (no box for that point) with a warning.
      - At most ``max_prompts`` valid prompts are kept, boxes first, then points; the rest are
        dropped with one warning.
    """
    if width < 1 or height < 1:
        raise DecodeError(f"invalid image size {width}x{height}")
    if max_prompts < 0:
        raise ValueError(f"max_prompts must be >= 0, got {max_prompts}")
    if data is None:
        return Prompts()
    notes: list[str] = []
    obj = _load_json_object(data, notes)
    out = Prompts(
        image_id=_image_id(obj.get("image_id")), annotations=_annotations(obj.get("annotations")), warnings=notes
    )
    _parse_boxes(obj, width, height, max_prompts, out)
    _parse_points(obj, width, height, max_prompts, out)
    return out


def _load_json_object(data: bytes, notes: list[str]) -> dict[str, Any]:
    bad_at = -1
    try:
        text, utf8 = data.decode("utf-8"), True
    except UnicodeDecodeError as e:
        # keep the bad bytes as surrogates through the parser; safe_text turns them into \xNN
        text, utf8, bad_at = data.decode("utf-8", "surrogateescape"), False, e.start
    try:
        obj = _json_loads(text)
        if not isinstance(obj, dict):
            raise DecodeError(f"prompt JSON must be an object, got {type(obj).__name__}")
        if not utf8 or _SURROGATE_ESCAPE_RE.search(data):
            obj = _safe_strings(obj)
    except json.JSONDecodeError as e:
        what = "malformed prompt JSON" if utf8 else f"prompt JSON is not UTF-8 (byte {bad_at}) and malformed"
        raise DecodeError(f"{what}: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise DecodeError("malformed prompt JSON: nested too deeply") from None
    if not utf8:
        notes.append(f"prompt JSON is not UTF-8 (first bad byte at {bad_at}); bad bytes in its text kept as \\xNN")
    return obj


def _json_loads(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except ValueError:  # an integer longer than Python's int/str digit limit: read it as a float
        return json.loads(text, parse_int=_parse_int)


def _parse_int(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)  # inf for anything that long: dropped as "not finite" where it matters


def _safe_strings(value: Any) -> Any:
    if isinstance(value, str):
        return safe_text(value)
    if isinstance(value, list):
        return [_safe_strings(v) for v in value]
    if isinstance(value, dict):
        return {safe_text(k): _safe_strings(v) for k, v in value.items()}
    return value


def _list_field(obj: dict[str, Any], name: str, length: int | None = None) -> list[Any] | None:
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, list):
        raise DecodeError(f"prompt JSON field {name!r} must be a list, got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise DecodeError(f"prompt JSON field {name!r} has {len(value)} entries for {length} prompts")
    return value


def _numbers(value: Any, n: int) -> list[float] | None:
    """``value`` as ``n`` finite floats within float32 range, or None."""
    if not isinstance(value, (list, tuple)) or len(value) != n:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return None
    try:
        out = [float(v) for v in value]
    except OverflowError:  # an int beyond float64
        return None
    return out if all(math.isfinite(v) and abs(v) <= FLOAT32_MAX for v in out) else None


_BAD_NUMBERS = "finite numbers within float32 range"


def _parse_boxes(obj: dict[str, Any], width: int, height: int, max_prompts: int, out: Prompts) -> None:
    raw = _list_field(obj, "boxes") or []
    scores = _list_field(obj, "scores", len(raw))
    labels = _list_field(obj, "labels", len(raw))
    boxes, kept_scores, kept_labels, reordered, clipped = [], [], [], [], []
    kept: list[int] = []
    for i, box in enumerate(raw):
        if len(kept) == max_prompts:
            out.warnings.append(_over_limit("boxes", len(raw) - i, i, max_prompts))
            break
        xyxy = _numbers(box, 4)
        if xyxy is None:
            out.warnings.append(f"box {i} dropped: expected 4 {_BAD_NUMBERS}, got {_short(box)}")
            continue
        ordered = _ordered(xyxy)
        box_clipped = _clip_box(ordered, width, height)
        if ordered != xyxy:
            reordered.append(i)
        if box_clipped != ordered:
            clipped.append(i)
        boxes.append(box_clipped)
        kept_scores.append(_score(scores, i, out))
        label = labels[i] if labels is not None else None
        kept_labels.append(None if label is None else str(label))
        kept.append(i)
    _note(out, "boxes", reordered, "re-ordered (x0 > x1 or y0 > y1)")
    _note(out, "boxes", clipped, f"clipped to the {width}x{height} image")
    if boxes:
        out.boxes = np.asarray(boxes, np.float32)
        out.box_scores = np.asarray(kept_scores, np.float32)
        out.box_indices = np.asarray(kept, np.int64)
    out.box_labels = kept_labels


def _score(scores: list[Any] | None, i: int, out: Prompts) -> float:
    score = scores[i] if scores is not None else None
    value = _numbers([score], 1)
    if value is None and score is not None:
        out.warnings.append(f"score {i} ignored: expected a number within float32 range, got {_short(score)}")
    return value[0] if value else math.nan


def _clip_box(xyxy: list[float], width: int, height: int) -> list[float]:
    x0, y0, x1, y1 = xyxy
    return [min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width), min(max(y1, 0.0), height)]


def _parse_points(obj: dict[str, Any], width: int, height: int, max_prompts: int, out: Prompts) -> None:
    raw = _list_field(obj, "points") or []
    raw_boxes = _list_field(obj, "point_boxes", len(raw))
    points, point_boxes, clipped = [], [], []
    kept: list[int] = []
    room = max_prompts - out.num_boxes
    for i, point in enumerate(raw):
        if len(kept) >= room:
            out.warnings.append(_over_limit("points", len(raw) - i, i, max_prompts))
            break
        xy = _numbers(point, 2)
        if xy is None:
            out.warnings.append(f"point {i} dropped: expected 2 {_BAD_NUMBERS}, got {_short(point)}")
            continue
        inside = [min(max(xy[0], 0.0), width - 1.0), min(max(xy[1], 0.0), height - 1.0)]
        if inside != xy:
            clipped.append(i)
        points.append(inside)
        kept.append(i)
        if raw_boxes is not None:
            box = raw_boxes[i]
            xyxy = _numbers(box, 4)
            if xyxy is None and box is not None:
                out.warnings.append(f"point box {i} ignored: expected 4 {_BAD_NUMBERS}, got {_short(box)}")
            point_boxes.append(_clip_box(_ordered(xyxy), width, height) if xyxy else [math.nan] * 4)
    _note(out, "points", clipped, f"clipped to the pixel grid of the {width}x{height} image")
    if points:
        out.points = np.asarray(points, np.float32)
        out.point_indices = np.asarray(kept, np.int64)
    if raw_boxes is not None:
        out.point_boxes = np.asarray(point_boxes, np.float32).reshape(-1, 4)


def _ordered(xyxy: list[float]) -> list[float]:
    return [min(xyxy[0], xyxy[2]), min(xyxy[1], xyxy[3]), max(xyxy[0], xyxy[2]), max(xyxy[1], xyxy[3])]


def _over_limit(what: str, dropped: int, first: int, limit: int) -> str:
    return f"{dropped} {what} dropped from index {first} on: more than max_prompts={limit} prompts"


def _note(out: Prompts, what: str, indices: list[int], change: str) -> None:
    if indices:
        shown = ", ".join(str(i) for i in indices[:_MAX_LISTED])
        more = f" and {len(indices) - _MAX_LISTED} more" if len(indices) > _MAX_LISTED else ""
        out.warnings.append(f"{what} {shown}{more} {change}")


def _image_id(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _annotations(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(a, dict) for a in value):
        raise DecodeError("prompt JSON field 'annotations' must be a list of objects")
    return value


def _short(value: Any, limit: int = 60) -> str:
    if isinstance(value, list) and len(value) > 8:
        value = [*value[:8], "..."]
    try:
        text = repr(value) if isinstance(value, float) else json.dumps(value)
    except (ValueError, TypeError, RecursionError):  # e.g. an int too long to print
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
