"""``ovsam-ray demo-data`` (synthetic shape shards) and ``demo`` (data, training, labelling, scores)."""

from __future__ import annotations

import argparse

__all__ = ["add_demo", "add_demo_data"]


def _demo_data(a: argparse.Namespace) -> int:
    from ovsam_ray.data.synthetic import generate_shards

    urls = generate_shards(
        a.output, num_images=a.num_images, images_per_shard=a.images_per_shard, seed=a.seed, s3_endpoint=a.s3_endpoint
    )
    print(f"{len(urls)} shards, {a.num_images} images -> {a.output}")
    return 0


def _demo(a: argparse.Namespace) -> int:
    from ovsam_ray.demo import DemoConfig, run_demo

    return run_demo(DemoConfig(work_dir=a.work_dir, quick=a.quick, num_images=a.num_images, seed=a.seed))


def add_demo_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo-data", help="generate synthetic named-shape shards (with ground truth)")
    p.add_argument("--output", required=True)
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--images-per-shard", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--s3-endpoint")
    p.set_defaults(func=_demo_data)


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="generate data, (train the tiny model,) label it on a local Ray")
    p.add_argument("--work-dir", default="demo_out")
    p.add_argument("--quick", action="store_true", help="skip training: random weights, about a minute")
    p.add_argument(
        "--num-images",
        type=int,
        default=176,
        help="held-out images to label and score (176: 426 objects, 323 of the seen shapes)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo)
