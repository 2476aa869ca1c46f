"""``ovsam-ray predict``: masks and labels for the prompts of one image."""

from __future__ import annotations

import argparse

from ovsam_ray.cli.flags import add_flags, config_from_args
from ovsam_ray.predict import PredictConfig

__all__ = ["add_predict"]


def _predict(a: argparse.Namespace) -> int:
    from ovsam_ray.predict import run_predict

    result = run_predict(config_from_args(a, PredictConfig))
    print(f"{len(result['instances'])} instances -> {a.output}")
    return 0


def add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="masks and labels for the prompts of one image")
    add_flags(p, PredictConfig)
    p.set_defaults(func=_predict)
