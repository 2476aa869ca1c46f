"""``review import``: a reviewed export of Label Studio or CVAT -> corrections overlaid on the labels.

Reads what the tools export after review: Label Studio's JSON export (a list of tasks, each with
its ``annotations``; ``brushlabels`` results as brush RLE, ``polygonlabels`` as points in percent
of the image) or CVAT's COCO 1.0 export (``instances_default.json``: polygons, or RLE masks with
``iscrowd`` 1). Each reviewed image is matched to the instances ``review select`` put in its task
(the selection folder): first by the result's id (``i<instance>``, kept by Label Studio for an
annotation started from the prediction) or the annotation's ``ovsam_instance`` attribute, then by
mask IoU >= ``match_iou``. Each picked instance is then ``accepted`` (same label, mask IoU >=
``same_mask_iou`` with the prediction), ``relabelled`` (a new label), ``mask_edited`` (same label,
new mask) or ``deleted`` (no reviewed item matches it); a reviewed item matching none is
``added``. A Label Studio task without an annotation (or with only cancelled ones) was not
reviewed and changes nothing. The corrections go to one new overlay file beside the labels
(:func:`ovsam_ray.labels.overlays.write_overlay`); importing the same export again adds nothing.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ovsam_ray import storage
from ovsam_ray.data.rle import annotation_mask, decode_rle, encode_masks
from ovsam_ray.errors import ConfigError, MissingInputError
from ovsam_ray.export.brush import brush_rle_to_mask
from ovsam_ray.labels.overlays import KINDS, correction_counts, write_overlay
from ovsam_ray.labels.reader import iter_label_rows
from ovsam_ray.labels.schema import timestamp
from ovsam_ray.review.select import CVAT_NAME, SELECTION_NAME

__all__ = ["TOOLS", "ImportConfig", "import_review", "match_image", "read_cvat_coco", "read_labelstudio"]

log = logging.getLogger(__name__)

TOOLS = ("auto", "labelstudio", "cvat")


@dataclass(frozen=True)
class ImportConfig:
    """What ``review import`` reads and where its corrections go."""

    input: str = field(metadata={"help": "the label output the selection was made from (corrections go beside it)"})
    review: str = field(metadata={"help": "the reviewed export: Label Studio JSON, or CVAT's COCO instances json"})
    selection: str = field(metadata={"help": "the folder review select wrote (its selection.parquet)"})
    tool: str = field(default="auto", metadata={"choices": TOOLS, "help": "the export's tool (auto: by its form)"})
    match_iou: float = field(default=0.5, metadata={"help": "a reviewed mask matches an instance from this IoU"})
    same_mask_iou: float = field(default=0.95, metadata={"help": "a matched mask counts as unchanged from this IoU"})
    s3_endpoint: str | None = field(default=None, metadata={"help": "S3-compatible endpoint URL"})

    def __post_init__(self) -> None:
        if self.tool not in TOOLS:
            raise ConfigError(f"--tool must be one of {TOOLS}")
        if not (0 < self.match_iou <= 1 and 0 < self.same_mask_iou <= 1):
            raise ConfigError("--match-iou and --same-mask-iou must be in (0, 1]")


@dataclass
class ReviewedItem:
    """One object as the reviewer left it: its label, its mask and the instance it names, if any."""

    label: str | None
    mask: np.ndarray
    instance: int | None = None


def read_labelstudio(data: Any) -> tuple[dict[tuple[str, str], list[ReviewedItem]], Counter]:
    """Label Studio's JSON export -> reviewed items per image (shard, key) of the tasks reviewed."""
    out: dict[tuple[str, str], list[ReviewedItem]] = {}
    counts: Counter[str] = Counter()
    for task in data:
        d = task.get("data") or {}
        if "shard" not in d or "key" not in d:
            counts["tasks_unknown"] += 1
            continue
        done = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        if not done:
            counts["tasks_not_reviewed"] += 1
            continue
        counts["tasks_reviewed"] += 1
        items = []
        for r in done[-1].get("result") or []:
            value, kind = r.get("value") or {}, r.get("type")
            h, w = int(r.get("original_height") or 0), int(r.get("original_width") or 0)
            mask: np.ndarray | None
            if kind == "brushlabels" and value.get("format") == "rle":
                mask = brush_rle_to_mask(value["rle"], h, w)
            elif kind == "polygonlabels" and value.get("points"):
                poly = [c for x, y in value["points"] for c in (x * w / 100.0, y * h / 100.0)]
                mask = annotation_mask({"segmentation": [poly]}, h, w)
            else:
                counts["results_ignored"] += 1
                continue
            labels = value.get(kind) or [None]
            rid = str(r.get("id") or "")
            hint = int(rid[1:]) if rid[:1] == "i" and rid[1:].isdigit() else None
            if mask is not None:
                items.append(ReviewedItem(labels[0], mask, hint))
        out[(str(d["shard"]), str(d["key"]))] = items
    return out, counts


def read_cvat_coco(data: dict[str, Any], files: dict[str, tuple[str, str]]) -> tuple[dict, Counter]:
    """CVAT's COCO export -> reviewed items per image; ``files`` maps the task's image file names to
    (shard, key). Every image in the export was reviewed (its objects are all there is)."""
    names = {c["id"]: c["name"] for c in data.get("categories") or []}
    by_image: dict[Any, list[dict[str, Any]]] = {}
    for ann in data.get("annotations") or []:
        by_image.setdefault(ann.get("image_id"), []).append(ann)
    out: dict[tuple[str, str], list[ReviewedItem]] = {}
    counts: Counter[str] = Counter()
    for img in data.get("images") or []:
        ident = files.get(img.get("file_name")) or files.get(str(img.get("file_name", "")).rsplit("/", 1)[-1])
        if ident is None:
            counts["images_unknown"] += 1
            continue
        counts["tasks_reviewed"] += 1
        h, w = int(img["height"]), int(img["width"])
        items = []
        for ann in by_image.get(img.get("id"), []):
            mask = annotation_mask(ann, h, w)
            if mask is None:
                counts["results_ignored"] += 1
                continue
            hint = (ann.get("attributes") or {}).get("ovsam_instance")
            try:
                hint = int(hint) if hint is not None and str(hint) != "" else None
            except (TypeError, ValueError):
                hint = None
            items.append(ReviewedItem(names.get(ann.get("category_id")), mask, hint))
        out[ident] = items
    return out, counts


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def match_image(
    picked: dict[int, dict[str, Any]], items: list[ReviewedItem], *, match_iou: float = 0.5, same_mask_iou: float = 0.95
) -> list[dict[str, Any]]:
    """Classify one image's review: ``picked`` instance index -> its instance (with ``mask``) as
    the task showed it; returns one correction per picked instance and per added item (``kind``,
    ``instance``, ``label``, ``mask``, ``mask_changed``)."""
    matched: dict[int, ReviewedItem] = {}
    rest = []
    for item in items:
        if item.instance in picked and item.instance not in matched:
            matched[item.instance] = item
        else:
            rest.append(item)
    pairs = sorted(
        ((_iou(item.mask, picked[i]["mask"]), n, i) for n, item in enumerate(rest) for i in picked if i not in matched),
        reverse=True,
    )
    used: set[int] = set()
    for iou, n, i in pairs:
        if iou < match_iou:
            break
        if n in used or i in matched:
            continue
        matched[i] = rest[n]
        used.add(n)
    out = []
    for i, inst in sorted(picked.items()):
        found = matched.get(i)
        if found is None:
            out.append({"kind": "deleted", "instance": i, "label": None, "mask": None, "mask_changed": None})
            continue
        mask_changed = found.mask.shape != inst["mask"].shape or _iou(found.mask, inst["mask"]) < same_mask_iou
        label = found.label if found.label is not None else inst.get("label")
        kind = "relabelled" if label != inst.get("label") else "mask_edited" if mask_changed else "accepted"
        out.append({"kind": kind, "instance": i, "label": label, "mask": found.mask, "mask_changed": mask_changed})
    for n, item in enumerate(rest):
        if n not in used:
            out.append(
                {"kind": "added", "instance": None, "label": item.label, "mask": item.mask, "mask_changed": True}
            )
    return out


def _selection(cfg: ImportConfig) -> tuple[dict[tuple[str, str], list[int]], dict[str, tuple[str, str]]]:
    url = storage.join(cfg.selection.rstrip("/"), SELECTION_NAME)
    if not storage.exists(url, s3_endpoint=cfg.s3_endpoint):
        raise MissingInputError(f"no {SELECTION_NAME} in {storage.redact(cfg.selection)}: run review select first")
    with storage.open_url(url, "rb", s3_endpoint=cfg.s3_endpoint) as f:
        rows = pq.read_table(f, columns=["shard", "key", "instance"]).to_pylist()
    picked: dict[tuple[str, str], list[int]] = {}
    for r in rows:
        picked.setdefault((r["shard"], r["key"]), []).append(int(r["instance"]))
    files: dict[str, tuple[str, str]] = {}
    cvat = storage.join(cfg.selection.rstrip("/"), CVAT_NAME)
    if storage.exists(cvat, s3_endpoint=cfg.s3_endpoint):
        for img in json.loads(storage.read_bytes(cvat, s3_endpoint=cfg.s3_endpoint)).get("images") or []:
            files[img["file_name"]] = (img["shard"], img["key"])
    return picked, files


def import_review(cfg: ImportConfig) -> dict[str, Any]:
    """Read the reviewed export, classify, write one overlay; returns the counts (see the module doc)."""
    raw = storage.read_bytes(cfg.review, s3_endpoint=cfg.s3_endpoint)
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise ConfigError(f"{storage.redact(cfg.review)} is not JSON ({e})") from None
    tool = cfg.tool if cfg.tool != "auto" else "labelstudio" if isinstance(data, list) else "cvat"
    picked, files = _selection(cfg)
    if tool == "labelstudio":
        if not isinstance(data, list):
            raise ConfigError("a Label Studio JSON export is a list of tasks")
        reviewed, counts = read_labelstudio(data)
    else:
        if not isinstance(data, dict) or "images" not in data:
            raise ConfigError("a CVAT COCO export is a json object with images and annotations")
        reviewed, counts = read_cvat_coco(data, files)
    unselected = [ident for ident in reviewed if ident not in picked]
    if unselected:
        counts["images_not_in_selection"] += len(unselected)
        for ident in unselected:
            del reviewed[ident]
    rows: list[dict[str, Any]] = []
    source = cfg.review.rstrip("/").rsplit("/", 1)[-1]
    when = timestamp()
    shards = {s for s, _ in reviewed}
    for row in iter_label_rows(cfg.input, s3_endpoint=cfg.s3_endpoint, corrections=False, shards=shards):
        ident = (row["shard"], row["key"])
        if ident not in reviewed:
            continue
        instances = row["instances"] or []
        task = {
            i: {**instances[i], "mask": decode_rle(instances[i]["rle"])} for i in picked[ident] if i < len(instances)
        }
        for c in match_image(task, reviewed.pop(ident), match_iou=cfg.match_iou, same_mask_iou=cfg.same_mask_iou):
            mask, i = c.pop("mask"), c["instance"]
            if mask is None:
                rle = bbox = area = None
            elif c["kind"] == "accepted":
                inst = instances[i]
                rle, bbox, area = inst["rle"], inst["bbox"], inst["area"]
            else:
                rle = encode_masks(mask[None])[0]
                ys, xs = np.nonzero(mask)
                bbox = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)] if len(xs) else None
                area = int(mask.sum())
            rows.append(
                {**c, "shard": ident[0], "key": ident[1], "rle": rle, "bbox": bbox, "area": area}
                | {"tool": tool, "source": source, "reviewed_at": when}
            )
    counts["images_missing_from_labels"] += len(reviewed)
    by_kind = Counter({k: 0 for k in KINDS})
    by_kind.update(r["kind"] for r in rows)
    url, fresh = write_overlay(cfg.input, rows, digest_of=raw, s3_endpoint=cfg.s3_endpoint) if rows else (None, False)
    if url is not None and not fresh:
        log.info("this export was imported before (%s): nothing added", storage.redact(url))
    return {
        "tool": tool,
        "overlay": url,
        "imported": fresh,
        **{k: v for k, v in sorted(counts.items())},
        "corrections": dict(by_kind),
        "masks_changed": sum(1 for r in rows if r["mask_changed"]),
        "all_corrections": correction_counts(cfg.input, s3_endpoint=cfg.s3_endpoint),
    }
