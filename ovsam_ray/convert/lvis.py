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

from ovsam_ray.convert.coco import coco_samples, load_json, read_coco, write_categories, write_samples
from ovsam_ray.convert.mixed import TASK_IMAGES
from ovsam_ray.convert.records import shown
from ovsam_ray.data.gt_prompts import PROMPT_MODES
from ovsam_ray.data.tar_writer import ConvertSummary
from ovsam_ray.errors import ConfigError

__all__ = ["LVIS_IMAGE_FIELDS", "convert_lvis", "lvis_image_path"]

LVIS_IMAGE_FIELDS = ("neg_category_ids", "not_exhaustive_category_ids", "coco_url")


def lvis_image_path(image: dict[str, Any]) -> Any:
    """``<split>/<name>`` from the image's ``coco_url`` (or its ``file_name`` when it has one; whether
    that is a usable path is checked by the caller)."""
    if image.get("file_name") is not None:
        return image["file_name"]
    url = image.get("coco_url")
    parts = url.rstrip("/").split("/") if isinstance(url, str) else []
    if len(parts) < 2 or not parts[-1]:
        raise ValueError(f"neither file_name nor a usable coco_url ({shown(url)})")
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
    order: str = "shuffled",
    seed: int = 0,
    ray_address: str | None = None,
    task_images: int = TASK_IMAGES,
    s3_endpoint: str | None = None,
) -> ConvertSummary:
    """LVIS v1 json + COCO root folder (``train2017/``, ``val2017/``) -> shards under ``output``
    (arguments as :func:`~ovsam_ray.convert.coco.convert_coco`)."""
    if prompts not in PROMPT_MODES:
        raise ConfigError(f"prompts={prompts!r}: choose one of {PROMPT_MODES}")
    summary = ConvertSummary()
    records = read_coco(
        load_json(annotations, s3_endpoint=s3_endpoint),
        annotations,
        images,
        summary,
        image_path=lvis_image_path,
        image_fields=LVIS_IMAGE_FIELDS,
        need_size=prompts in ("point", "both"),
    )
    samples = coco_samples(records, images, prompts=prompts, image_fields=LVIS_IMAGE_FIELDS, limit=limit)
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
        options={"format": "lvis", "annotations": annotations, "images": images, "prompts": prompts, "limit": limit},
        s3_endpoint=s3_endpoint,
    )
    write_categories(records.categories, output, s3_endpoint=s3_endpoint)
    return summary
