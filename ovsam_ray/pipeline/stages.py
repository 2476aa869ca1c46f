"""The label job's stages as Ray Data callables: read (one shard per task) -> decode + resize
(CPU tasks) -> predict (actor pool: model loaded once per actor) -> rows for the committer.

Rows between stages hold only scalars, strings and bytes (no tensor extension types), so any
image size and prompt count travels the same way. Errors are data: a row whose ``status`` is
"error" carries its message to the output.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from typing import Any

import numpy as np
import pandas as pd
import torch

from ovsam_ray.data.decode import DEFAULT_MAX_PIXELS, decode_sample
from ovsam_ray.data.shards import read_shard, shard_name
from ovsam_ray.model.functional import resize_image
from ovsam_ray.pipeline.prompting import PromptSources, SelectConfig, image_prompt_set, select_predictions
from ovsam_ray.records import prediction_to_instances

log = logging.getLogger(__name__)

# Marker rows for whole-shard events (no image): an unreadable shard, an empty one.
SHARD_FAILED = "shard_failed"
SHARD_EMPTY = "shard_empty"
# I/O errors (a storage outage, a dropped connection) are retried with exponential backoff.
READ_ATTEMPTS = 4
READ_BACKOFF_S = 1.0


def read_shard_rows(item: dict[str, Any], *, s3_endpoint: str | None = None) -> list[dict[str, Any]]:
    """flat_map: one shard URL -> one row per sample (raw bytes), numbered in shard order.

    A damaged tar yields the samples read before the damage, each carrying ``shard_damage``;
    a shard with nothing readable yields one SHARD_FAILED row, an empty shard one SHARD_EMPTY row.
    """
    url = item["url"]
    name = shard_name(url)
    read, damage = None, None
    for attempt in range(READ_ATTEMPTS):
        try:
            read = read_shard(url, s3_endpoint=s3_endpoint)
        except Exception as e:  # noqa: BLE001 - a shard we cannot open is reported, never fatal
            damage = f"{type(e).__name__}: {e}"
            log.warning("reading shard %s failed (attempt %d/%d): %s", url, attempt + 1, READ_ATTEMPTS, damage)
            if attempt + 1 < READ_ATTEMPTS:
                time.sleep(READ_BACKOFF_S * 2**attempt)
        else:
            damage = read.damage
            break
    samples = read.samples if read is not None else []
    if not samples:
        kind = SHARD_FAILED if damage else SHARD_EMPTY
        return [_marker_row(name, url, kind, damage or "")]
    total = len(samples)
    return [
        {
            "key": s["key"],
            "shard": name,
            "shard_url": url,
            "index": i,
            "shard_total": total,
            "shard_damage": damage or "",
            "image_bytes": s.get("image_bytes") or b"",
            "json_bytes": s.get("json_bytes") if s.get("json_bytes") is not None else b"",
            "has_json": s.get("json_bytes") is not None,
            "error": s.get("error") or "",
        }
        for i, s in enumerate(samples)
    ]


def _marker_row(name: str, url: str, kind: str, message: str) -> dict[str, Any]:
    return {"key": "", "shard": name, "shard_url": url, "index": -1, "shard_total": 0, "shard_damage": message,
            "image_bytes": b"", "json_bytes": b"", "has_json": False, "error": kind}


def _prompts_json(prompts: Any) -> str:
    pb = prompts.point_boxes
    return json.dumps(
        {
            "boxes": prompts.boxes.tolist(),
            "scores": [None if np.isnan(s) else float(s) for s in prompts.box_scores],
            "labels": list(prompts.box_labels),
            "points": prompts.points.tolist(),
            "point_boxes": None if pb is None else [[None if np.isnan(v) else v for v in row] for row in pb.tolist()],
            "warnings": list(prompts.warnings),
        }
    )


def decode_batch(batch: pd.DataFrame, *, image_size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> pd.DataFrame:
    """map_batches (CPU tasks): bytes -> decoded, resized uint8 image bytes + prompts JSON."""
    return pd.DataFrame([_decode_row(row, image_size, max_pixels) for row in batch.to_dict("records")])


def _decode_row(row: dict[str, Any], image_size: int, max_pixels: int) -> dict[str, Any]:
    base = {k: row[k] for k in ("key", "shard", "index", "shard_total", "shard_damage")}
    empty = {"width": -1, "height": -1, "in_h": 0, "in_w": 0, "image": b"", "prompts": "{}", "image_id": ""}
    if row["index"] < 0:  # whole-shard marker
        return {**base, **empty, "status": row["error"], "error": row["shard_damage"]}
    sample = {
        "key": row["key"],
        "shard": row["shard"],
        "image_bytes": row["image_bytes"],
        "json_bytes": row["json_bytes"] if row["has_json"] else None,
        "error": row["error"] or None,
    }
    try:
        decoded = decode_sample(sample, max_pixels=max_pixels)
    except Exception as e:  # noqa: BLE001 - decode_sample should not raise; never crash the job
        return {**base, **empty, "status": "error", "error": f"decode failed: {type(e).__name__}: {e}"}
    if not decoded.ok:
        return {**base, **empty, "status": "error", "error": decoded.error}
    resized = resize_image(torch.from_numpy(decoded.image), image_size).numpy()
    return {
        **base,
        "width": decoded.width,
        "height": decoded.height,
        "in_h": int(resized.shape[0]),
        "in_w": int(resized.shape[1]),
        "image": np.ascontiguousarray(resized).tobytes(),
        "prompts": _prompts_json(decoded.prompts),
        "image_id": decoded.prompts.image_id or "",
        "status": "ok",
        "error": "",
    }


OUTPUT_COLUMNS = ("key", "shard", "index", "shard_total", "shard_damage", "image_id", "width", "height",
                  "status", "error", "instances")


class PredictStage:
    """map_batches actor: the model is loaded once per actor; every image of a batch is embedded
    in one forward and all their prompts decoded together. Emits committer rows with
    ``instances`` as a JSON string."""

    def __init__(self, *, model_config: dict[str, Any], text: Any, with_embedding: bool = False,
                 prompts: str = "shard", select: dict[str, Any] | None = None, device: str | None = None,
                 cpu_threads: int | None = None) -> None:
        import ray

        from ovsam_ray.inference import ModelConfig, load_model, make_predictor
        from ovsam_ray.vocabulary import Vocabulary

        if isinstance(text, ray.ObjectRef):
            text = ray.get(text)
        cfg = ModelConfig(**model_config)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cpu" and cpu_threads:
            # Ray pins an actor to OMP_NUM_THREADS=num_cpus (1); a CPU-only pool is the model's
            # whole compute, so let torch use the cores meant for it (decode tasks are light).
            torch.set_num_threads(cpu_threads)
        t0 = time.time()
        self.vocab = Vocabulary.from_json(text["vocabulary"])
        with warnings.catch_warnings():  # a read-only view of the object store's shared copy
            warnings.simplefilter("ignore", UserWarning)
            embeddings = torch.as_tensor(text["embeddings"])
        # On CUDA (rle_on_device's default) masks leave the GPU as run lengths, never full size; a
        # CPU actor keeps full masks, as pycocotools' C encoder beats torch's CPU kernels there.
        self.predictor = make_predictor(cfg, load_model(cfg), embeddings, self.vocab, self.device)
        self.predictor.half_embeddings = with_embedding
        self.with_embedding = with_embedding
        self.sources = PromptSources.parse(prompts)
        self.select = SelectConfig(**(select or {}))
        log.info("model %s loaded on %s in %.1fs", cfg.preset, self.device, time.time() - t0)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = batch.to_dict("records")
        ok = [r for r in rows if r["status"] == "ok"]
        results: dict[int, list[dict[str, Any]] | str] = {}
        if ok:
            try:
                results = self._predict(ok)
            except Exception as e:  # noqa: BLE001 - a failing batch becomes error rows
                log.exception("prediction failed for a batch of %d images", len(ok))
                results = {id(r): f"prediction failed: {type(e).__name__}: {e}" for r in ok}
        out = []
        for r in rows:
            res = results.get(id(r))
            status, error, instances = r["status"], r["error"], "[]"
            if isinstance(res, str):
                status, error = "error", res
            elif res is not None:
                instances = json.dumps(res)
            out.append({**{k: r[k] for k in OUTPUT_COLUMNS if k in r}, "status": status, "error": error,
                        "instances": instances})
        return pd.DataFrame(out, columns=list(OUTPUT_COLUMNS))

    def _predict(self, rows: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
        images = [np.frombuffer(r["image"], np.uint8).reshape(r["in_h"], r["in_w"], 3).copy() for r in rows]
        sets = [
            image_prompt_set(json.loads(r["prompts"]), self.sources, width=int(r["width"]), height=int(r["height"]),
                             grid_size=self.select.grid_size)
            for r in rows
        ]
        sizes = [(int(r["height"]), int(r["width"])) for r in rows]
        preds = self.predictor.predict(self.predictor.embed(images, original_sizes=sizes), [s.prompts for s in sets])
        out = {}
        for r, ps, pred in zip(rows, sets, preds):
            keep = select_predictions(pred, ps.types, self.select)
            out[id(r)] = prediction_to_instances(
                pred, ps.prompts, self.vocab, types=ps.types, keep=keep, detector_scores=ps.detector_scores,
                detector_labels=ps.detector_labels, with_embedding=self.with_embedding,
            )
        return out
