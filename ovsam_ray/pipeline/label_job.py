"""The label job (DESIGN §4): WebDataset shards in, one committed Parquet file per shard out.

list shards -> skip committed -> read (one task per shard) -> decode + resize (CPU tasks) ->
predict (actor pool) -> the driver gathers each shard's rows and commits them atomically once
all of them arrived. Every input image becomes exactly one row; a rerun with the same
arguments skips committed shards; a different model/vocabulary is refused unless ``overwrite``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray

from ovsam_ray import __version__, io
from ovsam_ray.data.decode import DEFAULT_MAX_PIXELS
from ovsam_ray.data.shards import list_shards, shard_name
from ovsam_ray.inference import ModelConfig, load_model, vocabulary_text
from ovsam_ray.model.presets import IMAGE_SIZES
from ovsam_ray.pipeline.detectors import DetectorStage
from ovsam_ray.pipeline.progress import JobProgress
from ovsam_ray.pipeline.prompting import PromptSources, SelectConfig
from ovsam_ray.pipeline.stages import SHARD_EMPTY, SHARD_FAILED, PredictStage, decode_batch, read_shard_rows
from ovsam_ray.pipeline.stats import format_stats, shard_stats, write_run_stats, write_shard_stats
from ovsam_ray.pipeline.writer import RunRecord, ShardCommitter, check_or_write_run_record, rows_to_table

log = logging.getLogger(__name__)

# The driver's commits are retried on top of the S3 client's own retries (which ride out ~9 s), so
# that a short object-store outage costs time, not the job; a longer one ends it with a clear error.
COMMIT_ATTEMPTS = 3
COMMIT_BACKOFF_S = 2.0


class StorageUnavailableError(RuntimeError):
    """The output storage stayed unreachable through every retry of a shard's commit."""


@dataclass
class LabelConfig:
    """Settings of one label run; CLI flags map one to one onto fields.

    batch_size: images per model forward; concurrency: model actors (n or (min, max));
    num_gpus: GPUs per actor (0 on CPU-only machines: the same pool runs on CPUs);
    limit: label at most this many not-yet-committed shards (a trial run);
    max_error_fraction: error rows / images above which the job exits non-zero.
    """

    input: str
    output: str
    model: ModelConfig = field(default_factory=ModelConfig)
    batch_size: int = 4
    concurrency: int | tuple[int, int] = 1
    num_gpus: float = 0.0
    num_cpus_per_actor: float = 1.0
    decode_batch_size: int = 8
    overwrite: bool = False
    max_error_fraction: float = 0.0
    limit: int | None = None
    with_embedding: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    progress_interval_s: float = 10.0
    prompts: str = "shard"
    select: SelectConfig = field(default_factory=SelectConfig)
    detector_weights: str | None = None
    detector_score_threshold: float = 0.3
    detector_nms_iou: float = 0.5
    detector_max_per_image: int = 100
    detector_num_gpus: float = 0.0
    detector_concurrency: int = 1
    detector_batch_size: int = 4

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: must be >= 1 (images per model forward)")
        if not 0.0 <= self.max_error_fraction <= 1.0:
            raise ValueError(f"max_error_fraction={self.max_error_fraction}: must be within [0, 1]")
        if self.num_gpus < 0:
            raise ValueError(f"num_gpus={self.num_gpus}: must be >= 0 (0 = run the model actors on CPUs)")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit={self.limit}: must be >= 1 shard, or None for all")
        conc = self.concurrency if isinstance(self.concurrency, tuple) else (self.concurrency, self.concurrency)
        if not 1 <= conc[0] <= conc[1]:
            raise ValueError(f"concurrency={self.concurrency}: need 1 <= min <= max actors")
        if self.input.rstrip("/") == self.output.rstrip("/"):
            raise ValueError("output must differ from input")
        self.sources = PromptSources.parse(self.prompts)


@dataclass
class LabelSummary:
    shards_total: int = 0
    shards_skipped: int = 0
    shards_committed: int = 0
    shards_failed: list[dict[str, str]] = field(default_factory=list)
    shards_damaged: list[dict[str, str]] = field(default_factory=list)
    images_ok: int = 0
    images_error: int = 0
    masks: int = 0
    wall_time_s: float = 0.0
    random_init: bool = False
    text_embeddings: dict[str, Any] = field(default_factory=dict)

    @property
    def images(self) -> int:
        return self.images_ok + self.images_error

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_time_s if self.wall_time_s > 0 else 0.0

    def failed(self, max_error_fraction: float) -> bool:
        """True when the job should exit non-zero."""
        broken_shards = len(self.shards_failed) + len(self.shards_damaged)
        fraction = self.images_error / max(self.images, 1)
        return fraction > max_error_fraction or (broken_shards > 0 and max_error_fraction < 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "images": self.images, "images_per_s": round(self.images_per_s, 3)}


def _run_record(cfg: LabelConfig, identity_model: dict, vocab: Any) -> RunRecord:
    m = cfg.model
    identity = {
        "model": identity_model,
        "vocabulary": {"name": vocab.name, "sha256": vocab.sha256, "num_classes": vocab.num_classes},
        "class_embeddings": m.class_embeddings,
        "thresholds": {"mask_logit": 0.0, "alpha": 0.1, "beta": 0.9, "topk": m.topk},
        "with_embedding": cfg.with_embedding,
        "prompts": cfg.prompts,
        "select": dataclasses.asdict(cfg.select),
        "detector": None if not cfg.sources.detector else {
            "score_threshold": cfg.detector_score_threshold, "nms_iou": cfg.detector_nms_iou,
            "max_per_image": cfg.detector_max_per_image},
    }
    details = {"config": io.redact_config(dataclasses.asdict(cfg)), "code_version": __version__,
               "random_init": m.random_init}
    return RunRecord(identity=identity, details=details)


def _text_source(model_cfg: ModelConfig, random_init: bool) -> str:
    if model_cfg.class_embeddings:
        return "class-embeddings file"
    return "CLIP text tower, no cache (random init)" if random_init else "text-embedding cache or CLIP text tower"


def _text_task(model_cfg: ModelConfig, device: str) -> tuple[dict, Any, dict, dict]:
    """(text payload, vocabulary, model identity, how the embeddings were made)."""
    loaded = load_model(model_cfg)
    t0 = time.perf_counter()
    text, vocab = vocabulary_text(model_cfg, loaded, device)
    info = {"device": device, "seconds": round(time.perf_counter() - t0, 3), "num_classes": vocab.num_classes,
            "max_synonyms": vocab.max_synonyms, "synonyms": sum(len(s) for s in vocab.synonyms),
            "source": _text_source(model_cfg, loaded.random_init)}
    return {"embeddings": text, "vocabulary": vocab.to_json()}, vocab, loaded.identity(), info


def _prepare_text(cfg: LabelConfig) -> tuple[dict, Any, dict, dict]:
    """The model's identity and the vocabulary's text embeddings, computed once per run (then
    cached on disk): in a one-GPU Ray task when the cluster has GPUs (tens of thousands of
    classes x 14 templates go through the CLIP text tower), else on the driver's CPU. The
    actors get the result through the object store and never embed text themselves."""
    if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1:
        task = ray.remote(num_gpus=1, num_cpus=1)(_text_task)  # GPU tasks end their worker: memory freed
        out = ray.get(task.remote(cfg.model, "cuda"))
    else:
        out = _text_task(cfg.model, "cpu")
    info = out[3]
    log.info("text embeddings of %s: %d classes, %d names, on %s in %.1fs (%s), once for the whole run",
             out[1].name, info["num_classes"], info["synonyms"], info["device"], info["seconds"], info["source"])
    return out


def build_dataset(cfg: LabelConfig, shard_urls: list[str], text_ref: Any) -> ray.data.Dataset:
    """The streaming Ray Data pipeline for ``shard_urls``."""
    image_size = IMAGE_SIZES[cfg.model.preset]
    ds = ray.data.from_items([{"url": u} for u in shard_urls], override_num_blocks=max(1, len(shard_urls)))
    # Reading is I/O and decoding light next to the model: half a CPU each keeps them schedulable
    # beside the actors on small machines (the actors hold their CPUs for the whole job).
    ds = ds.flat_map(read_shard_rows, fn_kwargs={"s3_endpoint": cfg.model.s3_endpoint}, num_cpus=0.5)
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs={"image_size": image_size, "max_pixels": cfg.max_pixels},
        batch_size=cfg.decode_batch_size,
        batch_format="pandas",
        num_cpus=0.5,
    )
    if cfg.sources.detector:
        ds = ds.map_batches(
            DetectorStage,
            fn_constructor_kwargs={
                "spec": cfg.sources.detector, "weights": cfg.detector_weights or cfg.model.weights,
                "random_init": cfg.model.random_init, "score_threshold": cfg.detector_score_threshold,
                "nms_iou": cfg.detector_nms_iou, "max_per_image": cfg.detector_max_per_image},
            batch_size=cfg.detector_batch_size,
            batch_format="pandas",
            num_gpus=cfg.detector_num_gpus or None,
            num_cpus=1 if cfg.detector_num_gpus else 0.5,
            compute=ray.data.ActorPoolStrategy(size=cfg.detector_concurrency),
        )
    conc = cfg.concurrency if isinstance(cfg.concurrency, tuple) else (cfg.concurrency, cfg.concurrency)
    return ds.map_batches(
        PredictStage,
        fn_constructor_kwargs={"model_config": dataclasses.asdict(cfg.model), "text": text_ref,
                               "with_embedding": cfg.with_embedding, "prompts": cfg.prompts,
                               "select": dataclasses.asdict(cfg.select),
                               "cpu_threads": None if cfg.num_gpus else max(1, (os.cpu_count() or 1) // conc[1])},
        batch_size=cfg.batch_size,
        batch_format="pandas",
        num_gpus=cfg.num_gpus or None,
        num_cpus=cfg.num_cpus_per_actor,
        compute=ray.data.ActorPoolStrategy(min_size=conc[0], max_size=conc[1]),
    )


def _row_for_table(row: dict[str, Any]) -> dict[str, Any]:
    ok = row["status"] == "ok"
    return {
        "key": row["key"],
        "shard": row["shard"],
        "image_id": row["image_id"] or None,
        "width": int(row["width"]) if int(row["width"]) >= 0 else None,
        "height": int(row["height"]) if int(row["height"]) >= 0 else None,
        "status": row["status"],
        "error": None if ok else (row["error"] or "unknown error"),
        "instances": json.loads(row["instances"]) if ok else [],
    }


class _ShardGatherer:
    """Collects rows per shard on the driver and commits a shard once all its rows arrived."""

    def __init__(self, committer: ShardCommitter, summary: LabelSummary, progress: JobProgress) -> None:
        self.committer = committer
        self.summary = summary
        self.progress = progress
        self.pending: dict[str, dict[int, dict[str, Any]]] = {}

    def add(self, row: dict[str, Any]) -> None:
        name = row["shard"]
        if row["status"] == SHARD_FAILED:
            self.summary.shards_failed.append({"shard": name, "error": row["error"]})
            log.error("shard %s could not be read and was NOT committed (a rerun retries it): %s", name, row["error"])
            return
        if row["status"] == SHARD_EMPTY:
            self._commit(name, [], "")
            return
        rows = self.pending.setdefault(name, {})
        rows[int(row["index"])] = row  # keyed by position: a retried task cannot duplicate a row
        if len(rows) == int(row["shard_total"]):
            ordered = [rows[i] for i in sorted(rows)]
            del self.pending[name]
            self._commit(name, ordered, row["shard_damage"])

    def _commit(self, name: str, rows: list[dict[str, Any]], damage: str) -> None:
        table_rows = [_row_for_table(r) for r in rows]
        ok = sum(r["status"] == "ok" for r in table_rows)
        masks = sum(len(r["instances"]) for r in table_rows)
        stats = {"damage": damage or None, "committed_by": "label_job"}
        table, output = rows_to_table(table_rows), io.redact(self.committer.output_url)
        done = self.summary.shards_committed
        _with_storage_retries(f"commit shard {name} to {output}", lambda: self.committer.commit(name, table, stats),
                              committed=done)
        _with_storage_retries(f"write the statistics of shard {name} to {output}", lambda: write_shard_stats(
            self.committer.output_url, name, shard_stats(table_rows), s3_endpoint=self.committer.s3_endpoint),
            committed=done + 1)
        self.summary.shards_committed += 1
        self.summary.images_ok += ok
        self.summary.images_error += len(table_rows) - ok
        self.summary.masks += masks
        if damage:
            self.summary.shards_damaged.append({"shard": name, "error": damage})
            log.error("shard %s is damaged (%s): committed the %d images read before the damage", name, damage,
                      len(table_rows))
        for r in table_rows:
            if r["status"] == "error":
                log.warning("error row %s/%s: %s", name, r["key"], r["error"])
        self.progress.update(images=len(table_rows), errors=len(table_rows) - ok, masks=masks, shards=1)


def _with_storage_retries(what: str, write: Callable[[], Any], *, committed: int) -> Any:
    """Run one storage write of the driver (``what``: "commit shard X"), retried with backoff."""
    t0 = time.time()
    for attempt in range(COMMIT_ATTEMPTS):
        try:
            return write()
        except ValueError:  # a bad table: retrying cannot help
            raise
        except Exception as e:  # noqa: BLE001 - storage clients raise many types; all are retried
            error = f"{type(e).__name__}: {io.redact(str(e))}"
            log.warning("%s failed (attempt %d/%d): %s", what, attempt + 1, COMMIT_ATTEMPTS, error)
            if attempt + 1 == COMMIT_ATTEMPTS:
                raise StorageUnavailableError(
                    f"could not {what} ({COMMIT_ATTEMPTS} attempts in {time.time() - t0:.0f}s; last error {error}). "
                    f"The {committed} shards committed by this run (and any before it) are complete and kept; a "
                    "shard is committed only once its marker is written. Rerun the same command when the storage "
                    "is reachable again: it skips the committed shards and labels the rest."
                ) from None
            time.sleep(COMMIT_BACKOFF_S * 2**attempt)


def run_label(cfg: LabelConfig) -> LabelSummary:
    """Run the label job; returns the summary (also logged and written as ``_summary.json``)."""
    t0 = time.time()
    s3 = cfg.model.s3_endpoint
    summary = LabelSummary(random_init=cfg.model.random_init)
    shards = list_shards(cfg.input, s3_endpoint=s3)
    names = [shard_name(u) for u in shards]
    if len(set(names)) != len(names):
        raise ValueError("input shards must have distinct file names (they name the output files)")
    text, vocab, identity, summary.text_embeddings = _prepare_text(cfg)
    state = check_or_write_run_record(cfg.output, _run_record(cfg, identity, vocab), overwrite=cfg.overwrite,
                                      s3_endpoint=s3)
    committer = ShardCommitter(cfg.output, s3_endpoint=s3)
    committer.cleanup_temporaries()
    committed = committer.committed_shards()
    todo = [u for u, n in zip(shards, names) if n not in committed]
    summary.shards_total, summary.shards_skipped = len(shards), len(shards) - len(todo)
    if cfg.limit is not None:
        todo = todo[: cfg.limit]
    log.info("label job: %d shards (%s run; %d already committed, %d to do) -> %s", len(shards), state,
             summary.shards_skipped, len(todo), io.redact(cfg.output))
    if cfg.model.random_init:
        log.warning("RANDOM INIT: labels come from an untrained model (recorded in the run record)")
    progress = JobProgress(total_shards=len(todo), interval_s=cfg.progress_interval_s)
    gatherer = _ShardGatherer(committer, summary, progress)
    if todo:
        # As numpy, the object store hands every actor on a node the same read-only copy.
        shared = {**text, "embeddings": text["embeddings"].numpy()}
        ds = build_dataset(cfg, todo, ray.put(shared))
        for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
            for row in batch.to_dict("records"):
                gatherer.add(row)
    for name, rows in gatherer.pending.items():
        summary.shards_failed.append({"shard": name, "error": f"only {len(rows)} rows arrived"})
    summary.wall_time_s = time.time() - t0
    output, done = io.redact(cfg.output), summary.shards_committed
    run_stats = _with_storage_retries(f"write the run statistics to {output}",
                                      lambda: write_run_stats(cfg.output, s3_endpoint=s3), committed=done)
    log.info(format_stats(run_stats))
    _with_storage_retries(f"write the summary to {output}", lambda: io.atomic_write_bytes(
        io.join(cfg.output, "_summary.json"), json.dumps(summary.to_dict(), indent=1).encode(), s3_endpoint=s3),
        committed=done)
    progress.finish(summary)
    return summary
