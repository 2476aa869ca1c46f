"""Converted shards -> mixed shards (``ovsam-ray reshard --shuffle``): for shards written before the
converters mixed them (class by class, DESIGN §4.8), with the same guarantees as a conversion.

Every image of the input shards is copied byte for byte (its image and its JSON) into shards of
``images_per_shard`` on average, assigned by a seeded hash of its key; ``_convert.json`` and
``_image_classes.parquet`` are written anew for the new shards, ``_categories.json`` is copied.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from ovsam_ray import storage
from ovsam_ray.convert.mixed import TASK_IMAGES, unit, write_mixed
from ovsam_ray.data.shards import is_damage_marker, iter_shard_samples, list_shards
from ovsam_ray.data.tar_writer import ConvertSummary, Sample

__all__ = ["COPIED_FILES", "reshard"]

#: Side files of a conversion copied as they are (they do not name shards).
COPIED_FILES = ("_categories.json",)


def _shard_samples(url: str, s3_endpoint: str | None, summary: ConvertSummary) -> Iterator[Sample]:
    for s in iter_shard_samples(url, s3_endpoint=s3_endpoint):
        if is_damage_marker(s):
            summary.notes.append(s["error"])
            continue
        if s["error"]:
            summary.skip(f"{storage.redact(url)}:{s['key']}", s["error"])
            continue
        yield Sample(key=s["key"], image_ext=s["image_ext"], image=s["image_bytes"], meta_bytes=s["json_bytes"] or b"")


def _sizes(urls: list[str], s3_endpoint: str | None) -> list[int]:
    out = []
    for url in urls:
        fs, path = storage.get_filesystem(url, s3_endpoint=s3_endpoint)
        out.append(int(fs.size(path) or 0))
    return out


def reshard(
    input: str,
    output: str,
    *,
    images_per_shard: int = 1000,
    seed: int = 0,
    workers: int = 4,
    ray_address: str | None = None,
    task_images: int = TASK_IMAGES,
    s3_endpoint: str | None = None,
) -> ConvertSummary:
    """The shards under ``input`` (a folder, glob or brace range) -> mixed shards under ``output``."""
    shards = list_shards(input, s3_endpoint=s3_endpoint)
    sizes = _sizes(shards, s3_endpoint)
    units = [unit(url, _shard_samples, url, s3_endpoint, size=size) for url, size in zip(shards, sizes)]
    summary = ConvertSummary()
    folder = shards[0].rstrip("/").rsplit("/", 1)[0]
    earlier = _earlier_summary(folder, s3_endpoint)
    if earlier:
        summary.notes.append(
            f"resharded from {storage.redact(folder)}, whose conversion skipped {earlier.get('skipped', 0)} images"
        )
    summary = write_mixed(
        units,
        output,
        images_per_shard=images_per_shard,
        seed=seed,
        workers=workers,
        ray_address=ray_address,
        task_images=task_images,
        options={"format": "reshard", "input": input},
        s3_endpoint=s3_endpoint,
        summary=summary,
    )
    for name in COPIED_FILES:
        url = storage.join(folder, name)
        if storage.exists(url, s3_endpoint=s3_endpoint):
            data = storage.read_bytes(url, s3_endpoint=s3_endpoint)
            storage.atomic_write_bytes(storage.join(output, name), data, s3_endpoint=s3_endpoint)
    return summary


def _earlier_summary(folder: str, s3_endpoint: str | None) -> dict[str, Any]:
    url = storage.join(folder, "_convert.json")
    try:
        found = json.loads(storage.read_bytes(url, s3_endpoint=s3_endpoint))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}
