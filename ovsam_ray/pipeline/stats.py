"""Label statistics per shard and per run: class histogram, masks per image, score and area
distributions, empty-image and error counts. Written as ``<output>/_stats/<shard>.json`` and
``<output>/_stats.json`` (names starting with ``_`` stay invisible to Parquet readers)."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np

from ovsam_ray import io

SCORE_BINS = [i / 10 for i in range(11)]
AREA_BINS = [0, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, float("inf")]


def _histogram(values: list[float], bins: list[float]) -> list[int]:
    return np.histogram(np.asarray(values, np.float64), bins=np.asarray(bins, np.float64))[0].tolist()


def shard_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Statistics of one shard's output rows (``instances`` as lists of dicts)."""
    ok = [r for r in rows if r["status"] == "ok"]
    per_image = [len(r["instances"] or []) for r in ok]
    instances = [i for r in ok for i in (r["instances"] or [])]
    scores = [float(i["label_score"]) for i in instances]
    areas = [float(i["area"]) for i in instances]
    return {
        "images": len(rows),
        "images_ok": len(ok),
        "images_error": len(rows) - len(ok),
        "images_empty": sum(n == 0 for n in per_image),
        "masks": len(instances),
        "masks_per_image": dict(sorted(Counter(per_image).items())),
        "classes": dict(Counter(i["label"] for i in instances).most_common()),
        "score_bins": SCORE_BINS,
        "score_histogram": _histogram(scores, SCORE_BINS),
        "area_bins": AREA_BINS[:-1] + ["inf"],
        "area_histogram": _histogram(areas, AREA_BINS),
        "score_sum": float(sum(scores)),
        "area_sum": float(sum(areas)),
    }


def merge_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum shard statistics into run statistics (means derived from the sums)."""
    out: dict[str, Any] = {"shards": len(parts)}
    for key in ("images", "images_ok", "images_error", "images_empty", "masks", "score_sum", "area_sum"):
        out[key] = sum(p.get(key, 0) for p in parts)
    for key in ("masks_per_image", "classes"):
        total: Counter = Counter()
        for p in parts:
            total.update({str(k): v for k, v in p.get(key, {}).items()})
        if key == "classes":
            out[key] = dict(total.most_common())
        else:
            out[key] = dict(sorted(total.items(), key=lambda kv: int(kv[0])))
    for key, bins in (("score_histogram", "score_bins"), ("area_histogram", "area_bins")):
        hists = [p[key] for p in parts if key in p]
        out[key] = np.sum(hists, axis=0).astype(int).tolist() if hists else []
        out[bins] = parts[0][bins] if parts else []
    out["mean_masks_per_image"] = out["masks"] / max(out["images_ok"], 1)
    out["mean_score"] = out["score_sum"] / max(out["masks"], 1)
    out["mean_area"] = out["area_sum"] / max(out["masks"], 1)
    return out


def write_shard_stats(output: str, shard: str, stats: dict[str, Any], *, s3_endpoint: str | None) -> None:
    io.atomic_write_bytes(io.join(output, "_stats", f"{shard}.json"), json.dumps(stats).encode(),
                          s3_endpoint=s3_endpoint)


def write_run_stats(output: str, *, s3_endpoint: str | None) -> dict[str, Any]:
    """Merge every shard's statistics under ``output`` (this run's and earlier ones') into ``_stats.json``."""
    urls = io.list_files(io.join(output, "_stats"), suffix=".json", s3_endpoint=s3_endpoint)
    parts = [json.loads(io.read_bytes(u, s3_endpoint=s3_endpoint)) for u in urls]
    merged = merge_stats(parts)
    io.atomic_write_bytes(io.join(output, "_stats.json"), json.dumps(merged, indent=1).encode(),
                          s3_endpoint=s3_endpoint)
    return merged


def format_stats(stats: dict[str, Any], top: int = 10) -> str:
    classes = list(stats.get("classes", {}).items())[:top]
    return (f"label stats: {stats['images']} images ({stats['images_empty']} empty, {stats['images_error']} errors), "
            f"{stats['masks']} masks, {stats['mean_masks_per_image']:.2f} per image, mean score "
            f"{stats['mean_score']:.3f}, mean area {stats['mean_area']:.0f} px; top classes: "
            + ", ".join(f"{k} {v}" for k, v in classes))
