"""``ovsam-ray label`` (the label job: WebDataset shards -> Parquet labels) and ``relabel``."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

from ovsam_ray.cli.common import add_model_args, init_ray, model_config, parse_concurrency
from ovsam_ray.pipeline.label_job import LabelConfig
from ovsam_ray.pipeline.lease import HEARTBEAT_S
from ovsam_ray.pipeline.prompting import SelectConfig

__all__ = ["EXIT_TERMINATED", "JobTerminated", "add_label", "add_label_args", "add_relabel", "label_config",
           "run_label_cli"]

#: Exit code of a label job stopped by SIGTERM (``ray job stop``, Kubernetes) or Ctrl-C: the
#: shell's 128 + signal number (143, 130). Committed shards are kept and the lease is released;
#: rerunning the same command finishes the rest.
EXIT_TERMINATED = 128 + signal.SIGTERM
log = logging.getLogger("ovsam_ray.pipeline.label_job")


class JobTerminated(BaseException):
    """Raised in the driver's main thread by SIGTERM. A BaseException, like KeyboardInterrupt,
    so that no ``except Exception`` on the way (a commit's bookkeeping) takes it for a failure."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def add_label_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="shards: glob, brace range {000..099}, folder or s3:// prefix")
    p.add_argument("--output", required=True, help="output folder or s3:// prefix (one Parquet per shard)")
    p.add_argument("--batch-size", type=int, default=4, help="images per model forward")
    p.add_argument("--images-per-call", type=int,
                   help="images per model-actor call, run as forwards of --batch-size (default max(64, batch))")
    p.add_argument("--concurrency", default="1", help="model actors: N or MIN,MAX")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per model actor (0: run on CPUs)")
    p.add_argument("--overwrite", action="store_true", help="delete a different run's outputs and start over")
    _foreign_flag(p)
    p.add_argument("--max-error-fraction", type=float, default=0.0)
    p.add_argument("--limit", type=int, help="label at most N not-yet-committed shards")
    p.add_argument("--with-embedding", action="store_true", help="store float16 region embeddings (re-scoring)")
    p.add_argument("--baseline", choices=["box-fill"],
                   help="run a zero-cost baseline instead of OV-SAM (box-fill: each mask is its prompt box; no "
                        "weights needed) to measure the pipeline alone")
    p.add_argument("--decode-chunk", type=int, help="images per decoded block (default 16, or 256 with --baseline)")
    g = p.add_argument_group("prompts")
    g.add_argument("--prompts", default="shard",
                   help="shard | detector:NAME (torchvision name, owlv2, grounding-dino) | grid, several joined by "
                        "commas; A+B: both, deduplicated across sources by mask IoU (detector:owlv2+grid); A|B: B's "
                        "prompts for the images A gives none (shard|grid, shard|detector:NAME)")
    g.add_argument("--max-prompts", type=int, default=1000,
                   help="prompts kept per image from its JSON (the first N, boxes first; the row's warnings say so)")
    g.add_argument("--grid-size", type=int, default=32, help="points per side of the segment-everything grid")
    g.add_argument("--grid-stability", type=float, default=0.95)
    g.add_argument("--grid-nms-iou", type=float, default=0.7)
    g.add_argument("--min-mask-area", type=int, default=0)
    g.add_argument("--dedup-iou", type=float, help="drop masks overlapping a better one above this IoU")
    g.add_argument("--dedup-containment", type=float, help="drop masks lying this much inside a better one")
    g.add_argument("--dedup-class-aware", action="store_true")
    g.add_argument("--detector-weights", help="detector weights file or folder (default: --weights)")
    g.add_argument("--detector-score-threshold", type=float, default=0.3)
    g.add_argument("--detector-nms-iou", type=float, default=0.5)
    g.add_argument("--detector-max-per-image", type=int, default=100)
    g.add_argument("--detector-num-gpus", type=float, default=0.0, help="GPU fraction per detector actor")
    g.add_argument("--detector-concurrency", type=int, default=1)
    g.add_argument("--detector-queries", help="owlv2 / grounding-dino query list: a vocabulary name (coco_ov, lvis_v1) "
                   "or .txt/.json file (default: owlv2 class-agnostic objectness boxes; grounding-dino the --vocab)")
    g.add_argument("--detector-objectness-threshold", type=float,
                   help="owlv2: objectness cut (without queries the boxes' score; default 0.1 there, off with queries)")
    g.add_argument("--source-dedup-iou", type=float, default=0.7,
                   help="A+B prompts: drop a mask of B overlapping a kept mask of A above this IoU (any class)")
    p.add_argument("--ray-address", help="Ray address; 'local' starts a new local Ray (default: RAY_ADDRESS)")
    p.add_argument("--lease-heartbeat-s", type=float, default=HEARTBEAT_S,
                   help="seconds between renewals of the output's lease (a dead job's lease is taken over after 3)")
    add_model_args(p, default_preset="ovsam_rn50x16")


def _foreign_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-foreign-files", action="store_true",
                   help="write into an output folder that holds files no ovsam-ray command wrote (they are left "
                        "alone; without this flag such a folder is refused)")


def label_config(a: argparse.Namespace) -> LabelConfig:
    if a.baseline:  # no model, so no weights: the model config only names the vocabulary
        a.random_init = True
    return LabelConfig(
        input=a.input,
        output=a.output,
        model=model_config(a),
        batch_size=a.batch_size,
        images_per_call=a.images_per_call,
        concurrency=parse_concurrency(a.concurrency),
        num_gpus=a.num_gpus,
        overwrite=a.overwrite,
        max_error_fraction=a.max_error_fraction,
        limit=a.limit,
        with_embedding=a.with_embedding,
        prompts=a.prompts,
        select=SelectConfig(grid_size=a.grid_size, grid_stability=a.grid_stability, grid_nms_iou=a.grid_nms_iou,
                            min_mask_area=a.min_mask_area, dedup_iou=a.dedup_iou,
                            dedup_containment=a.dedup_containment, dedup_class_aware=a.dedup_class_aware,
                            source_dedup_iou=a.source_dedup_iou),
        detector_weights=a.detector_weights,
        detector_score_threshold=a.detector_score_threshold,
        detector_nms_iou=a.detector_nms_iou,
        detector_max_per_image=a.detector_max_per_image,
        detector_num_gpus=a.detector_num_gpus,
        detector_concurrency=a.detector_concurrency,
        detector_queries=a.detector_queries,
        detector_objectness_threshold=a.detector_objectness_threshold,
        baseline=a.baseline,
        decode_chunk=a.decode_chunk,
        max_prompts=a.max_prompts,
        lease_heartbeat_s=a.lease_heartbeat_s,
        allow_foreign_files=a.allow_foreign_files,
    )


def run_label_cli(a: argparse.Namespace) -> int:
    from ovsam_ray.pipeline.label_job import run_label

    cfg = label_config(a)
    with _stop_on_sigterm() as stop:
        try:
            # Ray starts only once the input is listed and the output's lease is held; ray.init
            # sets its own SIGTERM handler (exit 15), so ours goes back on after it.
            summary = run_label(cfg, connect=lambda: (init_ray(a.ray_address), stop.install()))
        except BaseException as e:
            signum = stop.signum or (signal.SIGINT if _caused_by(e, KeyboardInterrupt) else None)
            if signum is None:
                raise
            log.debug("stopped by", exc_info=e)
            log.error("label job stopped by %s (exit code %d): the shards committed so far are kept and the "
                      "output's lease is released; rerun the same command to finish the rest",
                      signal.Signals(signum).name, 128 + signum)
            return 128 + signum
    print(json.dumps(summary.to_dict(), indent=1))
    return summary.exit_code(cfg.max_error_fraction)


def _caused_by(e: BaseException | None, kind: type[BaseException]) -> bool:
    """Whether ``e`` or an exception it was raised from or during is a ``kind``: Ray's C++ calls
    turn an exception raised in a signal handler into a SystemError around it."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, kind):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


class _SigtermStop:
    """SIGTERM raises :class:`JobTerminated` in the main thread (the first one only: a second
    during the clean-up is ignored), so that ``finally`` blocks release the lease; :attr:`signum`
    records it, whatever the exception looks like by the time it reaches the CLI."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.active = threading.current_thread() is threading.main_thread()  # signals reach it only

    def handler(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
            raise JobTerminated(signum)

    def install(self) -> None:
        if self.active:
            signal.signal(signal.SIGTERM, self.handler)


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[_SigtermStop]:
    stop = _SigtermStop()
    previous = signal.getsignal(signal.SIGTERM)
    stop.install()
    try:
        yield stop
    finally:
        if stop.active:
            signal.signal(signal.SIGTERM, previous)


def _relabel(a: argparse.Namespace) -> int:
    from ovsam_ray.pipeline.relabel import RelabelConfig, run_relabel

    cfg = RelabelConfig(input=a.input, output=a.output, vocab=a.vocab, overwrite=a.overwrite,
                        s3_endpoint=a.s3_endpoint, allow_foreign_files=a.allow_foreign_files)
    print(json.dumps(run_relabel(cfg, connect=lambda: init_ray(a.ray_address)), indent=1))
    return 0


def add_label(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("label", help="the label job: WebDataset shards -> Parquet labels")
    add_label_args(p)
    p.set_defaults(func=run_label_cli)


def add_relabel(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("relabel", help="re-score stored embeddings with a new vocabulary (no images)")
    p.add_argument("--input", required=True, help="a label output written with --with-embedding")
    p.add_argument("--output", required=True)
    p.add_argument("--vocab", required=True)
    p.add_argument("--overwrite", action="store_true")
    _foreign_flag(p)
    p.add_argument("--s3-endpoint")
    p.add_argument("--ray-address")
    p.set_defaults(func=_relabel)
