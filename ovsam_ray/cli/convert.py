"""``ovsam-ray convert <format>`` (datasets -> WebDataset shards) and ``convert-clip``."""

from __future__ import annotations

import argparse

from ovsam_ray.cli.common import check_locations, print_json
from ovsam_ray.convert.mixed import ORDERS, STATE_FOLDER, TASK_IMAGES

__all__ = ["add_convert", "add_convert_clip", "add_reshard", "convert_parser", "run_convert_cli"]


def _run_args(p: argparse.ArgumentParser, ray_address: str | None = None) -> None:
    p.add_argument("--output", required=True, help="folder or s3:// prefix for shard-NNNNNN.tar")
    p.add_argument("--images-per-shard", type=int, default=1000)
    p.add_argument(
        "--workers",
        type=int,
        default=4,
        help="local processes writing shards (threads with --order source); unused with --ray-address",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the mixed order (which image goes to which shard)")
    p.add_argument(
        "--ray-address",
        default=ray_address,
        help="run the tasks on this Ray cluster with Ray Data (auto: the cluster this runs on); default: "
        + ("auto" if ray_address else "local processes"),
    )
    p.add_argument(
        "--task-images",
        type=int,
        default=TASK_IMAGES,
        help="images per scatter task (each task spills them to its local disk once)",
    )


def _shard_args(p: argparse.ArgumentParser, prompts: bool = True, ray_address: str | None = None) -> None:
    _run_args(p, ray_address)
    p.add_argument("--limit", type=int, help="convert only the first N images")
    p.add_argument(
        "--order",
        default="shuffled",
        choices=ORDERS,
        help="shuffled: every shard a seeded random sample of the dataset (default); source: the source's order",
    )
    p.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (else AWS_ENDPOINT_URL)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the shards of an earlier convert in --output (never anyone else's files)",
    )
    if prompts:
        p.add_argument(
            "--prompts",
            default="box",
            choices=("box", "point", "both", "none"),
            help="prompts written from the ground truth (boxes; interior points; both; none)",
        )


#: What a converter writes in its output folder: the shards (how many is known only at the end),
#: the summary and the image classes (see ovsam_ray.data.tar_writer).
_SHARD_NAME = r"shard-[0-9]{6}\.tar"
_FIXED_NAMES = ("_convert.json", "_image_classes.parquet")
#: The mixed writer's plan, staging files and markers (ovsam_ray.convert.mixed).
_STATE_NAMES = STATE_FOLDER + r"/.*"


def _convert_names(output: str, s3_endpoint: str | None) -> list[str]:
    """The names a conversion may write that exist already: every shard-NNNNNN.tar there counts,
    since the number of shards is not known before the samples are."""
    import re

    from ovsam_ray import storage

    there = [u.rstrip("/").rsplit("/", 1)[-1] for u in storage.list_files(output, s3_endpoint=s3_endpoint)]
    return [*_FIXED_NAMES, *(n for n in there if re.fullmatch(_SHARD_NAME, n))]


def _convert(a: argparse.Namespace) -> int:
    from ovsam_ray.convert import CONVERTERS, reshard

    check_locations(a, ("input", "annotations", "images", "synsets", "results"))
    # The flags of ``convert <format>`` (and ``reshard``) are its function's keyword arguments.
    options = {k: v for k, v in vars(a).items() if k not in ("command", "format", "func", "overwrite", "shuffle")}
    return _write(a, lambda: (reshard if a.command == "reshard" else CONVERTERS[a.format])(**options))


def _write(a: argparse.Namespace, run) -> int:
    from ovsam_ray import storage
    from ovsam_ray.written import writing

    with writing(
        a.output,
        "convert",
        _convert_names(a.output, a.s3_endpoint),
        overwrite=a.overwrite,
        patterns=[_SHARD_NAME, _STATE_NAMES],
        s3_endpoint=a.s3_endpoint,
    ) as claim:
        if a.overwrite:  # start afresh: an earlier run's plan and markers would make this a resume
            storage.remove_tree(storage.join(a.output, STATE_FOLDER), s3_endpoint=a.s3_endpoint)
        summary = run()
        claim.add(url.rstrip("/").rsplit("/", 1)[-1] for url in summary.shards)
    print_json(summary.to_dict())
    return 0


def convert_parser(parser: argparse.ArgumentParser, ray_address: str | None = None) -> argparse.ArgumentParser:
    """The ``convert <format>`` flags on ``parser`` (``jobs/convert.py``: ``--ray-address`` defaults to ``auto``)."""
    parser.set_defaults(command="convert")
    _formats(parser, ray_address)
    return parser


def run_convert_cli(a: argparse.Namespace) -> int:
    return int(a.func(a))


def _convert_clip(a: argparse.Namespace) -> int:
    from ovsam_ray.weights.files import convert_torchscript_clip

    check_locations(a, ("input",))
    print(f"{convert_torchscript_clip(a.input, a.output)} tensors -> {a.output}")
    return 0


def add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="datasets -> WebDataset shards (COCO, LVIS, SA-1B, ImageNet, detections)")
    _formats(p)


def add_reshard(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reshard", help="converted shards -> mixed shards (each a seeded random sample of the whole)")
    p.add_argument(
        "--shuffle",
        action="store_true",
        required=True,
        help="mix the images across shards (the one mode: for shards written class by class)",
    )
    p.add_argument("--input", required=True, help="the converted shards: folder, glob or brace range")
    _run_args(p)
    p.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (else AWS_ENDPOINT_URL)")
    p.add_argument("--overwrite", action="store_true", help="replace the shards of an earlier reshard in --output")
    p.set_defaults(func=_convert)


def _formats(p: argparse.ArgumentParser, ray_address: str | None = None) -> None:
    fmt = p.add_subparsers(dest="format", required=True)
    q = fmt.add_parser("coco", help="COCO instances json + image folder")
    q.add_argument("--annotations", required=True, help="instances_*.json")
    q.add_argument("--images", required=True, help="the image folder (file_name is relative to it)")
    _shard_args(q, ray_address=ray_address)
    q = fmt.add_parser("lvis", help="LVIS v1 json + COCO root (train2017/, val2017/)")
    q.add_argument("--annotations", required=True, help="lvis_v1_*.json")
    q.add_argument("--images", required=True, help="COCO root holding train2017/ and val2017/")
    _shard_args(q, ray_address=ray_address)
    q = fmt.add_parser("sa1b", help="SA-1B: sa_*.jpg + sa_*.json (folder or tars)")
    q.add_argument("--input", required=True, help="folder/prefix of image+json pairs, or tar files (glob, range)")
    _shard_args(q, ray_address=ray_address)
    q = fmt.add_parser("imagenet", help="classification: folder per class or tar per class")
    q.add_argument("--input", required=True, help="folder holding <synset>/ folders or <synset>.tar files")
    q.add_argument("--synsets", help="synset -> name map (LOC_synset_mapping.txt, words.txt or json)")
    _shard_args(q, prompts=False, ray_address=ray_address)
    q = fmt.add_parser("detections", help="COCO results json (detector boxes) -> boxes/scores/labels")
    q.add_argument("--results", required=True, help="COCO results json: [{image_id, category_id, bbox, score}]")
    q.add_argument("--annotations", required=True, help="COCO/LVIS json with the images and categories")
    q.add_argument("--images", required=True, help="the image folder (COCO root for LVIS)")
    q.add_argument("--min-score", type=float, default=0.0)
    q.add_argument("--max-per-image", type=int, default=100)
    q.add_argument(
        "--no-ground-truth", dest="keep_ground_truth", action="store_false", help="do not copy the json's annotations"
    )
    _shard_args(q, prompts=False, ray_address=ray_address)
    p.set_defaults(func=_convert)


def add_convert_clip(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert-clip", help="OpenAI's TorchScript CLIP file -> a plain state dict (once)")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.set_defaults(func=_convert_clip)
