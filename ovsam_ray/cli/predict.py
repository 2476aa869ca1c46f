"""``ovsam-ray predict``: masks and labels for the prompts of one image."""

from __future__ import annotations

import argparse

from ovsam_ray.cli.flags import add_flags, config_from_args
from ovsam_ray.errors import ConfigError
from ovsam_ray.predict import PredictConfig

__all__ = ["add_predict"]


def _predict(a: argparse.Namespace) -> int:
    from ovsam_ray.predict import run_predict

    cfg = config_from_args(a, PredictConfig)
    if cfg.overlay is not None and not cfg.overlay.lower().endswith(".png"):
        raise ConfigError(f"--overlay {cfg.overlay}: give a .png file name")
    result = run_predict(cfg)
    print(f"{len(result['instances'])} instances -> {a.output}")
    if cfg.overlay is not None:
        from ovsam_ray.show import write_overlay

        write_overlay(cfg.image, result["instances"], cfg.overlay, s3_endpoint=cfg.model.s3_endpoint)
        print(f"overlay -> {cfg.overlay}")
    return 0


def add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="masks and labels for the prompts of one image")
    add_flags(p, PredictConfig)
    p.set_defaults(func=_predict)
