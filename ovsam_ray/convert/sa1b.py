"""SA-1B (image + per-image json) -> WebDataset shards.

SA-1B ships ``sa_<n>.jpg`` with ``sa_<n>.json`` = ``{"image": {image_id, width, height,
file_name}, "annotations": [{id, segmentation (RLE), bbox (xywh), area, predicted_iou,
point_coords, stability_score, crop_box}]}``, in folders or in tars of such pairs. Either is
read (a folder or ``s3://`` prefix of pairs, or tar files: a glob, brace range, a single tar or
a folder holding only tars). The masks are class-agnostic: annotations keep their fields and get
no category. With ``prompts="box"`` (default) every mask's box becomes a prompt, which is how
OV-SAM puts open-vocabulary names on SA-1B's masks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from ovsam_ray import io
from ovsam_ray.convert.writer import ConvertSummary, Sample, image_extension, sample_key, write_shards
from ovsam_ray.data.shards import is_damage_marker, iter_shard_samples, list_shards
from ovsam_ray.evaluation.prompts import PROMPT_MODES, gt_prompts

__all__ = ["convert_sa1b", "sa1b_meta"]

_KEPT = ("id", "segmentation", "bbox", "area", "predicted_iou", "point_coords", "stability_score", "crop_box")


def sa1b_meta(record: dict[str, Any], *, prompts: str = "box") -> dict[str, Any]:
    """DESIGN §4 JSON from one SA-1B per-image json (``{"image": ..., "annotations": [...]}``)."""
    if not isinstance(record, dict) or not isinstance(record.get("image"), dict):
        raise ValueError("not an SA-1B image json (expected an 'image' object)")
    image = record["image"]
    anns = [{**{k: a[k] for k in _KEPT if k in a}, "iscrowd": 0} for a in record.get("annotations") or []]
    meta = {"image_id": image.get("image_id"), "file_name": image.get("file_name"), "width": image.get("width"),
            "height": image.get("height"), "annotations": anns}
    if prompts != "none" and anns:
        height = int(image.get("height") or anns[0]["segmentation"]["size"][0])
        width = int(image.get("width") or anns[0]["segmentation"]["size"][1])
        meta.update(gt_prompts(anns, height=height, width=width, mode=prompts))
    return meta


def _folder_samples(files: list[str], prompts: str, s3_endpoint: str | None, summary: ConvertSummary,
                    limit: int | None) -> Iterator[Sample]:
    jsons = {f[: -len(".json")] for f in files if f.endswith(".json")}
    n = 0
    for url in files:
        ext = image_extension(url)
        if ext is None:
            continue
        stem = url.rsplit(".", 1)[0]
        if stem not in jsons:
            summary.skip(url, "no per-image json next to it")
            continue
        if limit is not None and n >= limit:
            return
        n += 1

        def load(json_url: str = stem + ".json") -> dict[str, Any]:
            return sa1b_meta(json.loads(io.read_bytes(json_url, s3_endpoint=s3_endpoint)), prompts=prompts)

        yield Sample(key=sample_key(stem.rsplit("/", 1)[-1]), image_ext=ext, image_url=url, load_meta=load)


def _tar_samples(tars: list[str], prompts: str, s3_endpoint: str | None, summary: ConvertSummary,
                 limit: int | None) -> Iterator[Sample]:
    n = 0
    for tar in tars:
        for s in iter_shard_samples(tar, s3_endpoint=s3_endpoint):
            if is_damage_marker(s):
                summary.notes.append(s["error"])
                continue
            if s["error"] or s["json_bytes"] is None:
                summary.skip(f"{tar}:{s['key']}", s["error"] or "no per-image json")
                continue
            if limit is not None and n >= limit:
                return
            try:
                meta = sa1b_meta(json.loads(s["json_bytes"]), prompts=prompts)
            except (ValueError, KeyError, TypeError) as e:
                summary.skip(f"{tar}:{s['key']}", f"bad json: {e}")
                continue
            n += 1
            yield Sample(key=sample_key(s["key"].rsplit("/", 1)[-1]), image_ext=s["image_ext"], image=s["image_bytes"],
                         meta=meta)


def convert_sa1b(
    input: str,
    output: str,
    *,
    images_per_shard: int = 1000,
    prompts: str = "box",
    limit: int | None = None,
    workers: int = 4,
    s3_endpoint: str | None = None,
) -> ConvertSummary:
    """SA-1B folder of ``sa_*.jpg`` + ``sa_*.json`` (or tars of them) -> shards under ``output``."""
    if prompts not in PROMPT_MODES:
        raise ValueError(f"prompts={prompts!r}: choose one of {PROMPT_MODES}")
    summary = ConvertSummary()
    fs, path = io.get_filesystem(input, s3_endpoint=s3_endpoint)
    files = io.list_files(input, recursive=True, s3_endpoint=s3_endpoint) if fs.isdir(path) else []
    if any(image_extension(f) for f in files):
        samples = _folder_samples(sorted(files), prompts, s3_endpoint, summary, limit)
    else:
        samples = _tar_samples(list_shards(input, s3_endpoint=s3_endpoint), prompts, s3_endpoint, summary, limit)
    return write_shards(samples, output, images_per_shard=images_per_shard, workers=workers,
                        s3_endpoint=s3_endpoint, summary=summary)
