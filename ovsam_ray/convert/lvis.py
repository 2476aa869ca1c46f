"""LVIS v1 json + COCO image folder -> WebDataset shards.

LVIS v1 is COCO-format; its images carry no ``file_name`` but a ``coco_url``
(``http://images.cocodataset.org/val2017/000000397133.jpg``): the image is read from
``<images>/val2017/000000397133.jpg``, so ``images`` is the COCO root holding ``train2017/`` and
``val2017/``. The JSON also keeps each image's ``neg_category_ids`` and
``not_exhaustive_category_ids`` (LVIS's federated evaluation needs them); ``_categories.json``
keeps the categories with their ``synonyms`` and ``frequency``.
"""

from __future__ import annotations

from typing import Any

from ovsam_ray.convert.coco import _check_dataset, coco_samples, load_json, write_categories
from ovsam_ray.convert.writer import ConvertSummary, write_shards

__all__ = ["LVIS_IMAGE_FIELDS", "convert_lvis", "lvis_image_path"]

LVIS_IMAGE_FIELDS = ("neg_category_ids", "not_exhaustive_category_ids", "coco_url")


def lvis_image_path(image: dict[str, Any]) -> str:
    """``<split>/<name>`` from the image's ``coco_url`` (or its ``file_name`` when it has one)."""
    if image.get("file_name"):
        return str(image["file_name"])
    url = str(image.get("coco_url") or "")
    parts = url.rstrip("/").split("/")
    if len(parts) < 2 or not parts[-1]:
        raise ValueError(f"LVIS image {image.get('id')} has neither file_name nor a usable coco_url ({url!r})")
    return "/".join(parts[-2:])


def convert_lvis(
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
    """LVIS v1 json + COCO root folder (``train2017/``, ``val2017/``) -> shards under ``output``
    (arguments as :func:`~ovsam_ray.convert.coco.convert_coco`)."""
    dataset = load_json(annotations, s3_endpoint=s3_endpoint)
    _check_dataset(dataset, annotations)
    summary = ConvertSummary()
    samples = coco_samples(dataset, images, prompts=prompts, image_path=lvis_image_path,
                           image_fields=LVIS_IMAGE_FIELDS, limit=limit, summary=summary)
    summary = write_shards(samples, output, images_per_shard=images_per_shard, workers=workers,
                           s3_endpoint=s3_endpoint, summary=summary)
    write_categories(dataset, output, s3_endpoint=s3_endpoint)
    return summary
