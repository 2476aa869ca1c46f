"""Detector results (COCO results json) -> shards whose JSON carries ``boxes``/``scores``/``labels``.

The results file is what detectors submit to COCO: a list of ``{"image_id", "category_id",
"bbox": [x, y, w, h], "score"}``. It names no image files, so a COCO-format json with the
``images`` (and ``categories``) is needed too; when that json also has ``annotations`` (a
validation set) they are kept as the ground truth that ``ovsam-ray eval --mode detector`` scores
against. Per image, detections are sorted by score (highest first), filtered by ``min_score`` and
cut to ``max_per_image``; images without detections are written too (they count in mask AP).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from pycocotools import mask as mask_utils

from ovsam_ray import storage
from ovsam_ray.convert.coco import coco_samples, load_json, read_coco, write_categories, write_samples
from ovsam_ray.convert.lvis import LVIS_IMAGE_FIELDS, lvis_image_path
from ovsam_ray.convert.mixed import TASK_IMAGES
from ovsam_ray.convert.records import (
    ConvertError,
    bbox_problem,
    id_problem,
    id_text,
    is_number,
    kind,
    segmentation_problem,
    shown,
)
from ovsam_ray.data.rle import annotation_rle
from ovsam_ray.data.tar_writer import ConvertSummary

__all__ = ["convert_detections", "detections_by_image"]


def _detection_problem(det: Any, names: dict[str, str]) -> str | None:
    """``names`` empty: the json has no categories, any ``category_id`` is kept as its label."""
    if not isinstance(det, dict):
        return f"a detection must be an object, not {kind(det)}"
    problem = id_problem(det.get("image_id"), "image_id") or id_problem(det.get("category_id"), "category_id")
    if problem is None and names and id_text(det["category_id"]) not in names:
        problem = f"category_id {shown(det['category_id'])} names no category"
    if problem is None and det.get("bbox") is None and det.get("segmentation") is not None:
        problem = segmentation_problem(det["segmentation"])
        if problem is None and not isinstance(det["segmentation"], dict):
            problem = "a detection without a bbox needs an RLE segmentation, not polygons"
    elif problem is None:
        problem = bbox_problem(det.get("bbox"))
    if problem is None and "score" in det and not is_number(det["score"]):
        problem = f"score {shown(det['score'])} is not a finite number"
    return problem


def _xywh(det: dict[str, Any]) -> list[float] | None:
    """The box of a checked detection (from its RLE when it has no bbox); None for an unreadable RLE."""
    if det.get("bbox") is not None:
        return [float(v) for v in det["bbox"]]
    height, width = det["segmentation"]["size"]
    rle = annotation_rle(det, height, width)
    return None if rle is None else mask_utils.toBbox({**rle, "counts": rle["counts"].encode("ascii")}).tolist()


def detections_by_image(
    results: list[Any],
    names: dict[str, str],
    *,
    min_score: float = 0.0,
    max_per_image: int | None = 100,
    summary: ConvertSummary | None = None,
) -> tuple[dict[str, dict[str, list]], int]:
    """Group results per image: ``{id_text(image_id): {"boxes": XYXY, "scores", "labels": names}}``,
    sorted by score (``names``: category name by id text). Returns it and the number of results dropped
    (below ``min_score`` or over the per-image cap); a malformed result is skipped and counted in
    ``summary.skipped_records["detections"]`` (in the dropped count when no summary is given)."""
    grouped: dict[str, list[tuple[float, list[float], str]]] = defaultdict(list)
    dropped = 0
    for i, det in enumerate(results):
        problem = _detection_problem(det, names)
        xywh = _xywh(det) if problem is None else None
        if xywh is None:
            if summary is None:
                dropped += 1
            else:
                summary.skip_record("detections", f"results[{i}]", problem or "segmentation is not a readable RLE")
            continue
        score = float(det.get("score", 1.0))
        if score < min_score:
            dropped += 1
            continue
        x, y, w, h = xywh
        label = names.get(id_text(det["category_id"]), str(det["category_id"]))
        grouped[id_text(det["image_id"])].append((score, [x, y, x + w, y + h], label))
    out: dict[str, dict[str, list[Any]]] = {}
    for image_id, dets in grouped.items():
        dets.sort(key=lambda d: -d[0])  # stable: equal scores keep file order
        if max_per_image is not None and len(dets) > max_per_image:
            dropped += len(dets) - max_per_image
            dets = dets[:max_per_image]
        out[image_id] = {"boxes": [d[1] for d in dets], "scores": [d[0] for d in dets], "labels": [d[2] for d in dets]}
    return out, dropped


def _results_list(results: Any, url: str) -> list[Any]:
    if isinstance(results, dict) and isinstance(results.get("annotations"), list):
        return results["annotations"]
    if not isinstance(results, list):
        raise ConvertError(
            f"{storage.safe_for_log(storage.redact(url))}: expected a COCO results list of detections, "
            f"got {kind(results)}"
        )
    return results


def convert_detections(
    results: str,
    annotations: str,
    images: str,
    output: str,
    *,
    min_score: float = 0.0,
    max_per_image: int | None = 100,
    keep_ground_truth: bool = True,
    images_per_shard: int = 1000,
    limit: int | None = None,
    workers: int = 4,
    order: str = "shuffled",
    seed: int = 0,
    ray_address: str | None = None,
    task_images: int = TASK_IMAGES,
    s3_endpoint: str | None = None,
) -> ConvertSummary:
    """COCO results json + the COCO/LVIS json naming its images + image folder -> shards. Malformed
    detections, images, annotations and categories are skipped and counted."""
    dets = _results_list(load_json(results, s3_endpoint=s3_endpoint), results)
    dataset = load_json(annotations, s3_endpoint=s3_endpoint)
    if not keep_ground_truth and isinstance(dataset, dict):
        dataset = {**dataset, "annotations": []}
    summary = ConvertSummary()
    records = read_coco(
        dataset, annotations, images, summary, image_path=lvis_image_path, image_fields=LVIS_IMAGE_FIELDS
    )
    grouped, dropped = detections_by_image(
        dets, records.names, min_score=min_score, max_per_image=max_per_image, summary=summary
    )
    known = {id_text(im["id"]) for im in dataset["images"] if isinstance(im, dict) and not id_problem(im.get("id"))}
    unknown = sum(len(v["boxes"]) for k, v in grouped.items() if k not in known)
    if dropped or unknown:
        summary.notes.append(
            f"dropped {dropped} detections (below min_score or over max_per_image)"
            f" and {unknown} on images not in {storage.redact(annotations)}"
        )
    empty: dict[str, list[Any]] = {"boxes": [], "scores": [], "labels": []}
    samples = coco_samples(
        records,
        images,
        prompts="none",
        image_fields=LVIS_IMAGE_FIELDS,
        limit=limit,
        extra=lambda image: grouped.get(id_text(image["id"]), empty),
    )
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
        options={
            "format": "detections",
            "results": results,
            "annotations": annotations,
            "images": images,
            "min_score": min_score,
            "max_per_image": max_per_image,
            "keep_ground_truth": keep_ground_truth,
            "limit": limit,
        },
        s3_endpoint=s3_endpoint,
    )
    write_categories(records.categories, output, s3_endpoint=s3_endpoint)
    return summary
