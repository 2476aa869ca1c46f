"""COCO instances json + image folder -> WebDataset shards (DESIGN §4 JSON).

Each image becomes ``<key>.<ext>`` + ``<key>.json`` with ``image_id``, ``file_name``, ``width``,
``height``, the ground truth as ``annotations`` (``id``, ``bbox`` xywh, ``category_id``,
``category_name``, ``segmentation`` kept as given — polygons or RLE —, ``area``, ``iscrowd``)
and, unless ``prompts="none"``, prompts built from it (``boxes`` + ``labels``, and/or interior
``points``; see :func:`ovsam_ray.evaluation.prompts.gt_prompts`). Images are written in
``image_id`` order; the key is the zero-padded id (``000000397133``), so shards are reproducible.
The categories are written next to the shards as ``_categories.json``.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

from ovsam_ray import io
from ovsam_ray.convert.writer import ConvertSummary, Sample, image_extension, sample_key, write_shards
from ovsam_ray.evaluation.prompts import PROMPT_MODES, gt_prompts

__all__ = ["coco_samples", "convert_coco", "load_json", "write_categories"]

log = logging.getLogger(__name__)

_ANNOTATION_FIELDS = ("id", "bbox", "category_id", "segmentation", "area", "iscrowd")


def load_json(url: str, *, s3_endpoint: str | None = None) -> Any:
    """Parse a JSON file from a local path or URL."""
    try:
        return json.loads(io.read_bytes(url, s3_endpoint=s3_endpoint))
    except json.JSONDecodeError as e:
        raise ValueError(f"{io.redact(url)} is not valid JSON: {e.msg} at line {e.lineno}") from None


def image_key(image: dict[str, Any]) -> str:
    """``000000397133`` for an integer id, else the sanitised id or file name."""
    image_id = image.get("id")
    if isinstance(image_id, int) and not isinstance(image_id, bool):
        return f"{image_id:012d}"
    return sample_key(image_id if image_id is not None else image.get("file_name", ""))


def _annotation(ann: dict[str, Any], names: dict[Any, str]) -> dict[str, Any]:
    out = {k: ann[k] for k in _ANNOTATION_FIELDS if k in ann}
    out.setdefault("iscrowd", 0)
    if ann.get("category_id") in names:
        out["category_name"] = names[ann["category_id"]]
    return out


def _check_dataset(dataset: Any, url: str) -> None:
    if not isinstance(dataset, dict) or not isinstance(dataset.get("images"), list):
        raise ValueError(f"{io.redact(url)}: expected a COCO-style object with an 'images' list")


def coco_samples(
    dataset: dict[str, Any],
    images: str,
    *,
    prompts: str = "box",
    image_path: Callable[[dict[str, Any]], str] | None = None,
    image_fields: tuple[str, ...] = (),
    extra: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    limit: int | None = None,
    summary: ConvertSummary | None = None,
) -> Iterator[Sample]:
    """Samples of a COCO-format dataset (also LVIS and detector results). ``image_path`` gives an
    image's path below ``images`` (default: its ``file_name``); ``image_fields`` are copied from
    the image record into the JSON; ``extra`` adds fields (e.g. detector boxes) per image."""
    if prompts not in PROMPT_MODES:
        raise ValueError(f"prompts={prompts!r}: choose one of {PROMPT_MODES}")
    names = {c["id"]: c["name"] for c in dataset.get("categories") or []}
    by_image: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for ann in dataset.get("annotations") or []:
        by_image[ann.get("image_id")].append(ann)
    records = sorted(dataset["images"], key=lambda im: (str(type(im.get("id"))), im.get("id")))
    for n, image in enumerate(records):
        if limit is not None and n >= limit:
            break
        rel = image_path(image) if image_path else image.get("file_name", "")
        ext = image_extension(rel)
        if ext is None:
            if summary is not None:
                summary.skip(str(rel or image.get("id")), "no image file name with a known extension")
            continue
        anns = [_annotation(a, names) for a in sorted(by_image.get(image.get("id"), []),
                                                       key=lambda a: (a.get("id") is None, a.get("id") or 0))]
        meta: dict[str, Any] = {"image_id": image.get("id"), "file_name": rel, "width": image.get("width"),
                                "height": image.get("height")}
        meta.update({k: image[k] for k in image_fields if k in image})
        meta["annotations"] = anns
        if prompts != "none" and anns:
            meta.update(_prompts(anns, image, prompts))
        if extra is not None:
            meta.update(extra(image))
        yield Sample(key=image_key(image), image_ext=ext, meta=meta, image_url=io.join(images, rel))


def _prompts(anns: list[dict[str, Any]], image: dict[str, Any], mode: str) -> dict[str, Any]:
    height, width = image.get("height"), image.get("width")
    if mode != "box" and not (isinstance(height, int) and isinstance(width, int)):
        raise ValueError(f"image {image.get('id')}: point prompts need the image's 'height' and 'width'")
    return gt_prompts(anns, height=height or 1, width=width or 1, mode=mode)


def write_categories(dataset: dict[str, Any], output: str, *, s3_endpoint: str | None = None) -> None:
    """``<output>/_categories.json``: the dataset's category list (ids, names, LVIS frequency...)."""
    data = json.dumps({"categories": dataset.get("categories") or []}, indent=1).encode()
    io.atomic_write_bytes(io.join(output, "_categories.json"), data, s3_endpoint=s3_endpoint)


def convert_coco(
    annotations: str,
    images: str,
    output: str,
    *,
    images_per_shard: int = 1000,
    prompts: str = "box",
    limit: int | None = None,
    workers: int = 4,
    s3_endpoint: str | None = None,
) -> ConvertSummary:
    """COCO instances json (``annotations``) + image folder (``images``, local or ``s3://``) ->
    shards under ``output``. ``prompts``: box | point | both | none (prompts from the ground truth);
    ``limit``: the first N images (by id) only."""
    dataset = load_json(annotations, s3_endpoint=s3_endpoint)
    _check_dataset(dataset, annotations)
    summary = ConvertSummary()
    samples = coco_samples(dataset, images, prompts=prompts, limit=limit, summary=summary)
    summary = write_shards(samples, output, images_per_shard=images_per_shard, workers=workers,
                           s3_endpoint=s3_endpoint, summary=summary)
    write_categories(dataset, output, s3_endpoint=s3_endpoint)
    return summary
