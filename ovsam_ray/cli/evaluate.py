"""``ovsam-ray eval``: the paper's evaluations, interactive (ground-truth prompts) or detector-box mask AP."""

from __future__ import annotations

import argparse

from ovsam_ray.cli.common import add_model_args, init_ray, model_config
from ovsam_ray.cli.flags import add_flags, config_from_args
from ovsam_ray.evaluation.run_eval import EvalConfig, run_eval

__all__ = ["add_eval", "eval_config"]


def eval_config(a: argparse.Namespace) -> EvalConfig:
    """The flags -> EvalConfig; no model with --labels and no model flag (the labels' record names it)."""
    no_model = not (a.weights or a.random_init or a.sam_checkpoint or a.clip2sam_checkpoint)
    return config_from_args(a, EvalConfig, model=None if (a.labels and no_model) else model_config(a))


def _eval(a: argparse.Namespace) -> int:
    cfg = eval_config(a)
    init_ray(a.ray_address)
    result = run_eval(cfg)
    print(result["markdown"])
    return 0


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="the paper's evaluations: interactive (GT prompts) or detector-box mask AP")
    add_flags(p, EvalConfig)
    p.add_argument("--ray-address", help="Ray address; 'local' starts a new local Ray (default: RAY_ADDRESS)")
    add_model_args(p)
    p.set_defaults(func=_eval)
