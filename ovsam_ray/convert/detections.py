"""Detector results (COCO results json) -> shards whose JSON carries ``boxes``/``scores``/``labels``.

The results file is what detectors submit to COCO: a list of ``{"image_id", "category_id",
"bbox": [x, y, w, h], "score"}``. It names no image files, so a COCO-format json with the
``images`` (and ``categories``) is needed too; when that json also has ``annotations`` (a
validation set) they are kept as the ground truth that ``ovsam-ray eval --mode detector`` scores
against. Per image, detections are sorted by score (highest first), filtered by ``min_score`` and
cut to ``max_per_image``; images without detections are written too (they count in mask AP).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from pycocotools import mask as mask_utils

from ovsam_ray import io
from ovsam_ray.convert.coco import _check_dataset, coco_samples, load_json, write_categories
from ovsam_ray.convert.lvis import LVIS_IMAGE_FIELDS, lvis_image_path
from ovsam_ray.convert.writer import ConvertSummary, write_shards

__all__ = ["convert_detections", "detections_by_image"]


def _xywh(det: dict[str, Any]) -> list[float] | None:
    bbox = det.get("bbox")
    if bbox is None and isinstance(det.get("segmentation"), dict):
        segm = dict(det["segmentation"])
        if isinstance(segm.get("counts"), str):
            segm["counts"] = segm["counts"].encode("ascii")
        bbox = mask_utils.toBbox(segm).tolist()
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return None
    values = [float(v) for v in bbox]
    return values if all(math.isfinite(v) for v in values) else None


def detections_by_image(
    results: list[dict[str, Any]],
    names: dict[Any, str],
    *,
    min_score: float = 0.0,
    max_per_image: int | None = 100,
) -> tuple[dict[Any, dict[str, list]], int]:
    """Group results per image: ``{image_id: {"boxes": XYXY, "scores", "labels": names}}``, sorted
    by score; returns it and the number of results dropped (below ``min_score``, over the per-image
    cap, or without a usable box)."""
    grouped: dict[Any, list[tuple[float, list[float], str]]] = defaultdict(list)
    dropped = 0
    for det in results:
        xywh = _xywh(det)
        score = float(det.get("score", 1.0))
        if xywh is None or not math.isfinite(score) or score < min_score:
            dropped += 1
            continue
        x, y, w, h = xywh
        label = names.get(det.get("category_id"), str(det.get("category_id")))
        grouped[det.get("image_id")].append((score, [x, y, x + w, y + h], label))
    out = {}
    for image_id, dets in grouped.items():
        dets.sort(key=lambda d: -d[0])  # stable: equal scores keep file order
        if max_per_image is not None and len(dets) > max_per_image:
            dropped += len(dets) - max_per_image
            dets = dets[:max_per_image]
        out[image_id] = {"boxes": [d[1] for d in dets], "scores": [d[0] for d in dets],
                         "labels": [d[2] for d in dets]}
    return out, dropped


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
    s3_endpoint: str | None = None,
) -> ConvertSummary:
    """COCO results json + the COCO/LVIS json naming its images + image folder -> shards."""
    dets = load_json(results, s3_endpoint=s3_endpoint)
    if isinstance(dets, dict) and isinstance(dets.get("annotations"), list):
        dets = dets["annotations"]
    if not isinstance(dets, list):
        raise ValueError(f"{io.redact(results)}: expected a COCO results list of detections")
    dataset = load_json(annotations, s3_endpoint=s3_endpoint)
    _check_dataset(dataset, annotations)
    if not keep_ground_truth:
        dataset = {**dataset, "annotations": []}
    names = {c["id"]: c["name"] for c in dataset.get("categories") or []}
    grouped, dropped = detections_by_image(dets, names, min_score=min_score, max_per_image=max_per_image)
    known = {im.get("id") for im in dataset["images"]}
    unknown = sum(len(v["boxes"]) for k, v in grouped.items() if k not in known)
    summary = ConvertSummary()
    if dropped or unknown:
        summary.notes.append(f"dropped {dropped} detections (below min_score, over max_per_image or without a box)"
                             f" and {unknown} on images not in {io.redact(annotations)}")
    empty = {"boxes": [], "scores": [], "labels": []}
    samples = coco_samples(dataset, images, prompts="none", image_path=lvis_image_path,
                           image_fields=LVIS_IMAGE_FIELDS, limit=limit, summary=summary,
                           extra=lambda image: grouped.get(image.get("id"), empty))
    summary = write_shards(samples, output, images_per_shard=images_per_shard, workers=workers,
                           s3_endpoint=s3_endpoint, summary=summary)
    write_categories(dataset, output, s3_endpoint=s3_endpoint)
    return summary
