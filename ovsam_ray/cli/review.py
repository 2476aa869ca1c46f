"""``ovsam-ray review select|import``: the instances worth a person's look as Label Studio and CVAT
tasks; the reviewed export back as corrections beside the labels."""

from __future__ import annotations

import argparse

from ovsam_ray.cli.common import check_locations, print_json
from ovsam_ray.cli.flags import add_flags, config_from_args

__all__ = ["add_review"]


def _select(a: argparse.Namespace) -> int:
    from ovsam_ray.review import ReviewSelectConfig, select_for_review

    check_locations(a, ("input", "shards"), labels=a.input)
    print_json(select_for_review(config_from_args(a, ReviewSelectConfig)))
    return 0


def _import(a: argparse.Namespace) -> int:
    from ovsam_ray.review import ImportConfig, import_review

    print_json(import_review(config_from_args(a, ImportConfig)))
    return 0


def add_review(sub: argparse._SubParsersAction) -> None:
    from ovsam_ray.review import ImportConfig, ReviewSelectConfig

    p = sub.add_parser("review", help="pick instances for review (Label Studio, CVAT); import the corrections")
    cmd = p.add_subparsers(dest="review_command", required=True)
    s = cmd.add_parser("select", help="the instances most worth a look -> selection.parquet + review tasks")
    add_flags(s, ReviewSelectConfig)
    s.set_defaults(func=_select)
    i = cmd.add_parser("import", help="a reviewed Label Studio / CVAT export -> corrections beside the labels")
    add_flags(i, ImportConfig)
    i.set_defaults(func=_import)
