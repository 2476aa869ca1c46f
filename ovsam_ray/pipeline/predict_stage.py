"""The label job's model stage: an actor pool (model loaded once per actor; every image of a batch
embedded in one forward and all their prompts decoded together) that turns DECODED_SCHEMA rows
into RESULT_SCHEMA rows with typed ``instances``; and the zero-cost box-fill baseline that stands
in for the model when measuring the pipeline itself (``--baseline box-fill``).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from ovsam_ray import storage
from ovsam_ray.labels.records import InstanceColumns
from ovsam_ray.labels.schema import INSTANCE_TYPE
from ovsam_ray.pipeline.prompting import (
    ImagePromptSet,
    PromptSources,
    SelectConfig,
    image_prompt_set,
    select_with_reason,
)
from ovsam_ray.pipeline.stages import PASS_COLUMNS, image_of

log = logging.getLogger(__name__)

BASELINES = ("box-fill",)

#: What the model stage emits: the decoded row's identity + status + typed instances, the prompt
#: warnings of the decode stage (plus one when an image had no prompt at all; null for none) and
#: how many prompts the image had (null for error rows; for the statistics).
RESULT_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("index", pa.int32()),
        ("shard_total", pa.int32()),
        ("shard_damage", pa.string()),
        ("shard_skipped", pa.string()),
        ("image_id", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("instances", pa.list_(INSTANCE_TYPE)),
        ("warnings", pa.list_(pa.string())),
        ("num_prompts", pa.int32()),
    ]
)
#: The row warning of an image that had no prompt (its row has no instances).
NO_PROMPTS_WARNING = (
    "no prompts: the prompt sources gave none for this image (--prompts grid, detector:NAME or "
    "shard|grid label such images)"
)


def _reshape(values: list[float] | None, dim: int) -> list[list[float]]:
    if not values:
        return []
    return np.asarray(values, np.float32).reshape(-1, dim).tolist()


def prompt_sets(batch: pa.Table, rows: list[int], sources: PromptSources, grid_size: int) -> list[ImagePromptSet]:
    """The prompts of ``rows`` of a DECODED batch (plus the detector's columns when present)."""
    cols = {
        name: batch.column(name).to_pylist()
        for name in ("boxes", "box_scores", "box_labels", "points", "point_boxes", "width", "height")
    }
    det = {
        name: batch.column(name).to_pylist()
        for name in ("det_boxes", "det_scores", "det_labels", "det_masks")
        if name in batch.column_names
    }
    out = []
    for i in rows:
        spec: dict[str, Any] = {
            "boxes": _reshape(cols["boxes"][i], 4),
            "scores": [None if s is None or math.isnan(s) else s for s in cols["box_scores"][i] or []],
            "labels": cols["box_labels"][i] or [],
            "points": _reshape(cols["points"][i], 2),
            "point_boxes": _reshape(cols["point_boxes"][i], 4) if cols["point_boxes"][i] is not None else None,
        }
        if det:
            spec["detector"] = {
                "boxes": _reshape(det["det_boxes"][i], 4),
                "scores": det["det_scores"][i] or [],
                "labels": det["det_labels"][i] or [],
                **({"masks": det["det_masks"][i] or []} if "det_masks" in det else {}),
            }
        out.append(
            image_prompt_set(spec, sources, width=cols["width"][i], height=cols["height"][i], grid_size=grid_size)
        )
    return out


def result_table(
    batch: pa.Table,
    status: list[str],
    error: list[str | None],
    instances: pa.Array,
    sets: dict[int, ImagePromptSet],
    filtered: dict[int, str] | None = None,
) -> pa.Table:
    """RESULT_SCHEMA rows: ``batch``'s identity columns with the stage's status, error, instances;
    warnings and prompt counts from the decoded rows and ``sets`` (prompts of the ok rows), plus
    ``filtered``: the warning of each row whose masks a filter removed, by row."""
    warned = batch.column("prompt_warnings").to_pylist()
    for i, text in (filtered or {}).items():
        if status[i] == "ok":
            warned[i] = (warned[i] or []) + [text]
    num_prompts: list[int | None] = [None] * batch.num_rows
    for i, ps in sets.items():
        if status[i] == "ok":
            num_prompts[i] = len(ps.types)
            if not ps.types:
                warned[i] = (warned[i] or []) + [NO_PROMPTS_WARNING]
    arrays = [batch.column(c) for c in PASS_COLUMNS]
    arrays += [
        pa.chunked_array([a])
        for a in (
            pa.array(status, pa.string()),
            pa.array(error, pa.string()),
            instances,
            pa.array([w or None for w in warned], pa.list_(pa.string())),
            pa.array(num_prompts, pa.int32()),
        )
    ]
    names = list(PASS_COLUMNS) + ["status", "error", "instances", "warnings", "num_prompts"]
    return pa.Table.from_arrays(arrays, names=names).select(RESULT_SCHEMA.names).cast(RESULT_SCHEMA)


class PredictStage:
    """map_batches actor running OV-SAM on DECODED_SCHEMA batches (pyarrow batch format)."""

    def __init__(
        self,
        *,
        model_config: dict[str, Any],
        text: Any,
        with_embedding: bool = False,
        prompts: str = "shard",
        select: dict[str, Any] | None = None,
        device: str | None = None,
        cpu_threads: int | None = None,
        forward_batch: int = 8,
        fast: bool | None = None,
    ) -> None:
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
        # ``fast`` (bf16 autocast, channels_last, device RLE) defaults to CUDA; True runs it on a CPU.
        self.predictor = make_predictor(
            cfg, load_model(cfg), embeddings, self.vocab, self.device, fast=fast, rle_on_device=True if fast else None
        )
        self.predictor.half_embeddings = with_embedding
        self.with_embedding = with_embedding
        self.sources = PromptSources.parse(prompts)
        self.select = SelectConfig(**(select or {}))
        self.forward_batch = forward_batch
        log.info("model %s loaded on %s in %.1fs", cfg.preset, self.device, time.time() - t0)

    def __call__(self, batch: pa.Table) -> pa.Table:
        status = batch.column("status").to_pylist()
        error = batch.column("error").to_pylist()
        ok = [i for i, s in enumerate(status) if s == "ok"]
        sets = dict(zip(ok, prompt_sets(batch, ok, self.sources, self.select.grid_size)))
        results: dict = {}
        for start in range(0, len(ok), self.forward_batch):  # one forward per forward_batch images
            results.update(self._predict_or_isolate(batch, ok[start : start + self.forward_batch], sets))
        cols = InstanceColumns(self.vocab, with_embedding=self.with_embedding)
        filtered: dict[int, str] = {}
        for i in range(batch.num_rows):
            res = results.get(i)
            if isinstance(res, str):
                status[i], error[i] = "error", res
            if res is None or isinstance(res, str):
                cols.add_empty()
                continue
            pred, (keep, why) = res
            if why is not None:
                filtered[i] = why
            ps = sets[i]
            cols.add_prediction(
                pred,
                ps.prompts,
                types=ps.types,
                keep=keep,
                detector_scores=ps.detector_scores,
                detector_labels=ps.detector_labels,
                detector_masks=ps.detector_masks,
                sources=ps.sources,
            )
        return result_table(batch, status, error, cols.to_arrow(), sets, filtered)

    def _predict_or_isolate(self, batch: pa.Table, rows: list[int], sets: dict[int, ImagePromptSet]) -> dict:
        """Predict ``rows`` together; if that fails, each image alone, so that one bad image
        becomes one error row rather than a whole batch of them."""
        if not rows:
            return {}
        try:
            return self._predict(batch, rows, sets)
        except Exception as e:  # noqa: BLE001 - a failing batch is retried image by image
            if len(rows) == 1:
                log.exception(
                    "prediction failed for image %s", storage.safe_for_log(batch.column("key")[rows[0]].as_py())
                )
                return {rows[0]: f"prediction failed: {type(e).__name__}: {e}"}
            log.warning(
                "prediction failed for a batch of %d images (%s: %s); retrying each alone",
                len(rows),
                type(e).__name__,
                storage.safe_for_log(str(e)),
            )
        out: dict = {}
        for i in rows:
            out.update(self._predict_or_isolate(batch, [i], sets))
        return out

    def _predict(self, batch: pa.Table, rows: list[int], sets: dict[int, ImagePromptSet]) -> dict:
        images = [image_of(batch, i) for i in rows]
        sizes = [(batch.column("height")[i].as_py(), batch.column("width")[i].as_py()) for i in rows]
        preds = self.predictor.predict(
            self.predictor.embed(images, original_sizes=sizes), [sets[i].prompts for i in rows]
        )
        return {
            i: (pred, select_with_reason(pred, sets[i].types, self.select, tiers=sets[i].tiers))
            for i, pred in zip(rows, preds)
        }


class BoxFillStage:
    """The zero-cost baseline model (``--baseline box-fill``): each box prompt's mask is its box,
    each point prompt's its pixel, labelled with the prompt's own label (shard or detector). It
    runs in the model stage's place, so a job with it measures everything but the model."""

    def __init__(self, *, vocabulary: dict[str, Any], prompts: str = "shard", grid_size: int = 32) -> None:
        from ovsam_ray.vocabulary import Vocabulary

        self.vocab = Vocabulary.from_json(vocabulary)
        self.sources = PromptSources.parse(prompts)
        self.grid_size = grid_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        status = batch.column("status").to_pylist()
        ok = [i for i, s in enumerate(status) if s == "ok"]
        sets = dict(zip(ok, prompt_sets(batch, ok, self.sources, self.grid_size)))
        widths, heights = batch.column("width").to_pylist(), batch.column("height").to_pylist()
        cols = InstanceColumns(self.vocab)
        for i in range(batch.num_rows):
            ps = sets.get(i)
            if ps is None:
                cols.add_empty()
                continue
            cols.add_box_fill(
                ps.prompts.boxes,
                points=ps.prompts.points,
                height=heights[i],
                width=widths[i],
                types=ps.types,
                detector_scores=ps.detector_scores,
                detector_labels=ps.detector_labels,
                detector_masks=ps.detector_masks,
                sources=ps.sources,
            )
        return result_table(batch, status, batch.column("error").to_pylist(), cols.to_arrow(), sets)
