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

from collections.abc import Iterator
from typing import Any

from ovsam_ray import storage
from ovsam_ray.convert.mixed import TASK_IMAGES, check_order, unit, write_mixed
from ovsam_ray.convert.records import (
    ConvertError,
    all_numbers,
    bbox_problem,
    id_problem,
    is_number,
    kind,
    load_json,
    name_problem,
    parse_json,
    segmentation_problem,
    shown,
    side_problem,
)
from ovsam_ray.data.gt_prompts import PROMPT_MODES, gt_prompts
from ovsam_ray.data.shards import is_damage_marker, iter_shard_samples, list_shards
from ovsam_ray.data.tar_writer import ConvertSummary, Sample, image_extension, sample_key, write_shards
from ovsam_ray.errors import ConfigError

__all__ = ["convert_sa1b", "sa1b_meta"]

_KEPT = ("id", "segmentation", "bbox", "area", "predicted_iou", "point_coords", "stability_score", "crop_box")


def _record_problem(record: Any) -> str | None:
    """The per-image json as a whole: an ``image`` object with usable id and size, an ``annotations`` list."""
    if not isinstance(record, dict) or not isinstance(record.get("image"), dict):
        got = kind(record) if not isinstance(record, dict) else f"'image' {kind(record.get('image'))}"
        return f"not an SA-1B image json (expected an 'image' object, got {got})"
    image = record["image"]
    problem = id_problem(image["image_id"], "image_id") if image.get("image_id") is not None else None
    for side in ("width", "height"):
        if problem is None and image.get(side) is not None:
            problem = side_problem(image[side], side)
    if problem is None and image.get("file_name") is not None:
        problem = name_problem(image["file_name"], "file_name")
    if problem is None and record.get("annotations") is not None and not isinstance(record["annotations"], list):
        problem = f"'annotations' must be a list, not {kind(record['annotations'])}"
    return problem


def _points_problem(value: Any) -> str | None:
    if isinstance(value, list) and all(isinstance(p, list) and len(p) == 2 and all_numbers(p) for p in value):
        return None
    return "point_coords must be a list of [x, y] finite numbers"


def _annotation_problem(ann: Any) -> str | None:
    if not isinstance(ann, dict):
        return f"an annotation must be an object, not {kind(ann)}"
    checks = (
        ("id", lambda v: id_problem(v, "id")),
        ("segmentation", segmentation_problem),
        ("bbox", bbox_problem),
        ("crop_box", lambda v: bbox_problem(v, "crop_box")),
        ("point_coords", _points_problem),
    )
    problem = next((p for k, check in checks if k in ann and (p := check(ann[k]))), None)
    for k in ("area", "predicted_iou", "stability_score"):
        if problem is None and k in ann and not is_number(ann[k]):
            problem = f"{k} {shown(ann[k])} is not a finite number"
    return problem


def _size(image: dict[str, Any], anns: list[dict[str, Any]]) -> tuple[int, int] | None:
    """(height, width) from the image record, else from an annotation's RLE."""
    if image.get("height") is not None and image.get("width") is not None:
        return image["height"], image["width"]
    for a in anns:
        if isinstance(a.get("segmentation"), dict):
            return tuple(a["segmentation"]["size"])
    return None


def sa1b_meta(
    record: Any, *, prompts: str = "box", summary: ConvertSummary | None = None, where: str = ""
) -> dict[str, Any]:
    """DESIGN §4 JSON from one SA-1B per-image json (``{"image": ..., "annotations": [...]}``).
    A malformed annotation is left out (counted in ``summary`` as ``where: annotations[i]``); an
    unusable record raises :class:`ConvertError`."""
    problem = _record_problem(record)
    if problem:
        raise ConvertError(f"{where}: {problem}" if where else problem)
    image, anns = record["image"], []
    for i, a in enumerate(record.get("annotations") or []):
        problem = _annotation_problem(a)
        if problem is None:
            anns.append({**{k: a[k] for k in _KEPT if k in a}, "iscrowd": 0})
        elif summary is not None:
            summary.skip_record("annotations", f"{where}: annotations[{i}]", problem)
        else:
            raise ConvertError(f"{where}: annotations[{i}]: {problem}")
    meta = {
        "image_id": image.get("image_id"),
        "file_name": image.get("file_name"),
        "width": image.get("width"),
        "height": image.get("height"),
        "annotations": anns,
    }
    if prompts != "none" and anns:
        size = _size(image, anns)
        if size is None and prompts != "box":
            raise ConvertError(f"{where}: no image size (width/height or an RLE size) for point prompts")
        height, width = size or (1, 1)  # box prompts need no size
        meta.update(gt_prompts(anns, height=height, width=width, mode=prompts))
    return meta


def _key(path: str) -> str | None:
    try:
        return sample_key(path.rsplit("/", 1)[-1])
    except ValueError:  # a name with no letter or digit
        return None


def _pairs(files: list[str], summary: ConvertSummary) -> list[tuple[str, str, str]]:
    """(image URL, its json's URL, key) of every image with a per-image json beside it, in name order."""
    jsons = {f[: -len(".json")] for f in files if f.endswith(".json")}
    out = []
    for url in files:
        ext = image_extension(url)
        if ext is None:
            continue
        stem = url.rsplit(".", 1)[0]
        if stem not in jsons:
            summary.skip(url, "no per-image json next to it")
            continue
        key = _key(stem)
        if key is None:
            summary.skip(url, "its name gives no usable sample key")
            continue
        out.append((url, stem + ".json", key))
    return out


def _pair_samples(
    pairs: list[tuple[str, str, str]], prompts: str, s3_endpoint: str | None, summary: ConvertSummary
) -> Iterator[Sample]:
    for url, json_url, key in pairs:

        def load(json_url: str = json_url) -> dict[str, Any]:
            # read where the image is written: a ConvertError (a ValueError) skips the image with its reason
            return sa1b_meta(
                load_json(json_url, s3_endpoint=s3_endpoint),
                prompts=prompts,
                summary=summary,
                where=storage.redact(json_url),
            )

        yield Sample(key=key, image_ext=image_extension(url) or "jpg", image_url=url, load_meta=load)


def _one_tar(tar: str, prompts: str, s3_endpoint: str | None, summary: ConvertSummary) -> Iterator[Sample]:
    for s in iter_shard_samples(tar, s3_endpoint=s3_endpoint):
        if is_damage_marker(s):
            summary.notes.append(s["error"])
            continue
        where = f"{storage.redact(tar)}:{s['key']}"
        if s["error"] or s["json_bytes"] is None:
            summary.skip(where, s["error"] or "no per-image json")
            continue
        key = _key(s["key"])
        if key is None:
            summary.skip(where, "its name gives no usable sample key")
            continue
        try:
            meta = sa1b_meta(parse_json(s["json_bytes"], where), prompts=prompts, summary=summary, where=where)
        except ConvertError as e:
            summary.skip(where, str(e))
            continue
        yield Sample(key=key, image_ext=s["image_ext"], image=s["image_bytes"], meta=meta)


def _limited(samples: Iterator[Sample], limit: int | None) -> Iterator[Sample]:
    for n, sample in enumerate(samples):
        if limit is not None and n >= limit:
            return
        yield sample


def _tar_samples(
    tars: list[str], prompts: str, s3_endpoint: str | None, summary: ConvertSummary, limit: int | None
) -> Iterator[Sample]:
    return _limited((s for tar in tars for s in _one_tar(tar, prompts, s3_endpoint, summary)), limit)


def _file_size(url: str, s3_endpoint: str | None) -> int:
    fs, path = storage.get_filesystem(url, s3_endpoint=s3_endpoint)
    return int(fs.size(path) or 0)


def convert_sa1b(
    input: str,
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
    """SA-1B folder of ``sa_*.jpg`` + ``sa_*.json`` (or tars of them) -> shards under ``output``.
    ``order``: ``shuffled`` (mixed shards; ``seed``, ``ray_address``, ``task_images``:
    :func:`~ovsam_ray.convert.mixed.write_mixed`) or ``source`` (name order)."""
    check_order(order)
    if prompts not in PROMPT_MODES:
        raise ConfigError(f"prompts={prompts!r}: choose one of {PROMPT_MODES}")
    summary = ConvertSummary()
    fs, path = storage.get_filesystem(input, s3_endpoint=s3_endpoint)
    files = storage.list_files(input, recursive=True, s3_endpoint=s3_endpoint) if fs.isdir(path) else []
    folder = any(image_extension(f) for f in files)
    pairs = _pairs(sorted(files), summary) if folder else []
    tars = [] if folder else list_shards(input, s3_endpoint=s3_endpoint)
    if order == "source":
        samples = (
            _limited(_pair_samples(pairs, prompts, s3_endpoint, summary), limit)
            if folder
            else _tar_samples(tars, prompts, s3_endpoint, summary, limit)
        )
        return write_shards(
            samples,
            output,
            images_per_shard=images_per_shard,
            workers=workers,
            s3_endpoint=s3_endpoint,
            summary=summary,
        )
    if folder:
        chunks = [pairs[i : i + 1000] for i in range(0, len(pairs), 1000)]
        units = [
            unit(f"pairs-{i:06d}", _pair_samples, c, prompts, s3_endpoint, count=len(c)) for i, c in enumerate(chunks)
        ]
    else:
        units = [unit(t, _one_tar, t, prompts, s3_endpoint, size=_file_size(t, s3_endpoint)) for t in tars]
    return write_mixed(
        units,
        output,
        images_per_shard=images_per_shard,
        seed=seed,
        limit=limit,
        workers=workers,
        ray_address=ray_address,
        task_images=task_images,
        options={"format": "sa1b", "input": input, "prompts": prompts},
        s3_endpoint=s3_endpoint,
        summary=summary,
    )
