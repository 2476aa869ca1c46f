"""Label output -> Label Studio tasks with pre-annotations ("predictions"), one json, streamed.

Each ``ok`` row becomes a task ``{"data": {"image": <url>, "shard", "key", "image_id"},
"predictions": [{"model_version", "score", "result": [...]}]}``; each instance one
``polygonlabels`` result whose ``points`` are percentages of the image size (Label Studio's
convention), outlining the mask's largest part (see :mod:`ovsam_ray.export.polygons`), with the
top label and its probability as ``score``. The labelling config must have a ``<PolygonLabels
name=from_name toName=to_name>`` holding the labels. ``image_url`` is a template over
``shard``, ``key`` and ``image_id`` pointing where Label Studio can load the image.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from ovsam_ray.data.rle import decode_rle
from ovsam_ray.export.polygons import mask_to_polygons
from ovsam_ray.export.reader import iter_label_rows, open_output

__all__ = ["export_labelstudio", "labelstudio_task"]


def labelstudio_task(row: dict[str, Any], *, image_url: str = "{shard}/{key}.jpg", from_name: str = "label",
                     to_name: str = "image", model_version: str = "ovsam", tolerance: float = 1.0,
                     min_score: float = 0.0) -> dict[str, Any]:
    """One Label Studio task (with its prediction) for an ``ok`` label row."""
    width, height = int(row["width"]), int(row["height"])
    results = []
    for i, inst in enumerate(row["instances"] or []):
        score = float(inst.get("label_score") or 0.0)
        if score < min_score:
            continue
        polys = mask_to_polygons(decode_rle(inst["rle"]), tolerance=tolerance)
        if not polys:
            continue
        points = [[round(100.0 * x / width, 4), round(100.0 * y / height, 4)] for x, y in polys[0]]
        results.append({
            "id": f"{row['key']}_{i}", "type": "polygonlabels", "from_name": from_name, "to_name": to_name,
            "original_width": width, "original_height": height, "image_rotation": 0, "score": score,
            "value": {"points": points, "closed": True, "polygonlabels": [inst.get("label")]},
        })
    fields = {"shard": row["shard"], "key": row["key"], "image_id": row.get("image_id") or ""}
    mean = sum(r["score"] for r in results) / len(results) if results else 0.0
    return {"data": {"image": image_url.format(**fields), **fields},
            "predictions": [{"model_version": model_version, "score": mean, "result": results}]}


def export_labelstudio(labels: str, output: str, *, image_url: str = "{shard}/{key}.jpg", from_name: str = "label",
                       to_name: str = "image", model_version: str = "ovsam", tolerance: float = 1.0,
                       min_score: float = 0.0, s3_endpoint: str | None = None) -> dict[str, int]:
    """Write the tasks json ``output`` (a JSON list, streamed); returns counts."""
    stats = {"tasks": 0, "results": 0, "error_rows": 0}

    def tasks() -> Iterator[dict[str, Any]]:
        for row in iter_label_rows(labels, s3_endpoint=s3_endpoint):
            if row["status"] != "ok":
                stats["error_rows"] += 1
                continue
            task = labelstudio_task(row, image_url=image_url, from_name=from_name, to_name=to_name,
                                    model_version=model_version, tolerance=tolerance, min_score=min_score)
            stats["results"] += len(task["predictions"][0]["result"])
            yield task

    with open_output(output, "w", s3_endpoint=s3_endpoint) as f:
        f.write("[")
        for task in tasks():
            f.write(("," if stats["tasks"] else "") + "\n" + json.dumps(task, separators=(",", ":")))
            stats["tasks"] += 1
        f.write("\n]\n")
    return stats
