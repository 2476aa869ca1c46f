"""``ovsam-ray export <format>``: a label output -> COCO json, YOLO txt, Label Studio json, SA-1B json
or labelled WebDataset shards."""

from __future__ import annotations

import argparse

from ovsam_ray.cli.common import RAW_HELP, check_locations, print_json, reading
from ovsam_ray.cli.flags import add_flags
from ovsam_ray.export import EXPORTERS
from ovsam_ray.export.options import EXPORT_OPTIONS

__all__ = ["add_export"]


def _export(a: argparse.Namespace) -> int:
    check_locations(a, ("input", "shards", "categories", "classes"), labels=a.input)
    # The flags of ``export <format>`` other than --input/--output are its exporter's keyword arguments.
    options = {k: v for k, v in vars(a).items() if k not in ("command", "format", "func", "input", "output", "raw")}
    with reading(a.raw):
        print_json(EXPORTERS[a.format](a.input, a.output, **options))
    return 0


def _export_args(p: argparse.ArgumentParser, fmt: str, output_help: str) -> None:
    """--input, --output and one flag per keyword of the format's exporter (``export/options.py``)."""
    p.add_argument("--input", required=True, help="label output (folder or s3:// prefix)")
    p.add_argument("--output", required=True, help=output_help)
    add_flags(p, EXPORT_OPTIONS[fmt])
    p.add_argument("--raw", action="store_true", help=RAW_HELP)


#: Format -> (its help, what --output names).
_FORMATS = {
    "coco": ("one COCO instances json (RLE masks, scores), or --results", "the .json file to write"),
    "yolo": ("YOLO segmentation txt per image + data.yaml", "folder for labels/, images/ and data.yaml"),
    "labelstudio": (
        "Label Studio tasks with mask predictions (brush RLE or polygons)",
        "the .json file to write (its labelling config goes to <name>.config.xml)",
    ),
    "sa1b": ("SA-1B-style json per image", "folder for <shard>/<key>.json"),
    "wds": (
        "labelled WebDataset shards: image + <key>.json with the instances",
        "folder or s3:// prefix for <shard>.tar",
    ),
}


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="labels -> COCO json, YOLO txt, Label Studio json, SA-1B json, WebDataset")
    fmt = p.add_subparsers(dest="format", required=True)
    for name, (text, output_help) in _FORMATS.items():
        _export_args(fmt.add_parser(name, help=text), name, output_help)
    p.set_defaults(func=_export)
