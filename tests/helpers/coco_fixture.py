"""A tiny COCO-format dataset the converter/export/eval tests generate: shapes painted where
pycocotools says their masks are (polygons rasterised by pycocotools, RLE encoded by it)."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from ovsam_ray.data.rle import annotation_rle, boxes_from_binary_masks, decode_rle
from ovsam_ray.data.synthetic import encode_image
from ovsam_ray.labels.committer import ShardCommitter
from ovsam_ray.labels.schema import rows_to_table

CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 3, "name": "square", "supercategory": "shape"},
    {"id": 7, "name": "triangle", "supercategory": "shape"},
]
IMAGE_IDS = (5, 9, 12)
NAMES = {c["id"]: c["name"] for c in CATEGORIES}
WIDTH, HEIGHT = 64, 48


def rle_str(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def polygon_mask(poly: list[float], h: int = HEIGHT, w: int = WIDTH) -> np.ndarray:
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([poly], h, w))).astype(bool)


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    flat = mask.astype(np.uint8).ravel(order="F")
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], change])).tolist()
    return {"size": list(mask.shape), "counts": [int(c) for c in counts if c >= 0]}


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]


def make_coco(root: str, *, image_dir: str = "images") -> tuple[str, str, dict[str, Any], dict[int, np.ndarray]]:
    """Write ``root/instances.json`` and ``root/<image_dir>/<id>.png``; return their paths, the
    dataset and every annotation's mask by annotation id.

    Image 5: a square (polygon), a circle (compressed RLE) and a crowd triangle (uncompressed RLE);
    image 9: a square and a circle; image 12: no annotations.
    """
    rng = np.random.default_rng(0)
    images_dir = os.path.join(root, image_dir)
    os.makedirs(images_dir, exist_ok=True)
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    images, anns, masks = [], [], {}
    ann_id = 100
    for n, image_id in enumerate(IMAGE_IDS):
        pixels = rng.integers(0, 60, (HEIGHT, WIDTH, 3)).astype(np.uint8)
        objects = []
        if n < 2:
            x0 = 4 + 6 * n
            square = [x0, 4, x0 + 20, 4, x0 + 20, 24, x0, 24]
            objects.append((3, polygon_mask(square), [square], 0))
            circle = (yy - 30) ** 2 + (xx - 44 + 4 * n) ** 2 < 10**2
            objects.append((1, circle, "rle", 0))
        if n == 0:
            tri = polygon_mask([30, 2, 46, 2, 38, 14]) & ~objects[1][1]
            objects.append((7, tri, "crowd", 1))
        for colour, (cat, mask, segm, crowd) in zip(([230, 40, 40], [40, 230, 40], [40, 40, 230]), objects):
            pixels[mask] = colour
            ann_id += 1
            segmentation = (
                segm if isinstance(segm, list) else (rle_str(mask) if segm == "rle" else uncompressed_rle(mask))
            )
            anns.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": cat,
                    "segmentation": segmentation,
                    "area": float(mask.sum()),
                    "bbox": _bbox(mask),
                    "iscrowd": crowd,
                }
            )
            masks[ann_id] = mask
        name = f"{image_id:012d}.png"
        with open(os.path.join(images_dir, name), "wb") as f:
            f.write(encode_image(pixels, "png"))
        images.append(
            {
                "id": image_id,
                "file_name": name,
                "width": WIDTH,
                "height": HEIGHT,
                "coco_url": f"http://images.cocodataset.org/val2017/{name}",
            }
        )
    dataset = {"info": {}, "images": images, "annotations": anns, "categories": CATEGORIES}
    path = os.path.join(root, "instances.json")
    with open(path, "w") as f:
        json.dump(dataset, f)
    return path, images_dir, dataset, masks


def gt_label_output(dataset: dict, out: str, *, s3_endpoint: str | None = None, shard_of=None) -> None:
    """A label output whose masks ARE the ground truth (non-crowd objects), labelled correctly."""
    shard_of = shard_of or (lambda image_id: "shard-000000")
    rows: dict[str, list] = {}
    for image in sorted(dataset["images"], key=lambda im: im["id"]):
        insts = []
        for ann in dataset["annotations"]:
            if ann["image_id"] != image["id"] or ann["iscrowd"]:
                continue
            rle = annotation_rle(ann, image["height"], image["width"])
            mask = decode_rle(rle)
            insts.append(
                {
                    "prompt_type": "box",
                    "prompt_box": boxes_from_binary_masks(mask[None])[0].tolist(),
                    "bbox": boxes_from_binary_masks(mask[None])[0].tolist(),
                    "area": int(mask.sum()),
                    "rle": rle,
                    "label": NAMES[ann["category_id"]],
                    "label_id": ann["category_id"],
                    "label_score": 0.8,
                    "topk_labels": [NAMES[ann["category_id"]]],
                    "topk_scores": [0.8],
                }
            )
        rows.setdefault(shard_of(image["id"]), []).append(
            {
                "key": f"{image['id']:012d}",
                "shard": shard_of(image["id"]),
                "image_id": image["id"],
                "width": image["width"],
                "height": image["height"],
                "status": "ok",
                "instances": insts,
            }
        )
    committer = ShardCommitter(out, s3_endpoint=s3_endpoint)
    for name, shard_rows in rows.items():
        if name == "shard-000000":
            shard_rows.append({"key": "broken", "shard": name, "status": "error", "error": "undecodable image"})
        committer.commit(name, rows_to_table(shard_rows), {})


def coco_label_output(root: str) -> dict[str, str]:
    """A COCO fixture under ``root``, its shards and a label output of its ground truth: the
    ``labels``, ``shards``, ``annotations`` and ``images`` locations."""
    from ovsam_ray.convert import convert_coco

    ann_path, images, dataset, _ = make_coco(os.path.join(root, "coco"))
    shards = os.path.join(root, "shards")
    convert_coco(ann_path, images, shards)
    labels = os.path.join(root, "labels")
    gt_label_output(dataset, labels)
    return {"labels": labels, "shards": shards, "annotations": ann_path, "images": images}
