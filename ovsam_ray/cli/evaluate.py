"""``ovsam-ray eval``: the paper's evaluations, interactive (ground-truth prompts) or detector-box mask AP."""

from __future__ import annotations

import argparse

from ovsam_ray.cli.common import add_model_args, init_ray, model_config, parse_concurrency

__all__ = ["add_eval"]


def _eval(a: argparse.Namespace) -> int:
    from ovsam_ray.evaluation.run_eval import EvalConfig, run_eval

    no_model = not (a.weights or a.random_init or a.sam_checkpoint or a.clip2sam_checkpoint)
    cfg = EvalConfig(
        input=a.input, output=a.output, mode=a.mode, prompts=a.prompts, label_source=a.label_source, score=a.score,
        categories=a.categories, max_dets=a.max_dets, labels=a.labels,
        model=None if (a.labels and no_model) else model_config(a), batch_size=a.batch_size,
        concurrency=parse_concurrency(a.concurrency), num_gpus=a.num_gpus, overwrite=a.overwrite,
    )
    init_ray(a.ray_address)
    result = run_eval(cfg)
    print(result["markdown"])
    return 0


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="the paper's evaluations: interactive (GT prompts) or detector-box mask AP")
    p.add_argument("--mode", default="interactive", choices=("interactive", "detector"))
    p.add_argument("--input", required=True, help="shards with ground-truth annotations (detector: and boxes)")
    p.add_argument("--output", required=True, help="folder or s3:// prefix: prompted shards, labels, metrics")
    p.add_argument("--prompts", default="both", choices=("box", "point", "both"), help="interactive prompts")
    p.add_argument("--label-source", default="ovsam", choices=("ovsam", "detector"), help="detector mode labels")
    p.add_argument("--score", default="auto", choices=("auto", "detector", "label", "product"))
    p.add_argument("--categories", help="COCO/LVIS json (or _categories.json) with the full category list")
    p.add_argument("--max-dets", type=int, default=100, help="detections per image for AP (LVIS: 300)")
    p.add_argument("--labels", help="score this existing label output instead of running the label job")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--concurrency", default="1", help="model actors: N or MIN,MAX")
    p.add_argument("--num-gpus", type=float, default=0.0)
    p.add_argument("--overwrite", action="store_true", help="redo prompted shards and labels")
    p.add_argument("--ray-address", help="Ray address; 'local' starts a new local Ray (default: RAY_ADDRESS)")
    add_model_args(p)
    p.set_defaults(func=_eval)
