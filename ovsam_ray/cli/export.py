"""Subcommands around the label job: ``convert``, ``eval``, ``export``, ``show``."""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["add_data_subcommands"]


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=1, default=str))


# --- convert -------------------------------------------------------------------------------------


def _shard_args(p: argparse.ArgumentParser, prompts: bool = True) -> None:
    p.add_argument("--output", required=True, help="folder or s3:// prefix for shard-NNNNNN.tar")
    p.add_argument("--images-per-shard", type=int, default=1000)
    p.add_argument("--limit", type=int, help="convert only the first N images")
    p.add_argument("--workers", type=int, default=4, help="shards built in parallel (threads)")
    p.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (else AWS_ENDPOINT_URL)")
    if prompts:
        p.add_argument("--prompts", default="box", choices=("box", "point", "both", "none"),
                       help="prompts written from the ground truth (boxes; interior points; both; none)")


def _common(a: argparse.Namespace) -> dict[str, Any]:
    return {"images_per_shard": a.images_per_shard, "limit": a.limit, "workers": a.workers,
            "s3_endpoint": a.s3_endpoint}


def _convert(a: argparse.Namespace) -> int:
    from ovsam_ray import convert

    if a.format == "coco":
        summary = convert.convert_coco(a.annotations, a.images, a.output, prompts=a.prompts, **_common(a))
    elif a.format == "lvis":
        summary = convert.convert_lvis(a.annotations, a.images, a.output, prompts=a.prompts, **_common(a))
    elif a.format == "sa1b":
        summary = convert.convert_sa1b(a.input, a.output, prompts=a.prompts, **_common(a))
    elif a.format == "imagenet":
        summary = convert.convert_imagenet(a.input, a.output, synsets=a.synsets, **_common(a))
    else:
        summary = convert.convert_detections(a.results, a.annotations, a.images, a.output, min_score=a.min_score,
                                             max_per_image=a.max_per_image, keep_ground_truth=not a.no_ground_truth,
                                             **_common(a))
    _print(summary.to_dict())
    return 0


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="datasets -> WebDataset shards (COCO, LVIS, SA-1B, ImageNet, detections)")
    fmt = p.add_subparsers(dest="format", required=True)
    q = fmt.add_parser("coco", help="COCO instances json + image folder")
    q.add_argument("--annotations", required=True, help="instances_*.json")
    q.add_argument("--images", required=True, help="the image folder (file_name is relative to it)")
    _shard_args(q)
    q = fmt.add_parser("lvis", help="LVIS v1 json + COCO root (train2017/, val2017/)")
    q.add_argument("--annotations", required=True, help="lvis_v1_*.json")
    q.add_argument("--images", required=True, help="COCO root holding train2017/ and val2017/")
    _shard_args(q)
    q = fmt.add_parser("sa1b", help="SA-1B: sa_*.jpg + sa_*.json (folder or tars)")
    q.add_argument("--input", required=True, help="folder/prefix of image+json pairs, or tar files (glob, range)")
    _shard_args(q)
    q = fmt.add_parser("imagenet", help="classification: folder per class or tar per class")
    q.add_argument("--input", required=True, help="folder holding <synset>/ folders or <synset>.tar files")
    q.add_argument("--synsets", help="synset -> name map (LOC_synset_mapping.txt, words.txt or json)")
    _shard_args(q, prompts=False)
    q = fmt.add_parser("detections", help="COCO results json (detector boxes) -> boxes/scores/labels")
    q.add_argument("--results", required=True, help="COCO results json: [{image_id, category_id, bbox, score}]")
    q.add_argument("--annotations", required=True, help="COCO/LVIS json with the images and categories")
    q.add_argument("--images", required=True, help="the image folder (COCO root for LVIS)")
    q.add_argument("--min-score", type=float, default=0.0)
    q.add_argument("--max-per-image", type=int, default=100)
    q.add_argument("--no-ground-truth", action="store_true", help="do not copy the json's annotations")
    _shard_args(q, prompts=False)
    p.set_defaults(func=_convert)


# --- eval ----------------------------------------------------------------------------------------


def _eval(a: argparse.Namespace) -> int:
    from ovsam_ray.cli import model_config
    from ovsam_ray.cli_jobs import _concurrency, init_ray
    from ovsam_ray.evaluation.run_eval import EvalConfig, run_eval

    no_model = not (a.weights or a.random_init or a.sam_checkpoint or a.clip2sam_checkpoint)
    cfg = EvalConfig(
        input=a.input, output=a.output, mode=a.mode, prompts=a.prompts, label_source=a.label_source, score=a.score,
        categories=a.categories, max_dets=a.max_dets, labels=a.labels,
        model=None if (a.labels and no_model) else model_config(a), batch_size=a.batch_size,
        concurrency=_concurrency(a.concurrency), num_gpus=a.num_gpus, overwrite=a.overwrite,
    )
    init_ray(a.ray_address)
    result = run_eval(cfg)
    print(result["markdown"])
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    from ovsam_ray.cli import add_model_args

    p = sub.add_parser("eval", help="the paper's evaluations: interactive (GT prompts) or detector-box mask AP")
    p.add_argument("--mode", default="interactive", choices=("interactive", "detector"))
    p.add_argument("--input", required=True, help="shards with ground-truth annotations (detector: and boxes)")
    p.add_argument("--output", required=True, help="folder or s3:// prefix: prompted shards, labels, metrics")
    p.add_argument("--prompts", default="both", choices=("box", "point", "both"), help="interactive prompts")
    p.add_argument("--label-source", default="ovsam", choices=("ovsam", "detector"), help="detector mode labels")
    p.add_argument("--score", default="auto", choices=("auto", "detector", "label", "product"))
    p.add_argument("--categories", help="COCO/LVIS json (or _categories.json) with the full category list")
    p.add_argument("--max-dets", type=int, default=100, help="detections per image for AP (LVIS: 300)")
    p.add_argument("--labels", help="score this existing label output instead of running the label job")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--concurrency", default="1", help="model actors: N or MIN,MAX")
    p.add_argument("--num-gpus", type=float, default=0.0)
    p.add_argument("--overwrite", action="store_true", help="redo prompted shards and labels")
    p.add_argument("--ray-address", help="Ray address; 'local' starts a new local Ray (default: RAY_ADDRESS)")
    add_model_args(p)
    p.set_defaults(func=_eval)


# --- export --------------------------------------------------------------------------------------


def _export(a: argparse.Namespace) -> int:
    from ovsam_ray import export

    s3 = {"s3_endpoint": a.s3_endpoint}
    if a.format == "coco":
        stats = export.export_coco(a.input, a.output, categories=a.categories, label_source=a.label_source,
                                   score=a.score, min_score=a.min_score, results=a.results, shards=a.shards,
                                   with_images=a.with_images, **s3)
    elif a.format == "yolo":
        stats = export.export_yolo(a.input, a.output, classes=a.classes, shards=a.shards, tolerance=a.tolerance,
                                   min_score=a.min_score, with_images=a.with_images, **s3)
    elif a.format == "labelstudio":
        stats = export.export_labelstudio(a.input, a.output, image_url=a.image_url, masks=a.masks, shards=a.shards,
                                          from_name=a.from_name, to_name=a.to_name, tolerance=a.tolerance,
                                          min_score=a.min_score, **s3)
    elif a.format == "wds":
        stats = export.export_wds(a.input, a.output, shards=a.shards, min_score=a.min_score, **s3)
    else:
        stats = export.export_sa1b(a.input, a.output, min_score=a.min_score, shards=a.shards, **s3)
    _print(stats)
    return 0


def _export_args(p: argparse.ArgumentParser, output_help: str) -> None:
    p.add_argument("--input", required=True, help="label output (folder or s3:// prefix)")
    p.add_argument("--output", required=True, help=output_help)
    p.add_argument("--min-score", type=float, default=0.0)
    p.add_argument("--shards", help="input shards (default: the label run record's input)")
    p.add_argument("--s3-endpoint")


def _add_export(sub: argparse._SubParsersAction) -> None:
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
    q.add_argument("--image-url", default="{shard}/{key}.{ext}",
                   help="template over {shard}, {key}, {image_id}, {ext}")
    q.add_argument("--masks", default="brush", choices=("brush", "polygon"))
    q.add_argument("--from-name", default="label")
    q.add_argument("--to-name", default="image")
    q.add_argument("--tolerance", type=float, default=1.0, help="polygon simplification, pixels")
    q = fmt.add_parser("sa1b", help="SA-1B-style json per image")
    _export_args(q, "folder for <shard>/<key>.json")
    q = fmt.add_parser("wds", help="labelled WebDataset shards: image + <key>.json with the instances")
    _export_args(q, "folder or s3:// prefix for <shard>.tar")
    p.set_defaults(func=_export)


# --- show ----------------------------------------------------------------------------------------


def _show(a: argparse.Namespace) -> int:
    from ovsam_ray.show import show

    written = show(a.input, a.output, n=a.n, shards=a.shards, seed=a.seed, min_score=a.min_score,
                   sheet=a.sheet, s3_endpoint=a.s3_endpoint)
    print("\n".join(written))
    return 0


def _add_show(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("show", help="overlay PNGs (masks, boxes, labels) for sampled labelled images")
    p.add_argument("--input", required=True, help="label output")
    p.add_argument("--output", required=True, help="folder for the PNGs")
    p.add_argument("-n", type=int, default=8, help="number of images")
    p.add_argument("--shards", help="input shards (default: the label run record's input)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-score", type=float, default=0.0)
    p.add_argument("--sheet", action="store_true", help="also one contact_sheet.png of all N overlays")
    p.add_argument("--s3-endpoint")
    p.set_defaults(func=_show)


def add_data_subcommands(sub: argparse._SubParsersAction) -> None:
    """Add ``convert``, ``eval``, ``export`` and ``show`` to the ``ovsam-ray`` parser."""
    _add_convert(sub)
    _add_eval(sub)
    _add_export(sub)
    _add_show(sub)
