"""Label output -> YOLO segmentation labels (Ultralytics format), streamed.

``<output>/labels/<shard>/<key>.txt`` (made a safe file name by
:func:`~ovsam_ray.export.paths.data_file_name`): one line per instance, ``<class> x1 y1 x2 y2 ...`` with the
polygon normalised to [0, 1] by the image size (the outline of the mask; a mask of several
4-connected parts gets one line through all of them, joined as Ultralytics' own converter joins
them: :func:`~ovsam_ray.export.polygons.join_polygons`); an image without instances gets an empty file (a
background image). With ``with_images`` the images are extracted from the input shards
(``<output>/images/<shard>/<key>.<ext>``, the same name: Ultralytics finds labels by replacing
``/images/`` with ``/labels/``). ``<output>/keys.jsonl`` has one line per label file,
``{"labels", "shard", "key"}``, so the original key of a renamed file can be found;
``<output>/data.yaml`` (written last) lists the class names.

Class indices are contiguous 0..N-1 and ``names`` lists all N, as Ultralytics' dataset check
requires: the position in ``classes`` (a vocabulary or a COCO json's categories; other labels are
dropped and counted), else the position in the vocabulary the labels were made with (run record),
else the rank of each ``label_id`` seen in the labels (one extra pass over them).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

from ovsam_ray import storage
from ovsam_ray.data.rle import decode_rle
from ovsam_ray.export.images import ImageCopier, ImageExts
from ovsam_ray.export.output import open_output, write_file
from ovsam_ray.export.paths import data_file_name
from ovsam_ray.export.polygons import join_polygons, mask_to_polygons
from ovsam_ray.labels.categories import load_categories, record_vocabulary
from ovsam_ray.labels.reader import iter_label_batches, iter_label_rows, source_shards
from ovsam_ray.vocabulary import clean_class_name
from ovsam_ray.written import writing

__all__ = ["export_yolo", "yolo_classes", "yolo_lines"]

log = logging.getLogger(__name__)

ClassOf = Callable[[dict[str, Any]], "int | None"]


def yolo_lines(
    instances: list[dict[str, Any]],
    width: int,
    height: int,
    class_of: ClassOf,
    *,
    tolerance: float = 1.0,
    min_score: float = 0.0,
) -> tuple[list[str], int]:
    """YOLO segmentation lines for one image; ``class_of(instance)`` gives the class index or
    ``None`` (dropped). Returns the lines and how many instances were dropped (no class, below
    ``min_score``, or an empty/degenerate mask)."""
    lines, dropped = [], 0
    for inst in instances:
        cls = class_of(inst)
        if cls is None or (inst.get("label_score") or 0.0) < min_score:
            dropped += 1
            continue
        polys = mask_to_polygons(decode_rle(inst["rle"]), tolerance=tolerance)
        if not polys:
            dropped += 1
            continue
        coords = " ".join(f"{x / width:.6f} {y / height:.6f}" for x, y in join_polygons(polys))
        lines.append(f"{cls} {coords}")
    return lines, dropped


def yolo_classes(
    labels: str, classes: str | None = None, *, s3_endpoint: str | None = None
) -> tuple[list[str], ClassOf]:
    """The class names (index = YOLO class, 0..N-1) and ``class_of(instance)`` (see module doc)."""
    if classes:
        names = [str(c["name"]) for c in load_categories(classes, s3_endpoint=s3_endpoint)]
        by_name = {clean_class_name(n): i for i, n in enumerate(names)}
        return names, lambda inst: by_name.get(clean_class_name(str(inst.get("label"))))
    vocab = record_vocabulary(labels, s3_endpoint=s3_endpoint)
    if vocab is not None:
        names = list(vocab.class_names)
        position = {int(c): i for i, c in enumerate(vocab.class_ids)}
    else:
        seen: dict[int, str] = {}
        for row in iter_label_rows(labels, columns=("status", "instances"), s3_endpoint=s3_endpoint):
            for inst in row["instances"] or []:
                if row["status"] == "ok" and inst.get("label_id") is not None:
                    seen.setdefault(int(inst["label_id"]), str(inst.get("label")))
        names = [seen[k] for k in sorted(seen)]
        position = {k: i for i, k in enumerate(sorted(seen))}

    def class_of(inst: dict[str, Any]) -> int | None:
        return position.get(int(inst["label_id"])) if inst.get("label_id") is not None else None

    return names, class_of


def _yaml(names: list[str], output: str) -> str:
    # Ultralytics resolves train/val against `path`, and a relative `path` against the working
    # directory: write the absolute folder for a local output (any working directory works). For
    # a remote output there is no such path: leave `path` out, and Ultralytics resolves against
    # the yaml's own folder once the export is copied to a disk.
    root = "" if storage.is_remote(output) else f"path: {json.dumps(os.path.abspath(output))}\n"
    # JSON strings are valid YAML scalars: no YAML library needed
    body = "\n".join(f"  {i}: {json.dumps(n)}" for i, n in enumerate(names))
    return f"{root}train: images\nval: images\nnc: {len(names)}\nnames:\n{body}\n"


def _yolo_names(labels: str, shards: str | None, with_images: bool, s3_endpoint: str | None) -> Iterator[str]:
    """Every file name the export writes below its folder, in one pass over the rows' names."""
    yield from ("keys.jsonl", "data.yaml")
    exts = ImageExts(labels, shards, s3_endpoint=s3_endpoint) if with_images else None
    for row in iter_label_rows(labels, columns=("shard", "key", "status"), s3_endpoint=s3_endpoint):
        if row["status"] != "ok":
            continue
        yield "labels/" + data_file_name(row["shard"], row["key"], "txt")
        ext = exts(row["shard"], row["key"]) if exts is not None else None
        if ext is not None:
            yield "images/" + data_file_name(row["shard"], row["key"], ext)


def export_yolo(
    labels: str,
    output: str,
    *,
    classes: str | None = None,
    shards: str | None = None,
    tolerance: float = 1.0,
    min_score: float = 0.0,
    with_images: bool = False,
    overwrite: bool = False,
    s3_endpoint: str | None = None,
) -> dict[str, int]:
    """Write YOLO segmentation labels (and, with ``with_images``, the images from the shards —
    ``shards`` or the run record's input) under ``output``; returns counts (``images_missing``:
    images of ``with_images`` not found in their shard, logged). Files of the same names already
    there are refused unless an earlier export wrote them (see :mod:`ovsam_ray.written`)."""
    with writing(
        output,
        "export yolo",
        _yolo_names(labels, shards, with_images, s3_endpoint),
        overwrite=overwrite,
        s3_endpoint=s3_endpoint,
    ):
        return _export_yolo(
            labels,
            output,
            classes=classes,
            shards=shards,
            tolerance=tolerance,
            min_score=min_score,
            with_images=with_images,
            s3_endpoint=s3_endpoint,
        )


def _export_yolo(
    labels: str,
    output: str,
    *,
    classes: str | None,
    shards: str | None,
    tolerance: float,
    min_score: float,
    with_images: bool,
    s3_endpoint: str | None,
) -> dict[str, int]:
    names, class_of = yolo_classes(labels, classes, s3_endpoint=s3_endpoint)
    urls = source_shards(labels, shards, s3_endpoint=s3_endpoint) if with_images else {}
    copier = ImageCopier(urls, storage.join(output, "images"), s3_endpoint=s3_endpoint)
    stats = {"images": 0, "instances": 0, "dropped": 0, "error_rows": 0, "images_written": 0, "images_missing": 0}
    with open_output(storage.join(output, "keys.jsonl"), "w", s3_endpoint=s3_endpoint) as index:
        for batch in iter_label_batches(labels, s3_endpoint=s3_endpoint):
            for row in batch:
                if row["status"] != "ok":
                    stats["error_rows"] += 1
                    continue
                name = "labels/" + data_file_name(row["shard"], row["key"], "txt")
                lines, dropped = yolo_lines(
                    row["instances"] or [],
                    row["width"],
                    row["height"],
                    class_of,
                    tolerance=tolerance,
                    min_score=min_score,
                )
                write_file(
                    storage.join(output, name),
                    ("\n".join(lines) + ("\n" if lines else "")).encode(),
                    s3_endpoint=s3_endpoint,
                )
                index.write(json.dumps({"labels": name, "shard": row["shard"], "key": row["key"]}) + "\n")
                stats["images"] += 1
                stats["instances"] += len(lines)
                stats["dropped"] += dropped
                if with_images:
                    copier.add(row["shard"], row["key"])
    stats["images_written"] = copier.close()
    stats["images_missing"] = copier.missing
    write_file(storage.join(output, "data.yaml"), _yaml(names, output).encode(), s3_endpoint=s3_endpoint)
    return stats
