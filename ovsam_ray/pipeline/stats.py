"""Label statistics per shard and per run: class histogram, masks per image, score and area
distributions, empty-image and error counts. Written as ``<output>/_stats/<shard>.json`` and
``<output>/_stats.json`` (names starting with ``_`` stay invisible to Parquet readers)."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ovsam_ray import storage

SCORE_BINS = [i / 10 for i in range(11)]
AREA_BINS = [0, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, float("inf")]


def _histogram(values: np.ndarray, bins: list[float]) -> list[int]:
    return np.histogram(np.asarray(values, np.float64), bins=np.asarray(bins, np.float64))[0].tolist()


def shard_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Statistics of one shard's output rows (``instances`` as lists of dicts); see :func:`table_stats`."""
    if not rows:
        return table_stats(
            pa.table(
                {
                    "status": pa.array([], pa.string()),
                    "instances": pa.array(
                        [],
                        pa.list_(
                            pa.struct([("label", pa.string()), ("label_score", pa.float32()), ("area", pa.int64())])
                        ),
                    ),
                }
            )
        )
    return table_stats(pa.Table.from_pylist([{"status": r["status"], "instances": r["instances"] or []} for r in rows]))


def table_stats(table: pa.Table, *, members_skipped: dict[str, int] | None = None) -> dict[str, Any]:
    """Statistics of one shard's output table (``status``, ``instances`` columns; ``warnings`` and
    ``num_prompts`` when present), computed on the Arrow columns: image/error/empty counts,
    images with prompt warnings, without any prompt and with prompts whose every mask a filter
    removed (``images_all_filtered``), masks per image, class histogram
    (labelled instances), label-score and mask-area histograms and sums; ``members_skipped``:
    the reader's count of tar members that gave no row, per reason."""
    ok = table.filter(pc.equal(table["status"], "ok"))
    warned = no_prompts = filtered = 0
    if "warnings" in table.column_names:
        warned = int(pc.sum(pc.fill_null(pc.greater(pc.list_value_length(table["warnings"]), 0), False)).as_py() or 0)
    if "num_prompts" in table.column_names:
        no_prompts = int(pc.sum(pc.fill_null(pc.equal(ok["num_prompts"], 0), False)).as_py() or 0)
        emptied = pc.and_(
            pc.greater(ok["num_prompts"], 0), pc.equal(pc.list_value_length(ok["instances"]).fill_null(0), 0)
        )
        filtered = int(pc.sum(pc.fill_null(emptied, False)).as_py() or 0)
    per_image = pc.list_value_length(ok["instances"]).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    inst = pc.list_flatten(ok["instances"])
    n = len(inst)
    labels = pc.struct_field(inst, "label").to_pylist() if n else []
    scores = _non_null(pc.struct_field(inst, "label_score")) if n else np.zeros(0)
    areas = _non_null(pc.struct_field(inst, "area")) if n else np.zeros(0)
    counts = np.bincount(per_image) if len(per_image) else np.zeros(0, np.int64)
    return {
        "images": table.num_rows,
        "images_ok": ok.num_rows,
        "images_error": table.num_rows - ok.num_rows,
        "images_empty": int((per_image == 0).sum()),
        "images_with_warnings": warned,
        "images_no_prompts": no_prompts,
        "images_all_filtered": filtered,
        "members_skipped": dict(sorted((members_skipped or {}).items())),
        "masks": n,
        "masks_per_image": {int(k): int(v) for k, v in enumerate(counts) if v},
        "classes": dict(Counter(x for x in labels if x is not None).most_common()),
        "score_bins": SCORE_BINS,
        "score_histogram": _histogram(scores, SCORE_BINS),
        "area_bins": AREA_BINS[:-1] + ["inf"],
        "area_histogram": _histogram(areas, AREA_BINS),
        "score_sum": float(scores.sum()),
        "area_sum": float(areas.sum()),
    }


def _non_null(values: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return pc.drop_null(values).to_numpy(zero_copy_only=False).astype(np.float64)


def merge_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum shard statistics (or already merged ones, which count their ``shards``) into run
    statistics (means derived from the sums)."""
    out: dict[str, Any] = {"shards": sum(p.get("shards", 1) for p in parts)}
    for key in (
        "images",
        "images_ok",
        "images_error",
        "images_empty",
        "images_with_warnings",
        "images_no_prompts",
        "images_all_filtered",
        "masks",
        "score_sum",
        "area_sum",
    ):
        out[key] = sum(p.get(key, 0) for p in parts)
    for key in ("masks_per_image", "classes", "members_skipped"):
        total: Counter = Counter()
        for p in parts:
            total.update({str(k): v for k, v in p.get(key, {}).items()})
        if key == "classes":
            out[key] = dict(total.most_common())
        elif key == "members_skipped":
            out[key] = dict(sorted(total.items()))
        else:
            out[key] = dict(sorted(total.items(), key=lambda kv: int(kv[0])))
    for key, bins in (("score_histogram", "score_bins"), ("area_histogram", "area_bins")):
        hists = [p[key] for p in parts if p.get(key)]
        out[key] = np.sum(hists, axis=0).astype(int).tolist() if hists else []
        out[bins] = next((p[bins] for p in parts if p.get(bins)), [])
    out["mean_masks_per_image"] = out["masks"] / max(out["images_ok"], 1)
    out["mean_score"] = out["score_sum"] / max(out["masks"], 1)
    out["mean_area"] = out["area_sum"] / max(out["masks"], 1)
    return out


def write_shard_stats(output: str, shard: str, stats: dict[str, Any], *, s3_endpoint: str | None) -> None:
    storage.atomic_write_bytes(
        storage.join(output, "_stats", f"{shard}.json"), json.dumps(stats).encode(), s3_endpoint=s3_endpoint
    )


def write_run_stats(
    output: str, *, s3_endpoint: str | None, new: dict[str, Any] | None = None, committed: int | None = None
) -> dict[str, Any]:
    """Write ``_stats.json``: the statistics of every committed shard under ``output``.

    With ``new`` (this run's shards, merged) and ``committed`` (the shards committed in all), the
    previous ``_stats.json`` plus ``new`` when they add up to ``committed`` shards — no per-shard
    read, whatever the shard count; otherwise (no previous file, or a run stopped before writing
    it) every shard's statistics file is read and merged."""
    merged = None
    if new is not None and committed is not None:
        url = storage.join(output, "_stats.json")
        previous = (
            [json.loads(storage.read_bytes(url, s3_endpoint=s3_endpoint))]
            if storage.exists(url, s3_endpoint=s3_endpoint)
            else []
        )
        candidate = merge_stats(previous + [new])
        merged = candidate if candidate["shards"] == committed else None
    if merged is None:
        urls = storage.list_files(storage.join(output, "_stats"), suffix=".json", s3_endpoint=s3_endpoint)
        merged = merge_stats([json.loads(storage.read_bytes(u, s3_endpoint=s3_endpoint)) for u in urls])
    storage.atomic_write_bytes(
        storage.join(output, "_stats.json"), json.dumps(merged, indent=1).encode(), s3_endpoint=s3_endpoint
    )
    return merged


def format_stats(stats: dict[str, Any], top: int = 10) -> str:
    classes = list(stats.get("classes", {}).items())[:top]
    skipped = sum(stats.get("members_skipped", {}).values())
    return (
        f"label stats: {stats['images']} images ({stats['images_empty']} empty, {stats['images_error']} errors, "
        f"{stats.get('images_with_warnings', 0)} with prompt warnings, {stats.get('images_no_prompts', 0)} without "
        f"prompts, {stats.get('images_all_filtered', 0)} with every mask filtered out; {skipped} tar members "
        "skipped), "
        f"{stats['masks']} masks, {stats['mean_masks_per_image']:.2f} per image, mean score "
        f"{stats['mean_score']:.3f}, mean area {stats['mean_area']:.0f} px; top classes: "
        + ", ".join(f"{storage.safe_for_log(k, limit=60)} {v}" for k, v in classes)
    )  # names may come from shard JSON
