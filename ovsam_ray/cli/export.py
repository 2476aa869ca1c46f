"""``ovsam-ray export <format>``: a label output -> COCO json, YOLO txt, Label Studio json, SA-1B json
or labelled WebDataset shards."""

from __future__ import annotations

import argparse

from ovsam_ray.cli.common import check_locations, print_json

__all__ = ["add_export"]


def _export(a: argparse.Namespace) -> int:
    from ovsam_ray.export import EXPORTERS

    check_locations(a, ("input", "shards", "categories", "classes"), labels=a.input)
    # The flags of ``export <format>`` other than --input/--output are its exporter's keyword arguments.
    options = {k: v for k, v in vars(a).items() if k not in ("command", "format", "func", "input", "output")}
    print_json(EXPORTERS[a.format](a.input, a.output, **options))
    return 0


def _export_args(p: argparse.ArgumentParser, output_help: str) -> None:
    p.add_argument("--input", required=True, help="label output (folder or s3:// prefix)")
    p.add_argument("--output", required=True, help=output_help)
    p.add_argument("--min-score", type=float, default=0.0)
    p.add_argument("--shards", help="input shards (default: the label run record's input)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the files of an earlier export of this format (never anyone else's files)")
    p.add_argument("--s3-endpoint")


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="labels -> COCO json, YOLO txt, Label Studio json, SA-1B json, WebDataset")
    fmt = p.add_subparsers(dest="format", required=True)
    q = fmt.add_parser("coco", help="one COCO instances json (RLE masks, scores), or --results")
    _export_args(q, "the .json file to write")
    q.add_argument("--categories", help="COCO json / _categories.json / vocabulary giving the category ids "
                                        "(default: coco_ov/lvis_v1 labels get COCO's/LVIS's own ids)")
    q.add_argument("--label-source", default="ovsam", choices=("ovsam", "detector"))
    q.add_argument("--score", default="auto", choices=("auto", "detector", "label", "product"))
    q.add_argument("--results", action="store_true", help="a COCO results array (COCO.loadRes) instead")
    q.add_argument("--with-images", action="store_true", help="also copy the images to <output folder>/images/")
    q = fmt.add_parser("yolo", help="YOLO segmentation txt per image + data.yaml")
    _export_args(q, "folder for labels/, images/ and data.yaml")
    q.add_argument("--classes", help="vocabulary or COCO json fixing the class order (default: the labels' vocabulary)")
    q.add_argument("--with-images", action="store_true", help="also copy the images out of the shards")
    q.add_argument("--tolerance", type=float, default=1.0, help="polygon simplification, pixels")
    q = fmt.add_parser("labelstudio", help="Label Studio tasks with mask predictions (brush RLE or polygons)")
    _export_args(q, "the .json file to write (its labelling config goes to <name>.config.xml)")
    q.add_argument("--image-url", default="{file_name}",
                   help="template over {file_name} (<shard>/<key>.<ext> as written under images/ by "
                        "coco/yolo --with-images), {shard}, {key}, {image_id}, {ext}")
    q.add_argument("--masks", default="brush", choices=("brush", "polygon"))
    q.add_argument("--from-name", default="label")
    q.add_argument("--to-name", default="image")
    q.add_argument("--tolerance", type=float, default=1.0, help="polygon simplification, pixels")
    q = fmt.add_parser("sa1b", help="SA-1B-style json per image")
    _export_args(q, "folder for <shard>/<key>.json")
    q = fmt.add_parser("wds", help="labelled WebDataset shards: image + <key>.json with the instances")
    _export_args(q, "folder or s3:// prefix for <shard>.tar")
    p.set_defaults(func=_export)
