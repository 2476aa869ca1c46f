"""``review select``: the instances of a label output most worth a person's look, as review tasks.

One streaming pass over the label output (as committed; instances with a review correction are
never picked again, and ``instance`` always indexes the committed row) scores each instance's
uncertainty from its quality signals (schema version 3): ``1 - label_margin``,
``1 - stability_score``, ``1 - box_iou`` (their mean over the signals it has) plus 1 when its
prompt's label disagrees with OV-SAM's (``label_agrees`` false). Memory holds the class counts,
``min_per_class`` best candidates per class and the ``2 x budget`` best overall (each image's best
``max_per_image`` only), never the output. Then the pick: classes rarest first, up to
``min_per_class`` each, then the most uncertain of the rest, never more than ``max_per_image``
per image. Ties break on a hash of (``seed``, shard, key, instance), so a rerun picks the same;
``strategy="random"`` picks ``budget`` instances uniformly (by that hash alone), the baseline.

The output folder holds ``selection.parquet`` (one row per picked instance: shard, key, instance,
label, signals, priority, why), the picked images under ``images/``, ``labelstudio.json`` (a task
per image whose prediction holds the picked instances as brush masks with their scores; result ids
``i<instance>``, the task data naming shard, key and instances) with its labelling config, and
``cvat/annotations/instances_default.json`` (COCO with RLE masks, as CVAT's COCO 1.0 import reads
it, with the images under ``cvat/images/``; each annotation's ``attributes`` name the instance).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ovsam_ray import storage
from ovsam_ray.errors import ConfigError
from ovsam_ray.export.images import ImageCopier, ImageExts
from ovsam_ray.export.labelstudio import labelstudio_config, labelstudio_task
from ovsam_ray.export.output import write_file
from ovsam_ray.export.paths import data_file_name
from ovsam_ray.labels.reader import corrections_of, iter_label_rows, source_shards
from ovsam_ray.written import writing

__all__ = ["SELECTION_NAME", "SELECTION_SCHEMA", "STRATEGIES", "ReviewSelectConfig", "priority", "select_for_review"]

log = logging.getLogger(__name__)

SELECTION_NAME = "selection.parquet"
LABELSTUDIO_NAME = "labelstudio.json"
CVAT_NAME = "cvat/annotations/instances_default.json"
STRATEGIES = ("uncertain", "random")

SELECTION_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("key", pa.string()),
        ("instance", pa.int32()),
        ("label", pa.string()),
        ("label_score", pa.float32()),
        ("label_margin", pa.float32()),
        ("stability_score", pa.float32()),
        ("box_iou", pa.float32()),
        ("label_agrees", pa.bool_()),
        ("priority", pa.float64()),
        ("reason", pa.string()),
    ]
)


@dataclass(frozen=True)
class ReviewSelectConfig:
    """What ``review select`` picks and where it writes."""

    input: str = field(metadata={"help": "label output (folder or s3:// prefix)"})
    output: str = field(metadata={"help": "folder for selection.parquet, the review tasks and their images"})
    budget: int = field(default=1000, metadata={"help": "instances to pick"})
    min_per_class: int = field(default=3, metadata={"help": "pick at least this many of each class, rarest first"})
    max_per_image: int = field(default=3, metadata={"help": "pick at most this many instances of one image"})
    seed: int = field(default=0, metadata={"help": "tie-breaking (and --strategy random's) seed"})
    strategy: str = field(
        default="uncertain",
        metadata={"choices": STRATEGIES, "help": "uncertain: the signals' pick; random: a uniform pick (a baseline)"},
    )
    shards: str | None = field(default=None, metadata={"help": "input shards (default: the run record's input)"})
    with_images: bool = field(default=True, metadata={"help": "copy the picked images next to the tasks"})
    overwrite: bool = field(default=False, metadata={"help": "replace an earlier selection's files in --output"})
    s3_endpoint: str | None = field(default=None, metadata={"help": "S3-compatible endpoint URL"})

    def __post_init__(self) -> None:
        if self.budget < 1 or self.min_per_class < 0 or self.max_per_image < 1:
            raise ConfigError("--budget and --max-per-image must be >= 1, --min-per-class >= 0")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"--strategy must be one of {STRATEGIES}")


def _hash01(seed: int, shard: str, key: str, i: int) -> float:
    digest = hashlib.blake2b(f"{seed}\0{shard}\0{key}\0{i}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def priority(inst: dict[str, Any]) -> float:
    """An instance's uncertainty (higher: more worth a look; see the module doc)."""
    terms = [1.0 - float(inst[n]) for n in ("label_margin", "stability_score", "box_iou") if inst.get(n) is not None]
    score = sum(terms) / len(terms) if terms else 0.5
    return score + (1.0 if inst.get("label_agrees") is False else 0.0)


_SIGNALS = ("label", "label_score", "label_margin", "stability_score", "box_iou", "label_agrees")


class _Candidates:
    """The bounded candidate sets of one streaming pass (see the module doc)."""

    def __init__(self, cfg: ReviewSelectConfig) -> None:
        self.cfg = cfg
        self.classes: Counter[str] = Counter()
        self.per_class: dict[str, list[tuple[float, float, tuple]]] = {}
        self.best: list[tuple[float, float, tuple]] = []
        self.instances = 0
        self.reviewed = 0

    @staticmethod
    def _push(heap: list, item: tuple, cap: int) -> None:
        if len(heap) < cap:
            heapq.heappush(heap, item)
        elif item[:2] > heap[0][:2]:
            heapq.heapreplace(heap, item)

    def add_row(self, row: dict[str, Any], reviewed: set[tuple[str, str, int]]) -> None:
        cfg = self.cfg
        image: list[tuple[float, float, tuple]] = []
        for i, inst in enumerate(row["instances"] or []):
            if (row["shard"], row["key"], i) in reviewed:
                self.reviewed += 1
                continue
            self.instances += 1
            label = inst.get("label") or ""
            self.classes[label] += 1
            tie = _hash01(cfg.seed, row["shard"], row["key"], i)
            prio = tie if cfg.strategy == "random" else priority(inst)
            item = (prio, tie, (row["shard"], row["key"], i, *(inst.get(n) for n in _SIGNALS)))
            if cfg.strategy == "random":
                self._push(self.best, item, cfg.budget)
                continue
            if cfg.min_per_class:
                self._push(self.per_class.setdefault(label, []), item, cfg.min_per_class)
            image.append(item)
        for item in heapq.nlargest(cfg.max_per_image, image, key=lambda x: x[:2]):
            self._push(self.best, item, 2 * cfg.budget)

    def pick(self) -> list[tuple[tuple, float, str]]:
        cfg = self.cfg
        chosen: list[tuple[tuple, float, str]] = []
        taken: set[tuple[str, str, int]] = set()
        per_image: Counter[tuple[str, str]] = Counter()

        def take(item: tuple, reason: str) -> bool:
            ident = item[2][:3]
            if ident in taken or (cfg.strategy != "random" and per_image[ident[:2]] >= cfg.max_per_image):
                return False
            taken.add(ident)
            per_image[ident[:2]] += 1
            chosen.append((item[2], item[0], reason))
            return True

        if cfg.strategy == "random":
            for item in sorted(self.best, key=lambda x: x[:2], reverse=True):
                take(item, "random")
            return chosen
        for label in sorted(self.classes, key=lambda c: (self.classes[c], c)):  # rarest first
            for item in sorted(self.per_class.get(label, []), key=lambda x: x[:2], reverse=True):
                if len(chosen) >= cfg.budget:
                    break
                take(item, "rare class")
        for item in sorted(self.best, key=lambda x: x[:2], reverse=True):
            if len(chosen) >= cfg.budget:
                break
            take(item, "uncertain")
        return chosen


def select_for_review(cfg: ReviewSelectConfig) -> dict[str, Any]:
    """Pick, write the selection and the review tasks; returns counts (see the module doc)."""
    cands = _Candidates(cfg)
    fixes = corrections_of(cfg.input, s3_endpoint=cfg.s3_endpoint)
    reviewed = {(s, k, c["instance"]) for (s, k), cs in fixes.items() for c in cs if c["instance"] is not None}
    columns = ("shard", "key", "status", "instances")
    for row in iter_label_rows(cfg.input, columns=columns, s3_endpoint=cfg.s3_endpoint, corrections=False):
        if row["status"] == "ok":
            cands.add_row(row, reviewed)
    chosen = sorted(cands.pick(), key=lambda c: (c[0][0], c[0][1], c[0][2]))
    rows = [
        {"shard": s, "key": k, "instance": i, **dict(zip(_SIGNALS, signals)), "priority": prio, "reason": why}
        for (s, k, i, *signals), prio, why in chosen
    ]
    by_image: dict[tuple[str, str], list[int]] = {}
    for r in rows:
        by_image.setdefault((r["shard"], r["key"]), []).append(r["instance"])
    out = cfg.output.rstrip("/")
    names = [SELECTION_NAME, LABELSTUDIO_NAME, "labelstudio.config.xml", CVAT_NAME]
    patterns = [r"images/.*", r"cvat/images/.*"]
    with writing(
        out, "review select", names, overwrite=cfg.overwrite, patterns=patterns, s3_endpoint=cfg.s3_endpoint
    ) as claim:
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows, schema=SELECTION_SCHEMA), sink)
        write_file(storage.join(out, SELECTION_NAME), sink.getvalue().to_pybytes(), s3_endpoint=cfg.s3_endpoint)
        tasks, image_names = _write_tasks(cfg, out, by_image, sorted(cands.classes))
        claim.add(image_names)
    reasons = Counter(r["reason"] for r in rows)
    return {
        "instances_seen": cands.instances,
        "already_reviewed": cands.reviewed,
        "classes": len(cands.classes),
        "selected": len(rows),
        "images": len(by_image),
        "by_reason": dict(sorted(reasons.items())),
        **tasks,
    }


def _write_tasks(
    cfg: ReviewSelectConfig, out: str, by_image: dict[tuple[str, str], list[int]], class_names: list[str]
) -> tuple[dict[str, int], list[str]]:
    """The Label Studio tasks and the CVAT COCO file of the picked instances (and their images)."""
    try:
        urls = source_shards(cfg.input, cfg.shards, s3_endpoint=cfg.s3_endpoint)
    except (FileNotFoundError, ValueError) as e:
        log.warning("the input shards are unknown (%s): tasks name images as jpg, none copied", e)
        urls = {}
    exts = ImageExts(cfg.input, cfg.shards, s3_endpoint=cfg.s3_endpoint)
    copier = ImageCopier(urls, storage.join(out, "images"), s3_endpoint=cfg.s3_endpoint) if cfg.with_images else None
    ls_tasks: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    categories = {name: n + 1 for n, name in enumerate(class_names)}
    shards = {s for s, _ in by_image}
    for row in iter_label_rows(cfg.input, s3_endpoint=cfg.s3_endpoint, shards=shards, corrections=False):
        picked = by_image.get((row["shard"], row["key"]))
        if not picked or row["status"] != "ok":
            continue
        ext = exts(row["shard"], row["key"]) or "jpg"
        if copier is not None:
            copier.add(row["shard"], row["key"])
        subset = {**row, "instances": [row["instances"][i] for i in picked]}
        task = labelstudio_task(subset, ext=ext, model_version="ovsam-review")
        for r in task["predictions"][0]["result"]:
            r["id"] = f"i{picked[int(r['id'].rsplit('_', 1)[1])]}"
        task["data"]["instances"] = picked
        ls_tasks.append(task)
        image_id = len(images) + 1
        file_name = data_file_name(row["shard"], row["key"], ext)
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "width": row["width"],
                "height": row["height"],
                "shard": row["shard"],
                "key": row["key"],
            }
        )
        for i in picked:
            inst = row["instances"][i]
            x0, y0, x1, y1 = (float(v) for v in inst["bbox"])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": categories[inst.get("label") or ""],
                    "segmentation": {"size": list(inst["rle"]["size"]), "counts": inst["rle"]["counts"]},
                    "area": int(inst["area"]),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "iscrowd": 1,  # CVAT's COCO import reads an RLE annotation as a mask
                    "score": float(inst.get("label_score") or 0.0),
                    "attributes": {"occluded": False, "ovsam_instance": i},
                }
            )
    written = missing = 0
    image_names: list[str] = []
    if copier is not None:
        written = copier.close()
        missing = copier.missing
        cvat_images = storage.join(out, "cvat", "images")
        for img in images:  # CVAT's COCO import: annotations/ and images/ side by side
            src = storage.join(out, "images", img["file_name"])
            if storage.exists(src, s3_endpoint=cfg.s3_endpoint):
                image_names += ["images/" + img["file_name"], "cvat/images/" + img["file_name"]]
                data = storage.read_bytes(src, s3_endpoint=cfg.s3_endpoint)
                write_file(storage.join(cvat_images, img["file_name"]), data, s3_endpoint=cfg.s3_endpoint)
    body = json.dumps(ls_tasks, separators=(",", ":")).encode()
    write_file(storage.join(out, LABELSTUDIO_NAME), body, s3_endpoint=cfg.s3_endpoint)
    config = labelstudio_config([n for n in class_names if n])
    write_file(storage.join(out, "labelstudio.config.xml"), config.encode(), s3_endpoint=cfg.s3_endpoint)
    coco = {
        "info": {"description": f"ovsam-ray review selection of {storage.redact(cfg.input)}"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": n, "name": name, "supercategory": ""} for name, n in categories.items()],
    }
    write_file(storage.join(out, CVAT_NAME), json.dumps(coco).encode(), s3_endpoint=cfg.s3_endpoint)
    return {"tasks": len(ls_tasks), "images_written": written, "images_missing": missing}, image_names
