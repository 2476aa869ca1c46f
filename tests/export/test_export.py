"""Exporters (COCO, YOLO, Label Studio, SA-1B), mask polygons, and the COCO round trip through the
label job."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
from coco_fixture import CATEGORIES, NAMES, gt_label_output, make_coco
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ovsam_ray.cli import main
from ovsam_ray.convert import convert_coco
from ovsam_ray.data.rle import boxes_from_binary_masks, decode_rle
from ovsam_ray.export import export_coco, export_labelstudio, export_sa1b, export_wds, export_yolo, mask_to_polygons
from ovsam_ray.inference import ModelConfig
from ovsam_ray.labels.reader import iter_label_batches, label_files
from ovsam_ray.pipeline.label_job import LabelConfig, run_label


def quiet_eval(gt: COCO, results: list) -> COCOeval:
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(results), "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


@pytest.fixture
def coco(tmp_path):
    return make_coco(str(tmp_path / "coco"))


def test_mask_to_polygons():
    m = np.zeros((6, 8), bool)
    m[1:4, 2:7] = True
    assert [p.tolist() for p in mask_to_polygons(m, tolerance=0)] == [[[7, 1], [7, 4], [2, 4], [2, 1]]]
    yy, xx = np.mgrid[:60, :80]
    disk = (yy - 30) ** 2 + (xx - 40) ** 2 < 20**2
    ring = disk & ((yy - 30) ** 2 + (xx - 40) ** 2 >= 8**2)
    two = disk | ((yy < 5) & (xx > 70))
    for mask, n in ((disk, 1), (ring, 1), (two, 2)):
        polys = mask_to_polygons(mask)
        assert len(polys) == n
        raster = mask_utils.decode(mask_utils.frPyObjects([polys[0].ravel().tolist()], 60, 80))[..., 0].astype(bool)
        assert (raster & disk).sum() / (raster | disk).sum() > 0.95  # the largest part's outline, holes dropped
    assert mask_to_polygons(np.zeros((5, 5), bool)) == []


def test_export_coco_of_ground_truth_masks_gives_ap_1(coco, tmp_path, bystanders):
    ann_path, _, dataset, _ = coco
    labels = str(tmp_path / "labels")
    gt_label_output(dataset, labels, shard_of=lambda i: "shard-000000" if i < 9 else "shard-000001")
    out = str(tmp_path / "export" / "coco.json")
    bystanders.around(tmp_path / "export")
    stats = export_coco(labels, out, categories=ann_path)
    assert stats == {
        "images": 3,
        "annotations": 4,
        "dropped": 0,
        "below_min_score": 0,
        "error_rows": 1,
        "images_written": 0,
        "images_missing": 0,
    }
    exported = json.load(open(out))
    assert sorted(im["id"] for im in exported["images"]) == [5, 9, 12]
    assert exported["categories"] == CATEGORIES
    ev = quiet_eval(COCO(ann_path), exported["annotations"])
    assert ev.stats[0] == pytest.approx(1.0) and ev.stats[1] == pytest.approx(1.0)
    # without a category list: the labels' own ids, COCO-loadable; and the CLI
    assert main(["export", "coco", "--input", labels, "--output", str(tmp_path / "c2.json")]) == 0
    c2 = json.load(open(tmp_path / "c2.json"))
    assert c2["categories"] == [{"id": 1, "name": "circle"}, {"id": 3, "name": "square"}]


def test_export_streams_in_batches(coco, tmp_path):
    _, _, dataset, _ = coco
    labels = str(tmp_path / "labels")
    gt_label_output(dataset, labels)
    assert [len(b) for b in iter_label_batches(labels, batch_size=2)] == [2, 2]
    assert len(label_files(labels)) == 1


def test_export_yolo(coco, tmp_path, bystanders):
    _, _, dataset, masks = coco
    labels = str(tmp_path / "labels")
    gt_label_output(dataset, labels)
    shards = str(tmp_path / "shards")
    convert_coco(coco[0], coco[1], shards)
    out = str(tmp_path / "yolo")
    bystanders.around(out)
    stats = export_yolo(labels, out, classes=coco[0], shards=shards, with_images=True)
    assert stats == {
        "images": 3,
        "instances": 4,
        "dropped": 0,
        "error_rows": 1,
        "images_written": 3,
        "images_missing": 0,
    }
    lines = open(os.path.join(out, "labels", "shard-000000", "000000000005.txt")).read().splitlines()
    assert [line.split()[0] for line in lines] == ["1", "0"]  # square, circle: positions in the category list
    coords = np.asarray(lines[0].split()[1:], float).reshape(-1, 2) * [64, 48]
    raster = mask_utils.decode(mask_utils.frPyObjects([coords.ravel().tolist()], 48, 64))[..., 0].astype(bool)
    assert (raster & masks[101]).sum() / (raster | masks[101]).sum() > 0.9
    assert open(os.path.join(out, "labels", "shard-000000", "000000000012.txt")).read() == ""
    assert os.path.exists(os.path.join(out, "images", "shard-000000", "000000000005.png"))
    yaml = open(os.path.join(out, "data.yaml")).read()
    assert 'names:\n  0: "circle"\n  1: "square"\n  2: "triangle"' in yaml


def test_export_labelstudio_and_sa1b(coco, tmp_path, bystanders):
    _, _, dataset, masks = coco
    labels = str(tmp_path / "labels")
    gt_label_output(dataset, labels)
    out = str(tmp_path / "ls.json")
    assert export_labelstudio(labels, out, image_url="s3://b/{shard}/{key}.png", masks="polygon") == {
        "tasks": 3,
        "results": 4,
        "error_rows": 1,
    }
    tasks = json.load(open(out))
    task = tasks[0]
    assert task["data"]["image"] == "s3://b/shard-000000/000000000005.png"
    result = task["predictions"][0]["result"][0]
    assert result["type"] == "polygonlabels" and result["value"]["polygonlabels"] == ["square"]
    assert result["original_width"] == 64 and result["score"] == pytest.approx(0.8)
    pts = np.asarray(result["value"]["points"])
    assert pts.min() >= 0 and pts.max() <= 100
    assert pts[:, 0].min() == pytest.approx(100 * 4 / 64)  # the square starts at x=4

    out = str(tmp_path / "sa1b")
    bystanders.around(out)
    assert export_sa1b(labels, out) == {"images": 3, "annotations": 4, "error_rows": 1}
    record = json.load(open(os.path.join(out, "shard-000000", "000000000005.json")))
    assert record["image"]["width"] == 64 and record["image"]["image_id"] == 5  # SA-1B's integer
    sa1b_fields = {"id", "segmentation", "bbox", "area", "predicted_iou", "point_coords", "crop_box", "stability_score"}
    assert all(sa1b_fields <= set(a) for a in record["annotations"])
    ids = [
        a["id"] for f in sorted(glob.glob(os.path.join(out, "*", "*.json"))) for a in json.load(open(f))["annotations"]
    ]
    assert sorted(ids) == list(range(1, 5))  # unique over the export, as in SA-1B
    ann = record["annotations"][1]
    assert (decode_rle(ann["segmentation"]) == masks[102]).all() and ann["label"] == "circle"
    x0, y0, x1, y1 = boxes_from_binary_masks(masks[102][None])[0]
    assert ann["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0])
    assert ann["point_coords"] == [[(x0 + x1) / 2, (y0 + y1) / 2]]  # the prompt box's centre


def test_export_coco_on_s3(coco, s3_server, s3_bucket, tmp_path):
    ann_path, _, dataset, _ = coco
    labels = f"s3://{s3_bucket}/labels"
    gt_label_output(dataset, labels, s3_endpoint=s3_server)
    out = f"s3://{s3_bucket}/export/coco.json"
    assert export_coco(labels, out, categories=ann_path, s3_endpoint=s3_server)["annotations"] == 4
    from ovsam_ray import storage

    assert len(json.loads(storage.read_bytes(out, s3_endpoint=s3_server))["images"]) == 3


def test_round_trip_coco_label_job_export_cocoeval(ray_local, coco, tmp_path):
    """COCO -> shards -> label job with the ground-truth boxes -> COCO json -> COCOeval."""
    ann_path, images, dataset, _ = coco
    shards = str(tmp_path / "shards")
    convert_coco(ann_path, images, shards, images_per_shard=2)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("circle\nsquare\ntriangle\n")
    labels = str(tmp_path / "labels")
    model = ModelConfig(preset="ovsam_tiny", random_init=True, vocab=str(vocab))
    summary = run_label(LabelConfig(input=shards, output=labels, model=model, batch_size=3))
    assert summary.images_ok == 3
    out = str(tmp_path / "coco_out.json")
    stats = export_coco(labels, out, categories=os.path.join(shards, "_categories.json"))
    exported = json.load(open(out))
    gt = COCO(ann_path)
    assert {im["id"] for im in exported["images"]} == set(gt.getImgIds())
    non_crowd = [a for a in dataset["annotations"] if not a["iscrowd"]]
    assert stats["annotations"] == len(non_crowd) == 4
    per_image = {i: sum(a["image_id"] == i for a in exported["annotations"]) for i in (5, 9, 12)}
    assert per_image == {5: 2, 9: 2, 12: 0}
    assert {a["category_id"] for a in exported["annotations"]} <= set(NAMES)
    assert {a["prompt_type"] for a in exported["annotations"]} == {"box"}
    for a in exported["annotations"]:  # each prompt's mask sits in its own image
        assert tuple(a["segmentation"]["size"]) == (48, 64)
    ev = quiet_eval(gt, exported["annotations"])  # random weights: AP is junk, but COCOeval runs
    assert len(ev.stats) == 12 and set(ev.params.imgIds) == {5, 9, 12}
    assert {im["file_name"].rsplit(".", 1)[1] for im in exported["images"]} == {"png"}  # from the shards
    # the run record names the vocabulary and the shards: YOLO classes are its 3 classes, wds finds the images
    export_yolo(labels, str(tmp_path / "yolo"))
    yaml = open(tmp_path / "yolo" / "data.yaml").read()
    assert 'nc: 3\nnames:\n  0: "circle"\n  1: "square"\n  2: "triangle"\n' in yaml
    assert export_wds(labels, str(tmp_path / "wds"))["samples"] == 3


def test_yolo_line_keeps_every_part_of_a_multi_part_mask():
    from pycocotools import mask as mask_utils

    from ovsam_ray.data.rle import encode_masks
    from ovsam_ray.export.polygons import join_polygons, polygon_area
    from ovsam_ray.export.yolo import yolo_lines

    m = np.zeros((40, 60), bool)
    m[2:10, 3:12] = m[20:35, 30:50] = m[5:15, 40:55] = True  # three parts
    parts = mask_to_polygons(m, tolerance=0)
    assert len(parts) == 3 and polygon_area(join_polygons(parts)) == m.sum()  # bridges add no area
    (line,), dropped = yolo_lines([{"rle": encode_masks(m[None])[0], "label_id": 0}], 60, 40, lambda i: 0, tolerance=0)
    xy = np.asarray(line.split()[1:], float).reshape(-1, 2) * [60, 40]
    raster = mask_utils.decode(mask_utils.frPyObjects([xy.ravel().tolist()], 40, 60))[..., 0].astype(bool)
    assert dropped == 0 and (raster & m).sum() / (raster | m).sum() > 0.9  # every part, not the largest alone
    assert raster[25, 40] and raster[5, 5] and raster[10, 45]


def test_prompt_source_fields_are_exported_only_when_known(coco, tmp_path):
    """Outputs written before ``source``/``shard_label`` export as they did; newer ones carry them."""
    from ovsam_ray.export.wds import wds_labels

    _, _, dataset, _ = coco
    labels = str(tmp_path / "labels")
    gt_label_output(dataset, labels)  # rows without the fields: null
    export_coco(labels, str(tmp_path / "c.json"))
    anns = json.load(open(tmp_path / "c.json"))["annotations"]
    assert anns and not any({"source", "shard_label"} & set(a) for a in anns)
    row = {"key": "k", "shard": "s", "width": 4, "height": 4, "instances": [{"label_score": 1.0}]}
    assert "source" not in wds_labels(row)["instances"][0]
    row["instances"][0].update(source="shard", shard_label="cat")
    got = wds_labels(row)["instances"][0]
    assert (got["source"], got["shard_label"]) == ("shard", "cat")
