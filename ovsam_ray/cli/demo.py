"""``ovsam-ray demo-data`` (synthetic shape shards) and ``demo`` (data, training, labelling, scores)."""

from __future__ import annotations

import argparse

from ovsam_ray.cli.flags import add_flags, config_from_args
from ovsam_ray.demo import DemoConfig, DemoDataConfig

__all__ = ["add_demo", "add_demo_data"]


def _demo_data(a: argparse.Namespace) -> int:
    from ovsam_ray.data.synthetic import generate_shards

    cfg = config_from_args(a, DemoDataConfig)
    urls = generate_shards(
        cfg.output,
        num_images=cfg.num_images,
        images_per_shard=cfg.images_per_shard,
        seed=cfg.seed,
        s3_endpoint=cfg.s3_endpoint,
    )
    print(f"{len(urls)} shards, {cfg.num_images} images -> {cfg.output}")
    return 0


def _demo(a: argparse.Namespace) -> int:
    from ovsam_ray.demo import run_demo

    return run_demo(config_from_args(a, DemoConfig))


def add_demo_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo-data", help="generate synthetic named-shape shards (with ground truth)")
    add_flags(p, DemoDataConfig)
    p.set_defaults(func=_demo_data)


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="generate data, (train the tiny model,) label it on a local Ray")
    add_flags(p, DemoConfig)
    p.set_defaults(func=_demo)
