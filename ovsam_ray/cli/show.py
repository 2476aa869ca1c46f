"""``ovsam-ray show``: overlay PNGs (masks, boxes, labels) of sampled labelled images."""

from __future__ import annotations

import argparse
import dataclasses

from ovsam_ray.cli.common import RAW_HELP, check_locations, reading
from ovsam_ray.cli.flags import add_flags, config_from_args
from ovsam_ray.show import ShowConfig, show

__all__ = ["add_show"]


def _show(a: argparse.Namespace) -> int:
    check_locations(a, ("input", "shards"), labels=a.input)
    options = dataclasses.asdict(config_from_args(a, ShowConfig))
    with reading(a.raw):
        written = show(options.pop("input"), options.pop("output"), **options)
    print("\n".join(written))
    return 0


def add_show(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("show", help="overlay PNGs (masks, boxes, labels) for sampled labelled images")
    add_flags(p, ShowConfig)
    p.add_argument("--raw", action="store_true", help=RAW_HELP)
    p.set_defaults(func=_show)
