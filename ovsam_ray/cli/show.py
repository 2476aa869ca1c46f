"""``ovsam-ray show``: overlay PNGs (masks, boxes, labels) of sampled labelled images."""

from __future__ import annotations

import argparse

from ovsam_ray.cli.common import RAW_HELP, check_locations

__all__ = ["add_show"]


def _show(a: argparse.Namespace) -> int:
    from ovsam_ray.cli.common import reading
    from ovsam_ray.show import show

    check_locations(a, ("input", "shards"), labels=a.input)
    with reading(a.raw):
        written = show(
            a.input,
            a.output,
            n=a.n,
            shards=a.shards,
            seed=a.seed,
            min_score=a.min_score,
            sheet=a.sheet,
            overwrite=a.overwrite,
            s3_endpoint=a.s3_endpoint,
        )
    print("\n".join(written))
    return 0


def add_show(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("show", help="overlay PNGs (masks, boxes, labels) for sampled labelled images")
    p.add_argument("--input", required=True, help="label output")
    p.add_argument("--output", required=True, help="folder for the PNGs")
    p.add_argument("-n", type=int, default=8, help="number of images")
    p.add_argument("--shards", help="input shards (default: the label run record's input)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-score", type=float, default=0.0)
    p.add_argument("--sheet", action="store_true", help="also one contact_sheet.png of all N overlays")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the PNGs of an earlier show in --output (never anyone else's files)",
    )
    p.add_argument("--s3-endpoint")
    p.add_argument("--raw", action="store_true", help=RAW_HELP)
    p.set_defaults(func=_show)
