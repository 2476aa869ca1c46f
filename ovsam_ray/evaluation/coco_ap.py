"""Mask AP with detector boxes as prompts (the paper's Tables 2 and 4): pycocotools' COCOeval,
and LVIS AP through the ``lvis`` package when it is installed.

Ground truth and results are plain COCO dicts, so everything here is a thin, checked wrapper:
:func:`mask_ap` gives exactly what ``COCOeval(gt, gt.loadRes(results), "segm")`` gives.
"""

from __future__ import annotations

import contextlib
import copy
import io as _io
import json
import os
import tempfile
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np

from ovsam_ray.data.rle import rle_area
from ovsam_ray.errors import ConfigError
from ovsam_ray.labels.scores import LABEL_SOURCES, SCORE_MODES, instance_label, instance_score
from ovsam_ray.vocabulary import clean_class_name

__all__ = [
    "STAT_NAMES",
    "ap_markdown",
    "coco_dataset",
    "instance_results",
    "lvis_available",
    "lvis_mask_ap",
    "mask_ap",
]

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@contextlib.contextmanager
def _quiet() -> Any:
    # pycocotools prints progress and warns about NumPy 2's __array__ protocol on every call
    with contextlib.redirect_stdout(_io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def coco_dataset(
    images: list[dict[str, Any]], annotations: list[dict[str, Any]], categories: list[dict[str, Any]]
) -> dict[str, Any]:
    """A COCO ground-truth dict. Annotation ids are renumbered 1..N (COCOeval treats id 0 as
    "unmatched", and ids from different shards collide); missing ``iscrowd`` is 0, missing
    ``area`` the mask's area (RLE) or the box's."""
    anns = []
    for i, a in enumerate(annotations, start=1):
        ann = {**a, "id": i, "iscrowd": int(a.get("iscrowd") or 0)}
        if ann.get("area") is None:
            segm, box = ann.get("segmentation"), ann.get("bbox") or [0, 0, 0, 0]
            ann["area"] = rle_area(segm) if isinstance(segm, dict) else float(np.prod(box[2:]))
        anns.append(ann)
    return {"images": images, "annotations": anns, "categories": categories}


def _coco(dataset: dict[str, Any]) -> Any:
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = copy.deepcopy(dataset)
    with _quiet():
        coco.createIndex()
    return coco


def _load_results(gt: Any, results: list[dict[str, Any]]) -> Any:
    if results:
        with _quiet():
            return gt.loadRes(copy.deepcopy(results))
    # loadRes cannot take an empty list; no detections is a valid (all-zero) result
    return _coco({"images": gt.dataset["images"], "categories": gt.dataset["categories"], "annotations": []})


def mask_ap(
    gt: dict[str, Any], results: list[dict[str, Any]], *, cat_ids: Iterable[int] | None = None, max_dets: int = 100
) -> dict[str, float | None]:
    """COCOeval ``segm`` stats (:data:`STAT_NAMES`; AR over 1, 10 and ``max_dets`` detections)
    for ``results`` (COCO results: ``image_id``, ``category_id``, ``segmentation`` RLE, ``score``)
    against ``gt`` (:func:`coco_dataset`), optionally on a subset of categories. A stat that
    COCOeval cannot compute (no ground truth in the subset) is ``None``."""
    from pycocotools.cocoeval import COCOeval

    coco_gt = _coco(gt)
    coco_dt = _load_results(coco_gt, results)
    ev = COCOeval(coco_gt, coco_dt, "segm")
    ev.params.maxDets = [1, 10, max_dets]
    if cat_ids is not None:
        ev.params.catIds = sorted(set(cat_ids))
        if not ev.params.catIds:
            return dict.fromkeys(STAT_NAMES)
    with _quiet():
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: (None if v < 0 else float(v)) for name, v in zip(STAT_NAMES, ev.stats)}


def lvis_available() -> bool:
    try:
        import lvis  # noqa: F401
    except ImportError:
        return False
    return True


def lvis_mask_ap(gt: dict[str, Any], results: list[dict[str, Any]], *, max_dets: int = 300) -> dict[str, float] | None:
    """LVIS mask AP (AP, AP50, AP75, APs/m/l, APr/c/f) with the ``lvis`` package, or ``None``
    when it is not installed or ``gt`` lacks what LVIS needs (category ``frequency``)."""
    if not lvis_available() or not all("frequency" in c for c in gt.get("categories", [])):
        return None
    from lvis import LVIS, LVISEval, LVISResults

    dataset = copy.deepcopy(gt)
    for image in dataset["images"]:
        image.setdefault("neg_category_ids", [])
        image.setdefault("not_exhaustive_category_ids", [])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "gt.json")
        with open(path, "w") as f:
            json.dump(dataset, f)
        with _quiet():
            lvis_gt = LVIS(path)
            ev = LVISEval(lvis_gt, LVISResults(lvis_gt, copy.deepcopy(results), max_dets=max_dets), iou_type="segm")
            ev.run()
    return {k: float(v) for k, v in ev.get_results().items()}


def instance_results(
    instances: Iterable[dict[str, Any]],
    image_id: int,
    category_ids: dict[str, int],
    *,
    label_source: str = "ovsam",
    score: str = "auto",
) -> tuple[list[dict[str, Any]], int]:
    """COCO results for one image's label instances. ``category_ids`` maps class names (any case,
    ``_`` = space) to dataset category ids; an instance whose label is not there is dropped and
    counted. Returns the results and the number dropped."""
    if label_source not in LABEL_SOURCES or score not in SCORE_MODES:
        raise ConfigError(f"label_source must be one of {LABEL_SOURCES} and score one of {SCORE_MODES}")
    out, dropped = [], 0
    for inst in instances:
        name = instance_label(inst, label_source)
        cat = category_ids.get(clean_class_name(str(name))) if name is not None else None
        if cat is None:
            dropped += 1
            continue
        rle = inst["rle"]
        out.append(
            {
                "image_id": image_id,
                "category_id": cat,
                "score": instance_score(inst, label_source, score),
                "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"]},
            }
        )
    return out, dropped


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def ap_markdown(metrics: dict[str, dict[str, Any]]) -> str:
    """``{subset: stats}`` as a markdown table of mask AP (in %)."""
    cols = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    extra = [c for c in ("APr", "APc", "APf") if any(c in m for m in metrics.values())]
    lines = ["| subset | " + " | ".join(cols + tuple(extra)) + " |", "|---" * (1 + len(cols) + len(extra)) + "|"]
    for subset, m in metrics.items():
        lines.append(f"| {subset} | " + " | ".join(_pct(m.get(c)) for c in cols + tuple(extra)) + " |")
    return "\n".join(lines) + "\n"
