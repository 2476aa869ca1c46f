"""The label job (DESIGN §4): WebDataset shards in, one committed Parquet file per shard out.

list shards -> take the output's lease -> skip committed -> read + decode + resize (one CPU task
per shard) -> [detector actor pool] -> model actor pool -> part files (CPU tasks) -> one commit
task per shard. The driver sees one small metadata row per part and starts a shard's commit once
its parts are all written; no image row ever passes through it (``pipeline/dataset.py`` builds the
pipeline, ``pipeline/parts.py`` and ``pipeline/tracker.py`` commit, ``pipeline/text_embeddings.py``
embeds the vocabulary once). Every input image becomes
exactly one row; a rerun with the same arguments skips committed shards; a different
model/vocabulary is refused unless ``overwrite``; one job at a time writes an output folder
(``pipeline/lease.py``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import pyarrow as pa

from ovsam_ray import __version__, storage
from ovsam_ray.data.decode import DEFAULT_MAX_PIXELS, DEFAULT_MAX_PROMPTS
from ovsam_ray.data.shards import ShardSpecError, list_shards, shard_names
from ovsam_ray.errors import ConfigError, OVSAMRayError
from ovsam_ray.inference import ModelConfig
from ovsam_ray.labels.committer import ShardCommitter
from ovsam_ray.labels.run_record import RunRecord, check_or_write_run_record
from ovsam_ray.locations import check_disjoint
from ovsam_ray.model.classifier import FUSION_ALPHA, FUSION_BETA
from ovsam_ray.model.ovsam import OVSAM
from ovsam_ray.pipeline.dataset import DECODE_CHUNK, DECODE_CHUNK_NO_PIXELS, build_dataset
from ovsam_ray.pipeline.hf_detectors import DEFAULT_CONCEPT_BATCH, DEFAULT_MAX_CONCEPTS
from ovsam_ray.pipeline.lease import HEARTBEAT_S, OutputLease, check_interval
from ovsam_ray.pipeline.ownership import ALLOW_FOREIGN_FILES_HELP, check_output_owned
from ovsam_ray.pipeline.parts import (
    COMMIT_ATTEMPTS,
    COMMIT_BACKOFF_S,
    StorageUnavailableError,
    parts_url,
    remove_all_parts,
    with_storage_retries,
)
from ovsam_ray.pipeline.predict_stage import BASELINES
from ovsam_ray.pipeline.progress import JobProgress, quiet_ray_data_progress
from ovsam_ray.pipeline.prompting import PromptSources, SelectConfig
from ovsam_ray.pipeline.stats import format_stats, write_run_stats
from ovsam_ray.pipeline.text_embeddings import prepare_text
from ovsam_ray.pipeline.tracker import ShardTracker, storage_error

log = logging.getLogger(__name__)

__all__ = [
    "COMMIT_ATTEMPTS",
    "COMMIT_BACKOFF_S",
    "EXIT_FAILED",
    "EXIT_INCOMPLETE",
    "EXIT_OK",
    "JobStartError",
    "LabelConfig",
    "LabelSummary",
    "StorageUnavailableError",
    "build_dataset",
    "check_before_start",
    "plan_label",
    "run_label",
]

#: Exit codes of ``ovsam-ray label`` / ``jobs/label.py`` (2: the job could not start or go on).
EXIT_OK, EXIT_FAILED, EXIT_INCOMPLETE = 0, 1, 3
_T = TypeVar("_T")


class JobStartError(OVSAMRayError, RuntimeError):
    """The job could not start (storage unreachable, output not writable...): one line, why."""


_PROMPTS = "prompts"  # the --help section of the prompt and detector flags
_NOT_A_FLAG = {"cli": False}


@dataclass
class LabelConfig:
    """Settings of one label run. CLI flags map one to one onto fields: each field's ``metadata``
    holds its flag's help text (``cli/flags.py`` makes the flags; ``cli: False``: no flag).

    images_per_call runs as forwards of batch_size: the driver's scheduling cost is per call, not
    per forward; num_gpus 0 runs the same actor pool on CPUs; decode_chunk None: DECODE_CHUNK images
    per block out of the decode stage when the model takes pixels, DECODE_CHUNK_NO_PIXELS when it
    takes none (the baseline).
    """

    input: str = field(metadata={"help": "shards: glob, brace range {000..099}, folder or s3:// prefix"})
    output: str = field(metadata={"help": "output folder or s3:// prefix (one Parquet per shard)"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"group": "model"})
    batch_size: int = field(default=4, metadata={"help": "images per model forward"})
    images_per_call: int | None = field(
        default=None,
        metadata={"help": "images per model-actor call, run as forwards of --batch-size (default max(64, batch))"},
    )
    concurrency: int | tuple[int, int] = field(
        default=1, metadata={"help": "model actors: N (a fixed pool) or MIN,MAX (an autoscaling one)"}
    )
    num_gpus: float = field(default=0.0, metadata={"help": "GPUs per model actor (0: run on CPUs)"})
    num_cpus_per_actor: float = field(default=1.0, metadata=_NOT_A_FLAG)
    decode_chunk: int | None = field(
        default=None,
        metadata={
            "help": f"images per decoded block (default {DECODE_CHUNK}, or {DECODE_CHUNK_NO_PIXELS} with --baseline, "
            "whose model takes no pixels)"
        },
    )
    overwrite: bool = field(default=False, metadata={"help": "delete a different run's outputs and start over"})
    max_error_fraction: float = field(default=0.0, metadata={"help": "error rows / images above which the job exits 1"})
    limit: int | None = field(default=None, metadata={"help": "label at most N not-yet-committed shards"})
    with_embedding: bool = field(
        default=False, metadata={"help": "store float16 region embeddings (re-scoring, ovsam-ray relabel)"}
    )
    max_pixels: int = field(default=DEFAULT_MAX_PIXELS, metadata=_NOT_A_FLAG)
    progress_interval_s: float = field(default=10.0, metadata=_NOT_A_FLAG)
    prompts: str = field(
        default="shard",
        metadata={
            "group": _PROMPTS,
            "help": (
                "shard | detector:NAME (torchvision name, owlv2, grounding-dino, sam3) | grid, several joined by "
                "commas; A+B: both, deduplicated across sources by mask IoU (detector:owlv2+grid); A|B: B's "
                "prompts for the images A gives none (shard|grid, shard|detector:NAME)"
            ),
        },
    )
    select: SelectConfig = field(default_factory=SelectConfig, metadata={"group": _PROMPTS})
    detector_weights: str | None = field(
        default=None, metadata={"group": _PROMPTS, "help": "detector weights file or folder (default: --weights)"}
    )
    detector_score_threshold: float = field(
        default=0.3, metadata={"group": _PROMPTS, "help": "detector boxes scoring below this are dropped"}
    )
    detector_nms_iou: float = field(
        default=0.5,
        metadata={
            "group": _PROMPTS,
            "help": "detector boxes: NMS at this IoU (per class where the detector names one)",
        },
    )
    detector_max_per_image: int = field(
        default=100, metadata={"group": _PROMPTS, "help": "detector boxes kept per image (the best scoring)"}
    )
    detector_num_gpus: float = field(
        default=0.0, metadata={"group": _PROMPTS, "help": "GPU fraction per detector actor"}
    )
    detector_concurrency: int = field(default=1, metadata={"group": _PROMPTS, "help": "detector actors"})
    detector_batch_size: int = field(default=4, metadata=_NOT_A_FLAG)
    detector_queries: str | None = field(
        default=None,
        metadata={
            "group": _PROMPTS,
            "help": (
                "owlv2 / grounding-dino query list, sam3 concept list: a vocabulary name (coco_ov, lvis_v1) or "
                ".txt/.json file (default: owlv2 class-agnostic objectness boxes; grounding-dino and sam3 the --vocab)"
            ),
        },
    )
    detector_objectness_threshold: float | None = field(
        default=None,
        metadata={
            "group": _PROMPTS,
            "help": ("owlv2: objectness cut (without queries the boxes' score; default 0.1 there, off with queries)"),
        },
    )
    detector_max_concepts: int = field(
        default=DEFAULT_MAX_CONCEPTS,
        metadata={
            "group": _PROMPTS,
            "help": "sam3: refuse a concept list longer than this (its cost is one pass per concept per image)",
        },
    )
    detector_concept_batch: int = field(
        default=DEFAULT_CONCEPT_BATCH,
        metadata={"group": _PROMPTS, "help": "sam3: concepts run together against one image encoding"},
    )
    keep_source_masks: bool = field(
        default=False,
        metadata={
            "group": _PROMPTS,
            "help": "sam3: also store the detector's own mask of each box (instances' detector_rle, COCO RLE)",
        },
    )
    baseline: str | None = field(
        default=None,
        metadata={
            "choices": BASELINES,
            "help": (
                "run a zero-cost baseline instead of OV-SAM (box-fill: each mask is its prompt box; no weights needed) "
                "to measure the pipeline alone"
            ),
        },
    )
    max_prompts: int = field(
        default=DEFAULT_MAX_PROMPTS,
        metadata={
            "group": _PROMPTS,
            "help": ("prompts kept per image from its JSON (the first N, boxes first; the row's warnings say so)"),
        },
    )
    lease_heartbeat_s: float = field(
        default=HEARTBEAT_S,
        metadata={"help": "seconds between renewals of the output's lease (a dead job's lease is taken over after 3)"},
    )
    allow_foreign_files: bool = field(default=False, metadata={"help": ALLOW_FOREIGN_FILES_HELP})
    dry_run: bool = field(
        default=False,
        metadata={
            "help": (
                "check everything and start nothing: list the shards, check the weights, detector and output, print "
                "them and the resolved config as JSON, write nothing (exit 0; 2 when the job would be refused)"
            )
        },
    )

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size}: must be >= 1 (images per model forward)")
        if self.images_per_call is not None and self.images_per_call < self.batch_size:
            raise ConfigError(f"images_per_call={self.images_per_call}: must be >= batch_size={self.batch_size}")
        if not 0.0 <= self.max_error_fraction <= 1.0:
            raise ConfigError(f"max_error_fraction={self.max_error_fraction}: must be within [0, 1]")
        if self.num_gpus < 0:
            raise ConfigError(f"num_gpus={self.num_gpus}: must be >= 0 (0 = run the model actors on CPUs)")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit={self.limit}: must be >= 1 shard, or None for all")
        conc = self.actors
        if not 1 <= conc[0] <= conc[1]:
            raise ConfigError(f"concurrency={self.concurrency}: need 1 <= min <= max actors")
        check_disjoint([("--input", self.input)], [("--output", self.output)])
        storage.check_endpoint(self.model.s3_endpoint)
        if self.max_prompts < 1:
            raise ConfigError(f"max_prompts={self.max_prompts}: must be >= 1 prompt per image")
        check_interval(self.lease_heartbeat_s, "lease_heartbeat_s (--lease-heartbeat-s)")
        if self.baseline is not None and self.baseline not in BASELINES:
            raise ConfigError(f"baseline={self.baseline!r}: choose one of {', '.join(BASELINES)} (or none for OV-SAM)")
        if self.decode_chunk is not None and self.decode_chunk < 1:
            raise ConfigError(f"decode_chunk={self.decode_chunk}: must be >= 1 image per block")
        self.sources = PromptSources.parse(self.prompts)
        _check_detector_options(self)

    @property
    def actors(self) -> tuple[int, int]:
        """(min, max) model actors."""
        c = self.concurrency
        return c if isinstance(c, tuple) else (c, c)


def check_before_start(cfg: LabelConfig) -> dict[str, Any]:
    """What the job checks before it lists, writes or starts anything: the model's weight files,
    the vocabulary and the detector (its name, its weights folder, its query list), by the same
    code that loads them in the actors, but listing only. Raises the one-line error the actors
    would (a :class:`~ovsam_ray.errors.OVSAMRayError`); returns what it found."""
    from ovsam_ray.inference import check_model_files
    from ovsam_ray.pipeline.detectors import check_detector
    from ovsam_ray.pipeline.hf_detectors import query_names

    m = cfg.model
    checked: dict[str, Any] = {}
    if cfg.baseline is None:
        files = check_model_files(m)
        checked["weights"] = {k: storage.redact(v) for k, v in files.items()} or "random init (untrained)"
    checked["vocabulary"] = m.vocab or f"the weights' training vocabulary ({m.train_vocab})"
    name = cfg.sources.detector_name
    if name:
        queries = query_names(cfg.detector_queries) if cfg.detector_queries is not None else None
        checked["detector"] = check_detector(
            name,
            weights=cfg.detector_weights or m.weights,
            random_init=m.random_init,
            queries=queries,
            objectness_threshold=cfg.detector_objectness_threshold,
            s3_endpoint=m.s3_endpoint,
        )
        if queries is not None:
            checked["detector"]["queries"] = len(queries)
    return checked


def _check_detector_options(cfg: LabelConfig) -> None:
    """Query list / objectness threshold only for the detectors that take them; transformers
    installed for the Hugging Face ones (before any Ray actor tries to import it)."""
    from ovsam_ray.pipeline.hf_detectors import HF_DETECTORS, check_available, check_concept_count, query_names

    name = cfg.sources.detector_name
    if name in HF_DETECTORS:
        check_available(name)
    if cfg.detector_queries is not None and name not in HF_DETECTORS:
        raise ConfigError(
            f"detector_queries={cfg.detector_queries!r}: only detector:owlv2, detector:grounding-dino and "
            f"detector:sam3 take a query list (--prompts {cfg.prompts!r})"
        )
    if cfg.detector_objectness_threshold is not None and name != "owlv2":
        raise ConfigError(
            f"detector_objectness_threshold: only detector:owlv2 has an objectness head (--prompts {cfg.prompts!r})"
        )
    if cfg.keep_source_masks and name != "sam3":
        raise ConfigError(f"keep_source_masks: only detector:sam3 returns masks of its own (--prompts {cfg.prompts!r})")
    if cfg.detector_concept_batch < 1 or cfg.detector_max_concepts < 1:
        raise ConfigError(
            f"detector_concept_batch={cfg.detector_concept_batch}, detector_max_concepts="
            f"{cfg.detector_max_concepts}: both must be >= 1"
        )
    if name == "sam3" and cfg.detector_queries is not None:
        check_concept_count(len(query_names(cfg.detector_queries)), cfg.detector_max_concepts)


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
    images_with_warnings: int = 0  # rows whose `warnings` name dropped/clipped/capped prompts
    images_no_prompts: int = 0  # ok images that had no prompt at all (empty rows)
    images_all_filtered: int = 0  # ok images with prompts whose every mask a filter removed (empty rows)
    members_skipped: dict[str, int] = field(default_factory=dict)  # tar members without a row, per reason
    wall_time_s: float = 0.0
    random_init: bool = False
    driver_parts: int = 0  # metadata rows the driver handled (parts and whole-shard events)
    text_embeddings: dict[str, Any] = field(default_factory=dict)

    @property
    def images(self) -> int:
        return self.images_ok + self.images_error

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_time_s if self.wall_time_s > 0 else 0.0

    def failed(self, max_error_fraction: float) -> bool:
        """True when the job should exit non-zero."""
        return self.exit_code(max_error_fraction) != EXIT_OK

    def exit_code(self, max_error_fraction: float) -> int:
        """EXIT_INCOMPLETE (3) when a shard was left uncommitted (whatever ``max_error_fraction``
        says: a rerun finishes it), else EXIT_FAILED (1) when errors exceed ``max_error_fraction``
        (or a shard was damaged and it is below 1), else EXIT_OK."""
        if self.shards_failed:
            return EXIT_INCOMPLETE
        fraction = self.images_error / max(self.images, 1)
        if fraction > max_error_fraction or (self.shards_damaged and max_error_fraction < 1.0):
            return EXIT_FAILED
        return EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "images": self.images, "images_per_s": round(self.images_per_s, 3)}


def _select_identity(cfg: LabelConfig) -> dict[str, Any]:
    """The selection settings that shape the output; source_dedup_iou only with ``A+B`` prompts."""
    select = dataclasses.asdict(cfg.select)
    if not (cfg.sources.tiers or (cfg.sources.fallback and cfg.sources.fallback.tiers)):
        select.pop("source_dedup_iou")
    return select


def _run_record(cfg: LabelConfig, identity_model: dict, vocab: Any) -> RunRecord:
    m = cfg.model
    identity: dict[str, Any] = {
        "model": identity_model,
        "vocabulary": {"name": vocab.name, "sha256": vocab.sha256, "num_classes": vocab.num_classes},
        "class_embeddings": m.class_embeddings,
        "thresholds": {"mask_logit": OVSAM.mask_threshold, "alpha": FUSION_ALPHA, "beta": FUSION_BETA, "topk": m.topk},
        "with_embedding": cfg.with_embedding,
        "prompts": cfg.prompts,
        "max_prompts": cfg.max_prompts,
        "select": _select_identity(cfg),
        "detector": None
        if not cfg.sources.detector_name
        else {
            "score_threshold": cfg.detector_score_threshold,
            "nms_iou": cfg.detector_nms_iou,
            "max_per_image": cfg.detector_max_per_image,
            # only when set, so that the records of runs without them stay as they were
            **({"queries": cfg.detector_queries} if cfg.detector_queries is not None else {}),
            **(
                {"objectness_threshold": cfg.detector_objectness_threshold}
                if cfg.detector_objectness_threshold is not None
                else {}
            ),
            **({"keep_source_masks": True} if cfg.keep_source_masks else {}),
        },
    }
    details = {
        "config": storage.redact_config(dataclasses.asdict(cfg)),
        "code_version": __version__,
        "random_init": m.random_init and cfg.baseline is None,
    }
    return RunRecord(identity=identity, details=details)


def _startup(what: str, step: Callable[[], _T]) -> _T:
    """Run one start-up step; a failure that is not already a one-line reason (storage errors,
    an unwritable output) becomes a :class:`JobStartError` naming the step."""
    try:
        return step()
    except OVSAMRayError:
        raise
    except Exception as e:  # noqa: BLE001 - any storage client error: the job cannot start
        raise JobStartError(
            f"cannot {what}: {type(e).__name__}: {storage.safe_for_log(storage.redact(str(e)))}"
        ) from None


def _drive(cfg: LabelConfig, todo: list[str], text: dict, tracker: ShardTracker, lease: OutputLease) -> None:
    """Stream the dataset's part rows into the tracker; commit tasks run meanwhile."""
    quiet_ray_data_progress()
    try:
        for batch in build_dataset(cfg, todo, text).iter_batches(batch_size=None, batch_format="pyarrow"):
            lease.check()
            for meta in cast(pa.Table, batch).to_pylist():  # batch_format="pyarrow"
                tracker.add(meta)
            tracker.collect(wait=False)
    except Exception as e:
        storage = storage_error(e)
        if storage is None:
            raise
        raise storage from None
    tracker.collect(wait=True)
    lease.check()


#: The longest shard name (UTF-8 bytes) a local output takes: the commit's temporary file
#: ``.<shard>.parquet.tmp-<32 hex>`` must stay within a file system's 255-byte name limit.
MAX_SHARD_NAME_BYTES = 255 - len(".parquet.tmp-") - 1 - 32


def _list_input(cfg: LabelConfig) -> tuple[list[str], list[str]]:
    shards = list_shards(cfg.input, s3_endpoint=cfg.model.s3_endpoint)
    names = shard_names(shards)
    if not storage.is_remote(cfg.output):
        long = [u for u, n in zip(shards, names) if len(n.encode("utf-8", "surrogateescape")) > MAX_SHARD_NAME_BYTES]
        if long:
            raise ShardSpecError(
                f"shard file names too long for the output's file names (over {MAX_SHARD_NAME_BYTES} "
                f"bytes without .tar): {storage.safe_for_log(storage.redact(long[0]), limit=400)}"
                + (f" and {len(long) - 1} more" if len(long) > 1 else "")
                + "; rename them"
            )
    return shards, names


def run_label(cfg: LabelConfig, *, connect: Callable[[], None] | None = None) -> LabelSummary:
    """Run the label job; returns the summary (also logged and written as ``_summary.json``).

    ``connect``: called once the input is listed and the output's lease is held, before anything
    runs on Ray (the CLI joins or starts its cluster there, so that a bad input or output costs
    no cluster start). Start-up failures raise :class:`JobStartError` (or another
    :class:`~ovsam_ray.errors.OVSAMRayError` that says what to do), each one line.
    """
    if cfg.dry_run:
        raise ConfigError("dry_run=True: call plan_label(cfg), which checks everything and runs nothing")
    t0 = time.time()
    check_before_start(cfg)
    shards, names = _startup(f"list the input shards {storage.redact(cfg.input)}", lambda: _list_input(cfg))
    lease = OutputLease(cfg.output, s3_endpoint=cfg.model.s3_endpoint, interval_s=cfg.lease_heartbeat_s)
    _startup(f"take the lease of the output {storage.redact(cfg.output)}", lease.acquire)
    lease.start()
    try:
        # whose files the output holds is known before any cluster starts (one listing)
        _startup(
            f"check the files in the output {storage.redact(cfg.output)}",
            lambda: check_output_owned(
                cfg.output, names, allow_foreign_files=cfg.allow_foreign_files, s3_endpoint=cfg.model.s3_endpoint
            ),
        )
        if connect is not None:
            connect()
        return _run_leased(cfg, shards, names, lease, t0)
    finally:
        lease.close()


#: Shard names a dry run prints (then "... and N more").
DRY_RUN_SHARDS_SHOWN = 5


def plan_label(cfg: LabelConfig) -> dict[str, Any]:
    """``--dry-run``: what :func:`run_label` would do, found without writing anything or starting
    Ray: the flags, weights and detector checked (:func:`check_before_start`; its errors raise),
    the shards listed, the output's state and the resolved config. ``output.state``: ``new``,
    ``resumable`` (same run: its committed shards are skipped), ``overwrite`` (a different run,
    deleted with ``--overwrite``) or ``refused`` (with ``reason``: the job would stop, exit 2).
    The model and the vocabulary are compared with the output's run record when the job starts
    (that needs the weights' hashes); every other identity field is compared here."""
    checked = check_before_start(cfg)
    shards, names = _startup(f"list the input shards {storage.redact(cfg.input)}", lambda: _list_input(cfg))
    output = _startup(f"check the output {storage.redact(cfg.output)}", lambda: _output_state(cfg, names))
    shown = [storage.redact(u) for u in shards[:DRY_RUN_SHARDS_SHOWN]]
    if len(shards) > DRY_RUN_SHARDS_SHOWN:
        shown.append(f"... and {len(shards) - DRY_RUN_SHARDS_SHOWN} more")
    todo = len(shards) - output.get("committed", 0)
    return {
        "dry_run": True,
        "shards": {"count": len(shards), "first": shown, "to_do": todo if cfg.limit is None else min(todo, cfg.limit)},
        **checked,
        "output": output,
        "config": storage.redact_config(dataclasses.asdict(cfg)),
    }


def _output_state(cfg: LabelConfig, names: list[str]) -> dict[str, Any]:
    """The output's state for :func:`plan_label`, read only (the checks run_label makes before it
    writes, in the same order)."""
    from ovsam_ray.labels.run_record import identity_diff, load_run_record
    from ovsam_ray.pipeline.lease import check_not_being_written

    s3, where = cfg.model.s3_endpoint, storage.redact(cfg.output)
    try:
        check_not_being_written(cfg.output, "--output", s3_endpoint=s3)
        check_output_owned(cfg.output, names, allow_foreign_files=cfg.allow_foreign_files, s3_endpoint=s3)
    except OVSAMRayError as e:
        return {"url": where, "state": "refused", "reason": str(e)}
    old = load_run_record(cfg.output, s3_endpoint=s3, own=True)
    if old is None:
        return {"url": where, "state": "new", "committed": 0}
    in_run = set(names)
    committed = len(ShardCommitter(cfg.output, s3_endpoint=s3).committed_shards() & in_run)
    unknown_yet = types.SimpleNamespace(name=None, sha256=None, num_classes=None)  # compared at start
    new = _run_record(cfg, {}, unknown_yet).to_dict()
    diff = identity_diff(
        old.get("identity", {}), json.loads(json.dumps(new["identity"], default=str)), skip=("model", "vocabulary")
    )
    state = {"url": where, "committed": committed, "checked_at_start": "the model and the vocabulary"}
    if not diff:
        return {**state, "state": "resumable"}
    if cfg.overwrite:
        return {
            **state,
            "state": "overwrite",
            "differs": diff,
            "note": f"--overwrite deletes its {committed} committed shards",
        }
    return {
        **state,
        "state": "refused",
        "differs": diff,
        "reason": f"output {where} holds a different run ({'; '.join(diff)}): use a new output location or --overwrite",
    }


def _prepare_output(cfg: LabelConfig, names: list[str], identity: dict, vocab: Any) -> tuple[str, set[str]]:
    """With the lease held and the output's files checked (:func:`check_output_owned`): check/write
    the run record, delete what crashed runs of this record left behind (only now: a live job's
    files are never deleted; only names this job generates), relabel committed shards whose
    Parquet file is gone; returns the run's state and the committed shards."""
    s3 = cfg.model.s3_endpoint
    state = check_or_write_run_record(
        cfg.output, _run_record(cfg, identity, vocab), overwrite=cfg.overwrite, s3_endpoint=s3, shards=names
    )
    committer = ShardCommitter(cfg.output, s3_endpoint=s3)
    committed = committer.committed_shards()  # listed once: the steps below only remove from it
    committer.cleanup_temporaries(names, committed)
    if storage.exists(parts_url(cfg.output), s3_endpoint=s3):
        log.info("deleting %s (part files of an interrupted run)", storage.redact(parts_url(cfg.output)))
        remove_all_parts(cfg.output, s3_endpoint=s3)
    for name in committer.markers_without_parquet(committed):
        log.error("%s Relabelling it now.", committer.missing_file_error(name))
        storage.remove(committer.marker_url(name), s3_endpoint=s3)
        committed.discard(name)
    return state, committed


def _run_leased(cfg: LabelConfig, shards: list[str], names: list[str], lease: OutputLease, t0: float) -> LabelSummary:
    s3 = cfg.model.s3_endpoint
    summary = LabelSummary(random_init=cfg.model.random_init and cfg.baseline is None)
    # Not a storage step: a failure here that is not ours (weights, vocabulary) is a bug and keeps
    # its traceback.
    text, vocab, identity, summary.text_embeddings = prepare_text(cfg.model, cfg.baseline)
    state, committed = _startup(
        f"prepare the output {storage.redact(cfg.output)}", lambda: _prepare_output(cfg, names, identity, vocab)
    )
    todo = [u for u, n in zip(shards, names) if n not in committed]
    summary.shards_total, summary.shards_skipped = len(shards), len(shards) - len(todo)
    if cfg.limit is not None:
        todo = todo[: cfg.limit]
    log.info(
        "label job: %d shards (%s run; %d already committed, %d to do) -> %s",
        len(shards),
        state,
        summary.shards_skipped,
        len(todo),
        storage.redact(cfg.output),
    )
    if cfg.baseline is not None:
        log.warning("BASELINE %s: no model runs; each mask is its prompt box (a pipeline measurement)", cfg.baseline)
    elif cfg.model.random_init:
        log.warning("RANDOM INIT: labels come from an untrained model (recorded in the run record)")
    progress = JobProgress(total_shards=len(todo), interval_s=cfg.progress_interval_s)
    tracker = ShardTracker(cfg.output, s3, summary, progress)
    if todo:
        _drive(cfg, todo, text, tracker, lease)
    for name, shard in tracker.pending.items():
        summary.shards_failed.append({"shard": name, "error": f"only {shard['rows']} of {shard['total']} rows arrived"})
    summary.wall_time_s = time.time() - t0
    summary.driver_parts = tracker.parts_seen
    _finish(cfg, summary, tracker, len(committed))
    progress.finish(summary)
    return summary


def _finish(cfg: LabelConfig, summary: LabelSummary, tracker: ShardTracker, committed_before: int) -> None:
    """Write the run statistics and the summary; log what the user should know."""
    s3, done = cfg.model.s3_endpoint, summary.shards_committed
    stats_file, summary_file = (storage.redact(storage.join(cfg.output, n)) for n in ("_stats.json", "_summary.json"))
    run_stats = with_storage_retries(
        f"write the run statistics {stats_file}",
        lambda: write_run_stats(cfg.output, s3_endpoint=s3, new=tracker.stats, committed=committed_before + done),
        committed=done,
    )
    log.info(format_stats(run_stats))
    if summary.images_no_prompts:
        log.warning(
            "%d images had no prompts (empty rows); use --prompts grid or detector:NAME (or shard|grid, "
            "shard|detector:NAME to keep the shard's boxes where there are some)",
            summary.images_no_prompts,
        )
    if summary.images_all_filtered:
        log.warning(
            "%d images had every mask filtered out (empty rows; each row's warnings say by which filter): "
            "for --prompts grid, lower --grid-stability",
            summary.images_all_filtered,
        )
    if summary.members_skipped:
        log.info("tar members without a row: %s", ", ".join(f"{n} {r}" for r, n in summary.members_skipped.items()))
    if summary.shards_failed:
        log.error(
            "%d shards were NOT committed; rerun the same command to finish them (exit code %d)",
            len(summary.shards_failed),
            EXIT_INCOMPLETE,
        )
    with_storage_retries(
        f"write the summary {summary_file}",
        lambda: storage.atomic_write_bytes(
            storage.join(cfg.output, "_summary.json"), json.dumps(summary.to_dict(), indent=1).encode(), s3_endpoint=s3
        ),
        committed=done,
    )
