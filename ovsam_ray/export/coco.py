"""Label output -> one COCO instances json (masks as RLE), or a COCO results array, streamed.

``images`` (one per ``ok`` row: ``id``, ``width``, ``height``, ``file_name`` = ``<shard>/<key>.<ext>``
made a safe file name by :func:`~ovsam_ray.export.paths.data_file_name` with the image's own
extension in its input shard, i.e. the file ``with_images`` writes below ``<output's
folder>/images/`` — and the original ``shard`` and ``key``), ``annotations``
(``segmentation`` RLE, ``bbox`` xywh of the mask, ``area``, ``category_id``, ``score`` and the
OV-SAM fields ``label_score``, ``topk_labels``, ``topk_scores``, ``prompt_type``,
``detector_score``, ``detector_label``) and ``categories``. The file is written while the Parquet
files are read column by column in three passes (image ids, images, then annotations), so memory
holds one record batch, never the whole output. With ``results`` the output is a JSON array of
result objects (``image_id``, ``category_id``, ``segmentation``, ``bbox``, ``score``, ``label``) that
``COCO.loadRes(path)`` reads as it is.

Image ids: the rows' ``image_id`` when every one is an integer (COCO shards keep COCO's ids),
else 1..N in output order. Category ids: from ``categories`` (a COCO json — e.g. the converter's
``_categories.json`` — or a vocabulary; labels not in it are dropped and counted); else, for labels
made with a built-in vocabulary (run record), the dataset's own ids (``coco_ov`` -> COCO's 1..90,
``lvis_v1`` -> LVIS's) with its full category list; else each label's ``label_id``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import IO, Any

from ovsam_ray import storage
from ovsam_ray.errors import ConfigError
from ovsam_ray.export.images import ImageCopier, ImageExts, output_folder
from ovsam_ray.export.output import open_output
from ovsam_ray.export.paths import data_file_name
from ovsam_ray.labels.categories import category_index, dataset_categories, load_categories, record_vocabulary
from ovsam_ray.labels.reader import iter_label_rows
from ovsam_ray.labels.scores import LABEL_SOURCES, SCORE_MODES, instance_label, instance_score
from ovsam_ray.vocabulary import clean_class_name
from ovsam_ray.written import file_and_folder, writing

__all__ = ["coco_image_ids", "export_coco", "ok_rows"]

log = logging.getLogger(__name__)

_IMAGE_COLUMNS = ("key", "shard", "image_id", "width", "height", "status")


def _int_id(value: Any) -> int | None:
    try:
        return int(value) if value is not None and str(int(value)) == str(value).strip() else None
    except (TypeError, ValueError):
        return None


def coco_image_ids(labels: str, *, s3_endpoint: str | None = None) -> str:
    """``"source"`` when every ok row's ``image_id`` is an integer, else ``"sequential"``."""
    for row in iter_label_rows(labels, columns=("image_id", "status"), s3_endpoint=s3_endpoint):
        if row["status"] == "ok" and _int_id(row["image_id"]) is None:
            return "sequential"
    return "source"


def ok_rows(
    labels: str, columns: tuple[str, ...] | None, policy: str, s3_endpoint: str | None
) -> Iterator[tuple[int | None, dict[str, Any]]]:
    """(integer image id, row) of every ``ok`` row; ids as :func:`coco_image_ids`' ``policy`` says
    (None: a source id that is not an integer)."""
    n = 0
    for row in iter_label_rows(labels, columns=columns, s3_endpoint=s3_endpoint):
        if row["status"] != "ok":
            continue
        n += 1
        yield (_int_id(row["image_id"]) if policy == "source" else n), row


def _write_array(f: IO[str], items: Iterator[dict[str, Any]]) -> int:
    count = 0
    for item in items:
        f.write(("," if count else "") + "\n" + json.dumps(item, separators=(",", ":")))
        count += 1
    return count


def _annotation(inst: dict[str, Any], image_id: int | None, category_id: int, score: float) -> dict[str, Any]:
    x0, y0, x1, y1 = (float(v) for v in inst["bbox"])
    rle = inst["rle"]
    return {
        "image_id": image_id,
        "category_id": category_id,
        "iscrowd": 0,
        "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"]},
        "area": int(inst["area"]),
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "score": score,
        "label": inst.get("label"),
        "label_score": inst.get("label_score"),
        "topk_labels": inst.get("topk_labels"),
        "topk_scores": inst.get("topk_scores"),
        "prompt_type": inst.get("prompt_type"),
        "detector_score": inst.get("detector_score"),
        "detector_label": inst.get("detector_label"),
        # only when known: the export of an output written before these fields stays as it was
        **{k: inst[k] for k in ("source", "shard_label") if inst.get(k) is not None},
    }


def _coco_names(
    name: str, labels: str, shards: str | None, with_images: bool, s3_endpoint: str | None
) -> Iterator[str]:
    """The json's name and, ``with_images``, the images' names below its folder."""
    yield name
    if not with_images:
        return
    exts = ImageExts(labels, shards, s3_endpoint=s3_endpoint)
    for row in iter_label_rows(labels, columns=("shard", "key", "status"), s3_endpoint=s3_endpoint):
        ext = exts(row["shard"], row["key"]) if row["status"] == "ok" else None
        if ext is not None:
            yield "images/" + data_file_name(row["shard"], row["key"], ext)


_RESULT_FIELDS = ("image_id", "category_id", "segmentation", "bbox", "score", "label")


def export_coco(
    labels: str,
    output: str,
    *,
    categories: str | None = None,
    label_source: str = "ovsam",
    score: str = "auto",
    min_score: float = 0.0,
    results: bool = False,
    shards: str | None = None,
    with_images: bool = False,
    overwrite: bool = False,
    s3_endpoint: str | None = None,
) -> dict[str, Any]:
    """Write the COCO json ``output`` from the label output ``labels``; returns counts
    (``images``, ``annotations``, ``dropped``: instances whose label is not a category,
    ``below_min_score``, ``error_rows``, ``images_written``, ``images_missing``: images of
    ``with_images`` not found in their shard, logged). A file of the same name already there (the
    json, an image) is refused unless an earlier export wrote it (see :mod:`ovsam_ray.written`)."""
    if label_source not in LABEL_SOURCES or score not in SCORE_MODES:
        raise ConfigError(f"label_source must be one of {LABEL_SOURCES}, score one of {SCORE_MODES}")
    fixed = load_categories(categories, s3_endpoint=s3_endpoint) if categories else None
    index = category_index(fixed) if fixed else None
    builtin = (
        None
        if fixed or label_source != "ovsam"
        else dataset_categories(record_vocabulary(labels, s3_endpoint=s3_endpoint))
    )
    if builtin is not None:
        fixed, id_map = builtin
    seen: dict[int, str] = {}
    by_name: dict[str, int] = {}
    stats = {
        "images": 0,
        "annotations": 0,
        "dropped": 0,
        "below_min_score": 0,
        "error_rows": 0,
        "images_written": 0,
        "images_missing": 0,
    }
    policy = coco_image_ids(labels, s3_endpoint=s3_endpoint)
    exts = ImageExts(labels, shards, s3_endpoint=s3_endpoint)
    copier = ImageCopier(exts.urls, storage.join(output_folder(output), "images"), s3_endpoint=s3_endpoint)

    def images() -> Iterator[dict[str, Any]]:
        for image_id, row in ok_rows(labels, _IMAGE_COLUMNS, policy, s3_endpoint):
            ext = exts(row["shard"], row["key"])
            name = data_file_name(row["shard"], row["key"], ext)
            if with_images:
                copier.add(row["shard"], row["key"])
            yield {
                "id": image_id,
                "width": row["width"],
                "height": row["height"],
                "file_name": name,
                "shard": row["shard"],
                "key": row["key"],
            }

    def category(inst: dict[str, Any], name: Any) -> int | None:
        if index is not None:
            return index.get(clean_class_name(str(name))) if name is not None else None
        if builtin is not None:
            return id_map.get(int(inst["label_id"])) if inst.get("label_id") is not None else None
        if label_source == "ovsam":
            return inst.get("label_id")
        # detector names without a category list: ids 1..K in order of appearance
        return by_name.setdefault(str(name), len(by_name) + 1) if name is not None else None

    def annotations() -> Iterator[dict[str, Any]]:
        n = 0
        for image_id, row in ok_rows(labels, None, policy, s3_endpoint):
            for inst in row["instances"] or []:
                name = instance_label(inst, label_source)
                cat = category(inst, name)
                if cat is None:
                    stats["dropped"] += 1
                    continue
                s = instance_score(inst, label_source, score)
                if s < min_score:
                    stats["below_min_score"] += 1
                    continue
                seen.setdefault(int(cat), str(name))
                n += 1
                ann = _annotation(inst, image_id, int(cat), s)
                yield {k: ann[k] for k in _RESULT_FIELDS} if results else {"id": n, **ann}

    folder, name = file_and_folder(output)
    with writing(
        folder,
        "export coco",
        _coco_names(name, labels, shards, with_images, s3_endpoint),
        overwrite=overwrite,
        s3_endpoint=s3_endpoint,
    ):
        with open_output(output, "w", s3_endpoint=s3_endpoint) as f:
            if results:
                f.write("[")
                stats["images"] = sum(1 for _ in ok_rows(labels, _IMAGE_COLUMNS, policy, s3_endpoint))
                stats["annotations"] = _write_array(f, annotations())
                f.write("\n]\n")
            else:
                f.write('{"info": ' + json.dumps({"description": "ovsam_ray labels", "labels": storage.redact(labels)}))
                f.write(',\n"images": [')
                stats["images"] = _write_array(f, images())
                f.write('],\n"annotations": [')
                stats["annotations"] = _write_array(f, annotations())
                cats = fixed if fixed is not None else [{"id": k, "name": v} for k, v in sorted(seen.items())]
                f.write('],\n"categories": ' + json.dumps(cats) + "}\n")
        if with_images and results:
            for _, row in ok_rows(labels, _IMAGE_COLUMNS, policy, s3_endpoint):
                copier.add(row["shard"], row["key"])
        stats["images_written"] = copier.close()
        stats["images_missing"] = copier.missing
    for row in iter_label_rows(labels, columns=("status",), s3_endpoint=s3_endpoint):
        stats["error_rows"] += row["status"] != "ok"
    if stats["dropped"]:
        log.warning("%d instances had a label that is not one of the categories and were left out", stats["dropped"])
    return stats
