"""Subcommands that run jobs: ``label``, ``demo-data``, ``demo`` (and ``train`` when available)."""

from __future__ import annotations

import argparse
import json
import logging
import os

from ovsam_ray.pipeline.label_job import LabelConfig
from ovsam_ray.pipeline.prompting import SelectConfig

log = logging.getLogger("ovsam_ray")


def add_label_args(p: argparse.ArgumentParser) -> None:
    from ovsam_ray.cli import add_model_args

    p.add_argument("--input", required=True, help="shards: glob, brace range {000..099}, folder or s3:// prefix")
    p.add_argument("--output", required=True, help="output folder or s3:// prefix (one Parquet per shard)")
    p.add_argument("--batch-size", type=int, default=4, help="images per model forward")
    p.add_argument("--images-per-call", type=int,
                   help="images per model-actor call, run as forwards of --batch-size (default max(64, batch))")
    p.add_argument("--concurrency", default="1", help="model actors: N or MIN,MAX")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per model actor (0: run on CPUs)")
    p.add_argument("--overwrite", action="store_true", help="delete a different run's outputs and start over")
    p.add_argument("--max-error-fraction", type=float, default=0.0)
    p.add_argument("--limit", type=int, help="label at most N not-yet-committed shards")
    p.add_argument("--with-embedding", action="store_true", help="store float16 region embeddings (re-scoring)")
    p.add_argument("--baseline", choices=["box-fill"],
                   help="run a zero-cost baseline instead of OV-SAM (box-fill: each mask is its prompt box; no "
                        "weights needed) to measure the pipeline alone")
    p.add_argument("--decode-chunk", type=int, help="images per decoded block (default 16, or 256 with --baseline)")
    g = p.add_argument_group("prompts")
    g.add_argument("--prompts", default="shard",
                   help="shard | detector:NAME | grid, several joined by commas, or A|B: B's prompts for the images "
                        "A gives none (shard|grid, shard|detector:NAME)")
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
    p.add_argument("--ray-address", help="Ray address; 'local' starts a new local Ray (default: RAY_ADDRESS)")
    add_model_args(p, default_preset="ovsam_rn50x16")


def _concurrency(text: str) -> int | tuple[int, int]:
    parts = [int(x) for x in str(text).split(",")]
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def label_config(a: argparse.Namespace) -> LabelConfig:
    from ovsam_ray.cli import model_config

    if a.baseline:  # no model, so no weights: the model config only names the vocabulary
        a.random_init = True
    return LabelConfig(
        input=a.input,
        output=a.output,
        model=model_config(a),
        batch_size=a.batch_size,
        images_per_call=a.images_per_call,
        concurrency=_concurrency(a.concurrency),
        num_gpus=a.num_gpus,
        overwrite=a.overwrite,
        max_error_fraction=a.max_error_fraction,
        limit=a.limit,
        with_embedding=a.with_embedding,
        prompts=a.prompts,
        select=SelectConfig(grid_size=a.grid_size, grid_stability=a.grid_stability, grid_nms_iou=a.grid_nms_iou,
                            min_mask_area=a.min_mask_area, dedup_iou=a.dedup_iou,
                            dedup_containment=a.dedup_containment, dedup_class_aware=a.dedup_class_aware),
        detector_weights=a.detector_weights,
        detector_score_threshold=a.detector_score_threshold,
        detector_nms_iou=a.detector_nms_iou,
        detector_max_per_image=a.detector_max_per_image,
        detector_num_gpus=a.detector_num_gpus,
        detector_concurrency=a.detector_concurrency,
        baseline=a.baseline,
        decode_chunk=a.decode_chunk,
        max_prompts=a.max_prompts,
    )


def init_ray(address: str | None = None) -> None:
    """Join the cluster the job runs in (RAY_ADDRESS / ray job submit) or start a local one."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address == "local":
        ray.init(address="local", include_dashboard=False)
    elif address:
        ray.init(address=address)
    else:
        ray.init(include_dashboard=False)


def run_label_cli(a: argparse.Namespace) -> int:
    from ovsam_ray.pipeline.label_job import run_label

    cfg = label_config(a)
    # Ray starts only once the input is listed and the output's lease is held.
    summary = run_label(cfg, connect=lambda: init_ray(a.ray_address))
    print(json.dumps(summary.to_dict(), indent=1))
    return summary.exit_code(cfg.max_error_fraction)


def _relabel(a: argparse.Namespace) -> int:
    from ovsam_ray.pipeline.relabel import RelabelConfig, run_relabel

    cfg = RelabelConfig(input=a.input, output=a.output, vocab=a.vocab, overwrite=a.overwrite,
                        s3_endpoint=a.s3_endpoint)
    init_ray(a.ray_address)
    print(json.dumps(run_relabel(cfg), indent=1))
    return 0


def _convert_clip(a: argparse.Namespace) -> int:
    from ovsam_ray.weights import convert_torchscript_clip

    print(f"{convert_torchscript_clip(a.input, a.output)} tensors -> {a.output}")
    return 0


def _demo_data(a: argparse.Namespace) -> int:
    from ovsam_ray.data.synthetic import generate_shards

    urls = generate_shards(a.output, num_images=a.num_images, images_per_shard=a.images_per_shard, seed=a.seed,
                           s3_endpoint=a.s3_endpoint)
    print(f"{len(urls)} shards, {a.num_images} images -> {a.output}")
    return 0


def _demo(a: argparse.Namespace) -> int:
    from ovsam_ray.demo import DemoConfig, run_demo

    return run_demo(DemoConfig(work_dir=a.work_dir, quick=a.quick, num_images=a.num_images, seed=a.seed))


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("label", help="the label job: WebDataset shards -> Parquet labels")
    add_label_args(p)
    p.set_defaults(func=run_label_cli)

    p = sub.add_parser("relabel", help="re-score stored embeddings with a new vocabulary (no images)")
    p.add_argument("--input", required=True, help="a label output written with --with-embedding")
    p.add_argument("--output", required=True)
    p.add_argument("--vocab", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--s3-endpoint")
    p.add_argument("--ray-address")
    p.set_defaults(func=_relabel)

    p = sub.add_parser("convert-clip", help="OpenAI's TorchScript CLIP file -> a plain state dict (once)")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.set_defaults(func=_convert_clip)

    p = sub.add_parser("demo-data", help="generate synthetic named-shape shards (with ground truth)")
    p.add_argument("--output", required=True)
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--images-per-shard", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--s3-endpoint")
    p.set_defaults(func=_demo_data)

    p = sub.add_parser("demo", help="generate data, (train the tiny model,) label it on a local Ray")
    p.add_argument("--work-dir", default="demo_out")
    p.add_argument("--quick", action="store_true", help="skip training: random weights, about a minute")
    p.add_argument("--num-images", type=int, default=160,
                   help="held-out images to label and score (160: ~420 objects, ~315 of the seen shapes)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo)

    try:
        from ovsam_ray.cli_data import add_data_subcommands
    except ImportError:  # dataset/evaluation modules not installed in this build
        pass
    else:
        add_data_subcommands(sub)

    try:
        from ovsam_ray.training.cli import add_train_subcommands
    except ImportError:  # training modules not installed in this build
        return
    add_train_subcommands(sub)
