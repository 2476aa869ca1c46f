"""review select -> tasks for Label Studio and CVAT -> reviewed exports -> review import -> overlays."""

from __future__ import annotations

import json
import os
import urllib.parse

import numpy as np
import pyarrow.parquet as pq
import pytest
from cli_helpers import run_cli
from coco_fixture import coco_label_output, polygon_mask, uncompressed_rle
from pycocotools.coco import COCO

from ovsam_ray.data.rle import decode_rle
from ovsam_ray.export.brush import brush_rle_to_mask, mask_to_brush_rle
from ovsam_ray.labels.committer import ShardCommitter
from ovsam_ray.labels.overlays import CORRECTIONS_FOLDER, correction_counts
from ovsam_ray.labels.reader import iter_label_rows, raw_output
from ovsam_ray.labels.schema import rows_to_table
from ovsam_ray.review import ImportConfig, ReviewSelectConfig, import_review, select_for_review
from ovsam_ray.review.select import CVAT_NAME

#: (margin, stability) per (image key suffix, instance): the circle of image 9 is the least sure
SIGNALS = {("5", 0): (0.9, 0.98), ("5", 1): (0.8, 0.95), ("9", 0): (0.7, 0.9), ("9", 1): (0.05, 0.4)}


@pytest.fixture
def world(tmp_path):
    """A label output of the COCO fixture's ground truth with quality signals, and its shards."""
    loc = coco_label_output(str(tmp_path))
    rows = list(iter_label_rows(loc["labels"]))
    for row in rows:
        for i, inst in enumerate(row["instances"] or []):
            margin, stability = SIGNALS[(row["key"].lstrip("0"), i)]
            inst.update(label_margin=margin, stability_score=stability, box_iou=1.0)
    labels = str(tmp_path / "signals")
    ShardCommitter(labels).commit("shard-000000", rows_to_table(rows), {})
    return {"labels": labels, "shards": loc["shards"], "review": str(tmp_path / "review"), "rows": rows}


def _select(world, **kw):
    cfg = ReviewSelectConfig(input=world["labels"], output=world["review"], shards=world["shards"], **kw)
    return select_for_review(cfg)


def _selection(world):
    return pq.read_table(os.path.join(world["review"], "selection.parquet")).to_pylist()


def test_select_picks_uncertain_first_spread_over_images_and_reproducibly(world):
    stats = _select(world, budget=2, max_per_image=1, min_per_class=0)
    sel = _selection(world)
    assert stats["selected"] == 2 and stats["instances_seen"] == 4 and stats["images"] == 2
    assert {(r["key"].lstrip("0"), r["instance"]) for r in sel} == {("9", 1), ("5", 1)}  # one per image
    assert all(r["reason"] == "uncertain" for r in sel)
    again = _select(world, budget=2, max_per_image=1, min_per_class=0, overwrite=True)
    assert _selection(world) == sel and again["selected"] == 2
    # a random pick of the same budget: by hash, reproducible with its seed
    _select(world, budget=3, strategy="random", seed=1, overwrite=True)
    first = _selection(world)
    _select(world, budget=3, strategy="random", seed=1, overwrite=True)
    assert _selection(world) == first and {r["reason"] for r in first} == {"random"}


def test_select_takes_rare_classes_first(world):
    _select(world, budget=2, min_per_class=1, max_per_image=2)
    sel = _selection(world)
    # square and circle appear twice each: one of each class, before the second most uncertain
    assert sorted(r["label"] for r in sel) == ["circle", "square"]
    assert {r["reason"] for r in sel} == {"rare class"}


def test_tasks_load_in_the_tools_own_readers(world):
    _select(world, budget=4, max_per_image=2, min_per_class=0)
    by_key = {r["key"]: r for r in world["rows"]}
    tasks = json.load(open(os.path.join(world["review"], "labelstudio.json")))
    assert len(tasks) == 2
    for task in tasks:
        row = by_key[task["data"]["key"]]
        assert task["data"]["shard"] == "shard-000000" and task["data"]["instances"] == [0, 1]
        for r in task["predictions"][0]["result"]:
            i = int(r["id"][1:])
            mask = brush_rle_to_mask(r["value"]["rle"], r["original_height"], r["original_width"])
            np.testing.assert_array_equal(mask, decode_rle(row["instances"][i]["rle"]))
            assert r["value"]["brushlabels"] == [row["instances"][i]["label"]] and r["score"] == pytest.approx(0.8)
        # Label Studio's local-files URL, served from the review folder (README, "Review")
        url = task["data"]["image"]
        assert url.startswith("/data/local-files/?d=images/"), url
        local = urllib.parse.unquote(url.removeprefix("/data/local-files/?d="))
        assert os.path.exists(os.path.join(world["review"], local))
    coco = COCO(os.path.join(world["review"], CVAT_NAME))  # the COCO form CVAT's import reads
    assert len(coco.getAnnIds()) == 4
    for ann in coco.loadAnns(coco.getAnnIds()):
        img = coco.loadImgs(ann["image_id"])[0]
        row = by_key[img["key"]]
        np.testing.assert_array_equal(
            coco.annToMask(ann).astype(bool), decode_rle(row["instances"][ann["attributes"]["ovsam_instance"]]["rle"])
        )
        assert os.path.exists(os.path.join(world["review"], "cvat", "images", img["file_name"]))
    pytest.importorskip("label_studio_sdk", reason="label-studio-sdk not installed (see README)")
    from label_studio_sdk.converter.brush import decode_rle as ls_decode

    r = tasks[0]["predictions"][0]["result"][0]
    flat = ls_decode(r["value"]["rle"]).reshape(r["original_height"], r["original_width"], 4)
    np.testing.assert_array_equal(
        flat[..., 3] > 0, brush_rle_to_mask(r["value"]["rle"], r["original_height"], r["original_width"])
    )


def _ls_export(world):
    """Label Studio's JSON export after a review of all four instances: image 5's square accepted
    as predicted, its circle relabelled; image 9's square deleted, its circle's mask edited, and a
    triangle added as a polygon."""
    tasks = json.load(open(os.path.join(world["review"], "labelstudio.json")))
    out = []
    for n, task in enumerate(tasks):
        results = [dict(r, value=dict(r["value"])) for r in task["predictions"][0]["result"]]
        for r in results:
            r.pop("score")
        h, w = results[0]["original_height"], results[0]["original_width"]
        if task["data"]["key"].endswith("5"):
            results[1]["value"]["brushlabels"] = ["triangle"]
        else:
            del results[0]
            mask = brush_rle_to_mask(results[0]["value"]["rle"], h, w)
            mask[: h // 2] = False
            results[0]["value"]["rle"] = mask_to_brush_rle(mask)
            results.append(
                {
                    "id": "Xy12ab",
                    "type": "polygonlabels",
                    "from_name": "label",
                    "to_name": "image",
                    "original_width": w,
                    "original_height": h,
                    "value": {
                        "points": [[5, 5], [30, 5], [30, 40], [5, 40]],
                        "closed": True,
                        "polygonlabels": ["triangle"],
                    },
                }
            )
        out.append(
            {
                "id": n + 1,
                "data": task["data"],
                "annotations": [{"id": n + 10, "result": results, "was_cancelled": False, "completed_by": 1}],
                "predictions": task["predictions"],
            }
        )
    out.append({"id": 99, "data": {"shard": "shard-000000", "key": "000000000012"}, "annotations": []})
    path = os.path.join(world["review"], "ls_export.json")
    json.dump(out, open(path, "w"))
    return path


def test_import_labelstudio_classifies_and_every_reader_applies_it(world):
    _select(world, budget=4, max_per_image=2, min_per_class=0)
    committed = open(os.path.join(world["labels"], "shard-000000.parquet"), "rb").read()
    cfg = ImportConfig(input=world["labels"], review=_ls_export(world), selection=world["review"])
    stats = import_review(cfg)
    assert stats["tool"] == "labelstudio" and stats["imported"] and stats["tasks_reviewed"] == 2
    assert stats["tasks_not_reviewed"] == 1
    assert stats["corrections"] == {"accepted": 1, "relabelled": 1, "mask_edited": 1, "deleted": 1, "added": 1}
    assert stats["all_corrections"] == stats["corrections"]
    assert open(os.path.join(world["labels"], "shard-000000.parquet"), "rb").read() == committed  # never rewritten
    rows = {r["key"]: r for r in iter_label_rows(world["labels"])}
    five, nine = rows["000000000005"]["instances"], rows["000000000009"]["instances"]
    assert [(i["label"], i["review"]) for i in five] == [("square", "accepted"), ("triangle", "relabelled")]
    assert [(i["label"], i["review"]) for i in nine] == [("circle", "mask_edited"), ("triangle", "added")]
    edited = decode_rle(nine[0]["rle"])
    assert not edited[: edited.shape[0] // 2].any() and nine[0]["area"] == edited.sum()
    with raw_output():
        raw = {r["key"]: r for r in iter_label_rows(world["labels"])}
    assert [i["label"] for i in raw["000000000009"]["instances"]] == ["square", "circle"]
    assert [i["label"] for i in next(iter_label_rows(world["labels"], corrections=False))["instances"]] == [
        "square",
        "circle",
    ]
    # rerunnable: the same export again adds nothing
    again = import_review(cfg)
    assert not again["imported"] and len(os.listdir(os.path.join(world["labels"], CORRECTIONS_FOLDER))) == 1
    # review select never picks a reviewed instance again
    assert _select(world, budget=4, overwrite=True)["already_reviewed"] == 4


def test_exports_apply_corrections_unless_raw(world, tmp_path):
    _select(world, budget=4, max_per_image=2, min_per_class=0)
    import_review(ImportConfig(input=world["labels"], review=_ls_export(world), selection=world["review"]))
    out, raw = str(tmp_path / "c.json"), str(tmp_path / "raw.json")
    assert (
        run_cli(
            "export",
            "coco",
            "--input",
            world["labels"],
            "--output",
            out,
            "--categories",
            world["shards"] + "/_categories.json",
        )
        == 0
    )
    assert (
        run_cli(
            "export",
            "coco",
            "--input",
            world["labels"],
            "--output",
            raw,
            "--raw",
            "--categories",
            world["shards"] + "/_categories.json",
        )
        == 0
    )
    assert len(json.load(open(out))["annotations"]) == 4 and len(json.load(open(raw))["annotations"]) == 4
    labels = sorted(a["label"] for a in json.load(open(out))["annotations"])
    assert labels == ["circle", "square", "triangle", "triangle"]
    assert sorted(a["label"] for a in json.load(open(raw))["annotations"]) == ["circle", "circle", "square", "square"]


def test_import_cvat_coco_export(world):
    _select(world, budget=4, max_per_image=2, min_per_class=0)
    mine = json.load(open(os.path.join(world["review"], CVAT_NAME)))
    by_key = {r["key"]: r for r in world["rows"]}
    # what CVAT's COCO 1.0 export writes: its own ids, masks as uncompressed RLE (iscrowd 1),
    # polygons for drawn shapes, attributes without ours
    cats = [{"id": 1, "name": "circle", "supercategory": ""}, {"id": 2, "name": "square", "supercategory": ""}]
    cats.append({"id": 3, "name": "triangle", "supercategory": ""})
    images, anns = [], []
    for n, img in enumerate(mine["images"]):
        images.append({"id": n + 1, "width": img["width"], "height": img["height"], "file_name": img["file_name"]})
        insts = by_key[img["key"]]["instances"]
        if img["key"].endswith("5"):  # both accepted, the circle relabelled square
            for i, name in ((0, "square"), (1, "square")):
                mask = decode_rle(insts[i]["rle"])
                segm = uncompressed_rle(mask)
                anns.append(
                    {
                        "id": len(anns) + 7,
                        "image_id": n + 1,
                        "category_id": 2 if name == "square" else 1,
                        "segmentation": segm,
                        "iscrowd": 1,
                        "attributes": {"occluded": False},
                    }
                )
        else:  # everything deleted; one polygon added
            poly = [2.0, 2.0, 20.0, 2.0, 20.0, 20.0, 2.0, 20.0]
            anns.append(
                {"id": 50, "image_id": n + 1, "category_id": 3, "segmentation": [poly], "iscrowd": 0, "attributes": {}}
            )
    path = os.path.join(world["review"], "instances_default.json")
    json.dump({"images": images, "annotations": anns, "categories": cats}, open(path, "w"))
    stats = import_review(ImportConfig(input=world["labels"], review=path, selection=world["review"]))
    assert stats["tool"] == "cvat" and stats["tasks_reviewed"] == 2
    assert stats["corrections"] == {"accepted": 1, "relabelled": 1, "mask_edited": 0, "deleted": 2, "added": 1}
    rows = {r["key"]: r for r in iter_label_rows(world["labels"])}
    assert [i["label"] for i in rows["000000000005"]["instances"]] == ["square", "square"]
    (added,) = rows["000000000009"]["instances"]
    np.testing.assert_array_equal(decode_rle(added["rle"]), polygon_mask([2.0, 2.0, 20.0, 2.0, 20.0, 20.0, 2.0, 20.0]))
    assert correction_counts(world["labels"])["deleted"] == 2


def test_review_cli(world):
    assert (
        run_cli(
            "review",
            "select",
            "--input",
            world["labels"],
            "--output",
            world["review"],
            "--shards",
            world["shards"],
            "--budget",
            "4",
            "--max-per-image",
            "2",
        )
        == 0
    )
    assert len(_selection(world)) == 4
    assert (
        run_cli(
            "review",
            "import",
            "--input",
            world["labels"],
            "--review",
            _ls_export(world),
            "--selection",
            world["review"],
        )
        == 0
    )
    assert run_cli("review", "select", "--input", world["labels"], "--output", world["review"], "--budget", "0") == 2
