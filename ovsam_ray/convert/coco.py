"""COCO instances json + image folder -> WebDataset shards (DESIGN §4 JSON).

Each image becomes ``<key>.<ext>`` + ``<key>.json`` with ``image_id``, ``file_name``, ``width``,
``height``, the ground truth as ``annotations`` (``id``, ``bbox`` xywh, ``category_id``,
``category_name``, ``segmentation`` kept as given — polygons or RLE —, ``area``, ``iscrowd``)
and, unless ``prompts="none"``, prompts built from it (``boxes`` + ``labels``, and/or interior
``points``; see :func:`ovsam_ray.data.gt_prompts.gt_prompts`). Shards are mixed (a seeded random
order, DESIGN §4.8; ``order="source"``: ``image_id`` order); the key is the zero-padded id
(``000000397133``), so shards are reproducible.
The categories are written next to the shards as ``_categories.json``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ovsam_ray import storage
from ovsam_ray.convert.mixed import TASK_IMAGES, check_order, sample_units, write_mixed
from ovsam_ray.convert.records import (
    ConvertError,
    bbox_problem,
    id_problem,
    id_text,
    image_path_problem,
    is_number,
    kind,
    load_json,
    name_problem,
    plain_json_problem,
    segmentation_problem,
    shown,
    side_problem,
)
from ovsam_ray.data.gt_prompts import PROMPT_MODES, gt_prompts
from ovsam_ray.data.tar_writer import ConvertSummary, Sample, image_extension, sample_key, write_shards
from ovsam_ray.errors import ConfigError

__all__ = [
    "CocoRecords",
    "coco_samples",
    "convert_coco",
    "load_json",
    "read_coco",
    "write_categories",
    "write_samples",
]

log = logging.getLogger(__name__)

_ANNOTATION_FIELDS = ("id", "bbox", "category_id", "segmentation", "area", "iscrowd")


def image_key(image: dict[str, Any]) -> str:
    """``000000397133`` for an integer id, else the sanitised id or file name."""
    image_id = image.get("id")
    if isinstance(image_id, int) and not isinstance(image_id, bool):
        return f"{image_id:012d}"
    return sample_key(image_id if image_id is not None else image.get("file_name", ""))


def coco_image_path(image: dict[str, Any]) -> Any:
    """An image's path below ``--images``: its ``file_name`` (checked by the caller)."""
    return image.get("file_name")


@dataclass
class CocoRecords:
    """The usable records of a COCO-format file: ``images`` as (record, path below ``--images``, key)
    in id order, cleaned ``annotations`` by image id (:func:`~ovsam_ray.convert.records.id_text`),
    ``categories`` and their ``names`` by id text."""

    images: list[tuple[dict[str, Any], str, str]] = field(default_factory=list)
    annotations: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    categories: list[dict[str, Any]] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)


def _check_dataset(dataset: Any, url: str) -> None:
    """The file as a whole: an object with an ``images`` list; ``annotations``/``categories`` lists or absent."""
    shown_url = storage.safe_for_log(storage.redact(url))
    if not isinstance(dataset, dict) or not isinstance(dataset.get("images"), list):
        what = kind(dataset) if not isinstance(dataset, dict) else f"'images' {kind(dataset.get('images'))}"
        raise ConvertError(f"{shown_url}: expected a COCO-style object with an 'images' list, got {what}")
    for name in ("annotations", "categories"):
        if dataset.get(name) is not None and not isinstance(dataset[name], list):
            raise ConvertError(f"{shown_url}: '{name}' must be a list, not {kind(dataset[name])}")


def _category_problem(cat: Any) -> str | None:
    if not isinstance(cat, dict):
        return f"a category must be an object, not {kind(cat)}"
    return (
        id_problem(cat.get("id"), "id")
        or name_problem(cat.get("name"), "name")
        or plain_json_problem(cat, "the category")
    )


def _image_problem(
    image: Any, root: str, image_path: Callable[[dict[str, Any]], Any], fields: tuple[str, ...], need_size: bool
) -> str | None:
    if not isinstance(image, dict):
        return f"an image record must be an object, not {kind(image)}"
    problem = id_problem(image.get("id"), "id")
    for side in ("width", "height"):
        if problem is None and (image.get(side) is not None or need_size):
            problem = side_problem(image.get(side), side)
    if problem is None:
        problem = next((p for k in fields if k in image and (p := plain_json_problem(image[k], k))), None)
    if problem is not None:
        return problem
    try:
        rel = image_path(image)
    except ValueError as e:  # LVIS: neither file_name nor a usable coco_url
        return str(e)
    problem = image_path_problem(root, rel)
    if problem is None and image_extension(rel) is None:
        problem = f"file_name {shown(rel)} has no known image extension"
    return problem


def _annotation_problem(ann: Any, image_ids: set[str], names: dict[str, str] | None) -> str | None:
    """``names`` is None when the file has no categories (then any ``category_id`` is kept as given)."""
    if not isinstance(ann, dict):
        return f"an annotation must be an object, not {kind(ann)}"
    problem = id_problem(ann.get("image_id"), "image_id")
    if problem is None and id_text(ann["image_id"]) not in image_ids:
        problem = f"image_id {shown(ann['image_id'])} names no image"
    if problem is None and "id" in ann:
        problem = id_problem(ann["id"], "id")
    if problem is None and (names is not None or "category_id" in ann):
        problem = id_problem(ann.get("category_id"), "category_id")
        if problem is None and names is not None and id_text(ann["category_id"]) not in names:
            problem = f"category_id {shown(ann['category_id'])} names no category"
    if problem is None:
        problem = bbox_problem(ann.get("bbox"))
    if problem is None and "segmentation" in ann:
        problem = segmentation_problem(ann["segmentation"])
    if problem is None and "area" in ann and not (is_number(ann["area"]) and ann["area"] >= 0):
        problem = f"area {shown(ann['area'])} is not a finite number >= 0"
    if problem is None and "iscrowd" in ann and not (isinstance(ann["iscrowd"], int) and ann["iscrowd"] in (0, 1)):
        problem = f"iscrowd must be 0 or 1, not {shown(ann['iscrowd'])}"
    return problem


def _duplicates(records: list[tuple[int, dict[str, Any]]], field_name: str) -> set[str]:
    counts = Counter(id_text(r[field_name]) for _, r in records if field_name in r)
    return {k for k, n in counts.items() if n > 1}


def _label(i: int, kind_name: str, record: Any) -> str:
    rid = record.get("id") if isinstance(record, dict) else None
    return f"{kind_name}[{i}]" + (f" (id {shown(rid)})" if rid is not None else "")


def _read_categories(raw: list[Any], summary: ConvertSummary) -> tuple[list[dict[str, Any]], dict[str, str]]:
    good = []
    for i, cat in enumerate(raw):
        problem = _category_problem(cat)
        if problem:
            summary.skip_record("categories", _label(i, "categories", cat), problem)
        else:
            good.append((i, cat))
    dup = _duplicates(good, "id")
    for i, cat in good:
        if id_text(cat["id"]) in dup:  # which of the copies is meant is unknowable: none is used
            summary.skip_record("categories", _label(i, "categories", cat), "category id appears more than once")
    kept = [cat for _, cat in good if id_text(cat["id"]) not in dup]
    return kept, {id_text(c["id"]): c["name"] for c in kept}


def _read_images(
    raw: list[Any],
    root: str,
    image_path: Callable[[dict[str, Any]], Any],
    fields: tuple[str, ...],
    need_size: bool,
    summary: ConvertSummary,
) -> list[tuple[dict[str, Any], str, str]]:
    good = []
    for i, image in enumerate(raw):
        problem = _image_problem(image, root, image_path, fields, need_size)
        if problem:
            summary.skip(_label(i, "images", image), problem)
        else:
            good.append((i, image))
    dup = _duplicates(good, "id")
    out = []
    for i, image in sorted(good, key=lambda r: (isinstance(r[1]["id"], str), r[1]["id"])):
        key = _key_or_none(image)
        if id_text(image["id"]) in dup:  # which copy the annotations mean is unknowable: none is written
            summary.skip(_label(i, "images", image), "image id appears more than once (ids are compared as text)")
        elif key is None:
            summary.skip(_label(i, "images", image), "id gives no usable sample key")
        else:  # two ids giving one key ("a.b", "a_b"): the writer keeps the first
            out.append((image, image_path(image), key))
    return out


def _key_or_none(image: dict[str, Any]) -> str | None:
    try:
        return image_key(image)
    except ValueError:  # text id with no letter or digit
        return None


def _read_annotations(
    raw: list[Any], image_ids: set[str], names: dict[str, str] | None, summary: ConvertSummary
) -> dict[str, list[dict[str, Any]]]:
    good = []
    for i, ann in enumerate(raw):
        problem = _annotation_problem(ann, image_ids, names)
        if problem:
            summary.skip_record("annotations", _label(i, "annotations", ann), problem)
        else:
            good.append((i, ann))
    dup = _duplicates(good, "id")
    by_image: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for i, ann in good:
        if "id" in ann and id_text(ann["id"]) in dup:
            summary.skip_record("annotations", _label(i, "annotations", ann), "annotation id appears more than once")
            continue
        out = {k: ann[k] for k in _ANNOTATION_FIELDS if k in ann}
        out.setdefault("iscrowd", 0)
        if names is not None:
            out["category_name"] = names[id_text(ann["category_id"])]
        by_image[id_text(ann["image_id"])].append(out)
    for anns in by_image.values():
        anns.sort(key=lambda a: ("id" not in a, isinstance(a.get("id"), str), a.get("id", 0)))
    return by_image


def read_coco(
    dataset: Any,
    url: str,
    images: str,
    summary: ConvertSummary,
    *,
    image_path: Callable[[dict[str, Any]], Any] = coco_image_path,
    image_fields: tuple[str, ...] = (),
    need_size: bool = False,
) -> CocoRecords:
    """Validate a COCO-format dataset (also LVIS) read from ``url``: every malformed image is skipped
    with its reason (``summary.skip``), every malformed annotation or category too
    (``summary.skip_record``); :class:`ConvertError` when the file as a whole is unusable. Ids are
    compared as text (``1`` and ``"1"`` are one image); a duplicated id skips every copy."""
    _check_dataset(dataset, url)
    raw_categories = dataset.get("categories") or []
    categories, names = _read_categories(raw_categories, summary)
    records = _read_images(dataset["images"], images, image_path, image_fields, need_size, summary)
    all_ids = {id_text(im["id"]) for im in dataset["images"] if isinstance(im, dict) and not id_problem(im.get("id"))}
    anns = _read_annotations(dataset.get("annotations") or [], all_ids, names if raw_categories else None, summary)
    return CocoRecords(images=records, annotations=anns, categories=categories, names=names)


def coco_samples(
    records: CocoRecords,
    images: str,
    *,
    prompts: str = "box",
    image_fields: tuple[str, ...] = (),
    extra: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    limit: int | None = None,
) -> Iterator[Sample]:
    """Samples of validated COCO-format records (also LVIS and detector results): ``image_fields``
    are copied from the image record into the JSON; ``extra`` adds fields (e.g. detector boxes) per
    image; ``limit``: the first N usable images by id."""
    if prompts not in PROMPT_MODES:
        raise ConfigError(f"prompts={prompts!r}: choose one of {PROMPT_MODES}")
    for image, rel, key in records.images if limit is None else records.images[: max(limit, 0)]:
        anns = records.annotations.get(id_text(image["id"]), [])
        meta: dict[str, Any] = {
            "image_id": image["id"],
            "file_name": rel,
            "width": image.get("width"),
            "height": image.get("height"),
        }
        meta.update({k: image[k] for k in image_fields if k in image})
        meta["annotations"] = anns
        if prompts != "none" and anns:
            meta.update(gt_prompts(anns, height=image.get("height") or 1, width=image.get("width") or 1, mode=prompts))
        if extra is not None:
            meta.update(extra(image))
        yield Sample(key=key, image_ext=image_extension(rel) or "", meta=meta, image_url=storage.safe_join(images, rel))


def write_categories(categories: list[dict[str, Any]], output: str, *, s3_endpoint: str | None = None) -> None:
    """``<output>/_categories.json``: the dataset's usable categories (ids, names, LVIS frequency...)."""
    data = json.dumps({"categories": categories}, indent=1, allow_nan=False).encode()
    storage.atomic_write_bytes(storage.join(output, "_categories.json"), data, s3_endpoint=s3_endpoint)


def write_samples(
    samples: Iterator[Sample],
    output: str,
    summary: ConvertSummary,
    *,
    images_per_shard: int,
    workers: int,
    order: str,
    seed: int,
    ray_address: str | None,
    task_images: int,
    options: dict[str, Any],
    s3_endpoint: str | None,
) -> ConvertSummary:
    """Samples built on the driver -> shards: mixed (``order="shuffled"``) or in the given order."""
    check_order(order)
    if order == "source":
        return write_shards(
            samples,
            output,
            images_per_shard=images_per_shard,
            workers=workers,
            s3_endpoint=s3_endpoint,
            summary=summary,
        )
    return write_mixed(
        sample_units(samples, summary),
        output,
        images_per_shard=images_per_shard,
        seed=seed,
        workers=workers,
        ray_address=ray_address,
        task_images=task_images,
        options=options,
        s3_endpoint=s3_endpoint,
        summary=summary,
    )


def convert_coco(
    annotations: str,
    images: str,
    output: str,
    *,
    images_per_shard: int = 1000,
    prompts: str = "box",
    limit: int | None = None,
    workers: int = 4,
    order: str = "shuffled",
    seed: int = 0,
    ray_address: str | None = None,
    task_images: int = TASK_IMAGES,
    s3_endpoint: str | None = None,
) -> ConvertSummary:
    """COCO instances json (``annotations``) + image folder (``images``, local or ``s3://``) ->
    shards under ``output``. ``prompts``: box | point | both | none (prompts from the ground truth);
    ``limit``: the first N images (by id) only. Malformed records are skipped and counted
    (:func:`read_coco`). ``order``: ``shuffled`` (mixed shards; ``seed``, ``ray_address``,
    ``task_images``: :func:`~ovsam_ray.convert.mixed.write_mixed`) or ``source`` (id order)."""
    check_order(order)
    if prompts not in PROMPT_MODES:
        raise ConfigError(f"prompts={prompts!r}: choose one of {PROMPT_MODES}")
    summary = ConvertSummary()
    records = read_coco(
        load_json(annotations, s3_endpoint=s3_endpoint),
        annotations,
        images,
        summary,
        need_size=prompts in ("point", "both"),
    )
    samples = coco_samples(records, images, prompts=prompts, limit=limit)
    summary = write_samples(
        samples,
        output,
        summary,
        images_per_shard=images_per_shard,
        workers=workers,
        order=order,
        seed=seed,
        ray_address=ray_address,
        task_images=task_images,
        options={"format": "coco", "annotations": annotations, "images": images, "prompts": prompts, "limit": limit},
        s3_endpoint=s3_endpoint,
    )
    write_categories(records.categories, output, s3_endpoint=s3_endpoint)
    return summary
