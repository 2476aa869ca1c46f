"""Each export loads in its own tool unchanged (ultralytics, pycocotools, faster-coco-eval,
label-studio-sdk, webdataset, Ray Data), and no path built from label data leaves its folder."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tarfile
import urllib.parse

import numpy as np
import pyarrow.parquet as pq
import pytest
from coco_fixture import CATEGORIES, gt_label_output, make_coco, rle_str

from ovsam_ray.cli import main
from ovsam_ray.convert import convert_coco
from ovsam_ray.data.rle import decode_rle
from ovsam_ray.export import (
    brush_rle_to_mask,
    export_coco,
    export_labelstudio,
    export_sa1b,
    export_wds,
    export_yolo,
    mask_to_brush_rle,
    read_labelled_images,
)
from ovsam_ray.labels.schema import rows_to_table

_NO_LS = "label-studio-sdk not installed (not in the test extra: it pins numpy<2.3; README says how to add it)"


@pytest.fixture
def labelled(tmp_path):
    """The COCO fixture as shards + a label output holding its ground truth (label ids 1 and 3),
    with a run record naming the shards."""
    ann_path, images, dataset, masks = make_coco(str(tmp_path / "coco"))
    shards = str(tmp_path / "shards")
    convert_coco(ann_path, images, shards, images_per_shard=10)
    labels = str(tmp_path / "labels")
    gt_label_output(dataset, labels)
    (tmp_path / "labels" / "_run.json").write_text(json.dumps({"details": {"config": {"input": shards}}}))
    return {"ann": ann_path, "images": images, "dataset": dataset, "masks": masks, "shards": shards, "labels": labels}


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


# --- paths -----------------------------------------------------------------------------------------


def test_exports_keep_odd_keys_inside_their_folder(tmp_path):
    """Keys (from tar members or Parquet) like ../../x, /abs/x, with NUL, and a shard ../up are
    exported under escaped names inside the output folder, none left out."""
    image = open(make_coco(str(tmp_path / "coco"))[1] + "/000000000005.png", "rb").read()
    shard = tmp_path / "in" / "shard-000000.tar"
    shard.parent.mkdir()
    keys = ["good", "../../escaped", "/tmp/abs_escaped", "nul\x00x"]
    with tarfile.open(shard, "w") as tf:
        for key in keys[:3]:
            info = tarfile.TarInfo(f"{key}.png")
            info.size = len(image)
            tf.addfile(info, io.BytesIO(image))
    mask = np.zeros((48, 64), bool)
    mask[4:20, 4:20] = True
    inst = {
        "prompt_type": "box",
        "bbox": [4, 4, 20, 20],
        "area": 256,
        "rle": rle_str(mask),
        "label": "square",
        "label_id": 3,
        "label_score": 0.9,
    }
    rows = [
        {"key": k, "shard": "shard-000000", "width": 64, "height": 48, "status": "ok", "instances": [inst]}
        for k in keys
    ]
    rows.append({"key": "k", "shard": "../up", "width": 64, "height": 48, "status": "ok", "instances": [inst]})
    labels = tmp_path / "deep" / "er" / "labels"
    labels.mkdir(parents=True)
    pq.write_table(rows_to_table(rows), labels / "shard-000000.parquet")
    out = tmp_path / "deep" / "er" / "out"
    before = {str(p) for p in tmp_path.rglob("*")}

    yolo = export_yolo(str(labels), str(out / "yolo"), shards=str(shard), with_images=True)
    # the tar holds 3 of the 4 keys of its shard; the shard ../up is not an input
    assert yolo["images"] == 5 and yolo["images_written"] == 3 and yolo["images_missing"] == 2
    assert export_sa1b(str(labels), str(out / "sa1b"), shards=str(shard))["images"] == 5
    wds = export_wds(str(labels), str(out / "wds"), shards=str(shard))
    assert wds["samples"] == 3 and wds["missing_images"] == 2
    assert export_coco(str(labels), str(out / "c" / "coco.json"), shards=str(shard), with_images=True)["images"] == 5
    new = {str(p) for p in tmp_path.rglob("*")} - before
    assert new and all(p.startswith(str(out)) for p in new), sorted(new)
    assert not os.path.exists("/tmp/abs_escaped.png")
    assert (out / "yolo" / "images" / "shard-000000" / "%2E." / "%2E." / "escaped.png").is_file()


# --- YOLO ----------------------------------------------------------------------------------------


def test_yolo_classes_contiguous_and_loadable_by_ultralytics(labelled, tmp_path, monkeypatch):
    out = str(tmp_path / "yolo")
    # label ids 1 (circle) and 3 (square), no --classes, no vocabulary in the run record
    assert main(["export", "yolo", "--input", labelled["labels"], "--output", out, "--with-images"]) == 0
    yaml = open(os.path.join(out, "data.yaml")).read()
    assert 'nc: 2\nnames:\n  0: "circle"\n  1: "square"\n' in yaml
    lines = open(os.path.join(out, "labels", "shard-000000", "000000000005.txt")).read().splitlines()
    assert [line.split()[0] for line in lines] == ["1", "0"]

    monkeypatch.setenv("YOLO_OFFLINE", "1")
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path / "ultralytics_config"))
    ultra = pytest.importorskip("ultralytics.data.utils", reason="ultralytics not installed (test extra)")
    monkeypatch.setattr(ultra, "check_font", lambda *a, **k: None)  # a plotting font download: no network in tests
    from ultralytics.data.dataset import YOLODataset

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # data.yaml must not depend on the working directory
    data = ultra.check_det_dataset(os.path.join(out, "data.yaml"))
    assert data["nc"] == 2 and data["names"] == {0: "circle", 1: "square"}
    ds = YOLODataset(img_path=data["val"], data=data, task="segment", augment=False, imgsz=64)
    assert len(ds.labels) == 3
    by_file = {os.path.basename(lb["im_file"]): lb for lb in ds.labels}
    lb = by_file["000000000005.png"]
    assert lb["cls"].ravel().tolist() == [1, 0] and len(lb["segments"]) == 2
    assert len(by_file["000000000012.png"]["cls"]) == 0  # a background image


def test_yolo_uses_the_labels_vocabulary(labelled, tmp_path):
    run = json.loads(open(os.path.join(labelled["labels"], "_run.json")).read())
    vocab = tmp_path / "shapes.txt"
    vocab.write_text("star\ncircle\ntriangle\nsquare\n")  # ids 0..3: the fixture's label ids 1 and 3
    run["details"]["config"]["model"] = {"vocab": str(vocab)}
    run["identity"] = {"vocabulary": {"name": "shapes", "num_classes": 4}}
    open(os.path.join(labelled["labels"], "_run.json"), "w").write(json.dumps(run))
    out = str(tmp_path / "yolo")
    export_yolo(labelled["labels"], out)
    yaml = open(os.path.join(out, "data.yaml")).read()
    assert 'nc: 4\nnames:\n  0: "star"\n  1: "circle"\n  2: "triangle"\n  3: "square"\n' in yaml
    lines = open(os.path.join(out, "labels", "shard-000000", "000000000005.txt")).read().splitlines()
    assert [line.split()[0] for line in lines] == ["3", "1"]


# --- COCO ----------------------------------------------------------------------------------------


def test_coco_file_names_match_the_images_written(labelled, tmp_path):
    out = str(tmp_path / "c" / "coco.json")
    stats = export_coco(labelled["labels"], out, with_images=True)
    assert stats["images_written"] == 3
    for image in json.load(open(out))["images"]:
        assert image["file_name"] == f"shard-000000/{image['key']}.png"
        assert os.path.isfile(os.path.join(tmp_path, "c", "images", image["file_name"]))


def test_sa1b_file_name_has_the_image_extension(labelled, tmp_path):
    export_sa1b(labelled["labels"], str(tmp_path / "sa1b"))
    record = json.load(open(tmp_path / "sa1b" / "shard-000000" / "000000000005.json"))
    assert record["image"]["file_name"] == "000000000005.png"


@pytest.mark.parametrize(
    "vocab,labels,ids,n",
    [
        ("coco_ov", (("person", 0), ("dog", 16), ("toothbrush", 79)), [1, 18, 90], 80),
        ("lvis_v1", (("aerosol_can", 1), ("zucchini", 1203)), [1, 1203], 1203),
    ],
)
def test_builtin_vocabulary_labels_get_the_dataset_ids(tmp_path, vocab, labels, ids, n):
    mask = np.zeros((48, 64), bool)
    mask[4:20, 4:20] = True
    insts = [
        {
            "prompt_type": "box",
            "bbox": [4, 4, 20, 20],
            "area": 256,
            "rle": rle_str(mask),
            "label": name,
            "label_id": lid,
            "label_score": 0.9,
        }
        for name, lid in labels
    ]
    root = tmp_path / "labels"
    root.mkdir()
    pq.write_table(
        rows_to_table(
            [{"key": "a", "shard": "s", "image_id": "7", "width": 64, "height": 48, "status": "ok", "instances": insts}]
        ),
        root / "s.parquet",
    )
    (root / "_run.json").write_text(json.dumps({"identity": {"vocabulary": {"name": vocab, "num_classes": n}}}))
    out = str(tmp_path / "coco.json")
    export_coco(str(root), out)
    exported = json.load(open(out))
    assert [a["category_id"] for a in exported["annotations"]] == ids
    cats = {c["id"]: c["name"] for c in exported["categories"]}
    assert len(cats) == n and [cats[i] for i in ids] == [name for name, _ in labels]


def test_coco_results_load_in_pycocotools_and_faster_coco_eval(labelled, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    out = str(tmp_path / "results.json")
    assert (
        main(
            [
                "export",
                "coco",
                "--input",
                labelled["labels"],
                "--output",
                out,
                "--results",
                "--categories",
                labelled["ann"],
            ]
        )
        == 0
    )
    results = json.load(open(out))
    assert isinstance(results, list) and len(results) == 4 and "score" in results[0]
    gt = _quiet(COCO, labelled["ann"])
    for iou_type in ("segm", "bbox"):
        ev = COCOeval(gt, _quiet(gt.loadRes, out), iou_type)
        ev.evaluate()
        ev.accumulate()
        _quiet(ev.summarize)
        assert ev.stats[0] == pytest.approx(1.0), iou_type

    fce = pytest.importorskip("faster_coco_eval", reason="faster-coco-eval not installed (test extra)")
    fgt = _quiet(fce.COCO, labelled["ann"])
    for iou_type in ("segm", "bbox"):
        ev = fce.COCOeval_faster(fgt, _quiet(fgt.loadRes, out), iou_type, print_function=lambda *a: None)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        assert ev.stats[0] == pytest.approx(1.0), iou_type


# --- Label Studio --------------------------------------------------------------------------------


def test_brush_rle_round_trip_and_golden():
    rng = np.random.default_rng(0)
    for h, w in ((1, 1), (5, 7), (48, 64), (120, 90)):
        m = rng.random((h, w)) > 0.6
        assert (brush_rle_to_mask(mask_to_brush_rle(m), h, w) == m).all()
    m = np.zeros((2, 3), bool)
    m[1, 1:] = True
    # 24 elements, word 8, sizes 3/4/8/16; runs: 16 x 0 (4-bit field), 8 x 255 (3-bit field)
    assert mask_to_brush_rle(m) == [0, 0, 0, 24, 57, 27, 253, 240, 9, 255, 192]


def test_labelstudio_brush_decodes_in_the_sdk_and_validates(labelled, tmp_path):
    out = str(tmp_path / "tasks.json")
    stats = export_labelstudio(labelled["labels"], out)
    assert stats == {"tasks": 3, "results": 4, "error_rows": 1}
    tasks = json.load(open(out))
    # Label Studio's local-files URL of the image --with-images writes, with its own extension
    assert tasks[0]["data"]["image"] == "/data/local-files/?d=images/shard-000000/000000000005.png"
    config = open(str(tmp_path / "tasks.config.xml")).read()
    assert "<BrushLabels" in config and '<Label value="circle"/>' in config
    results = [(t, r) for t in tasks for r in t["predictions"][0]["result"]]
    assert {r["type"] for _, r in results} == {"brushlabels"}
    rows = {r["key"]: r for r in _label_rows(labelled["labels"])}
    for task, r in results:
        inst = rows[task["data"]["key"]]["instances"][int(r["id"].rsplit("_", 1)[1])]
        assert (brush_rle_to_mask(r["value"]["rle"], 48, 64) == decode_rle(inst["rle"])).all()

    brush = pytest.importorskip("label_studio_sdk.converter.brush", reason=_NO_LS)
    for task, r in results:
        inst = rows[task["data"]["key"]]["instances"][int(r["id"].rsplit("_", 1)[1])]
        decoded = np.reshape(brush.decode_rle(r["value"]["rle"]), (48, 64, 4))[:, :, 3] > 0
        assert (decoded == decode_rle(inst["rle"])).all()
    li_mod = pytest.importorskip("label_studio_sdk.label_interface", reason=_NO_LS)
    li = li_mod.LabelInterface(config)
    for task in tasks:  # (validate_task itself cannot take predictions: it calls validate_prediction())
        assert li.validate_task({"data": task["data"]})
        assert li.validate_prediction(task["predictions"][0], return_errors=True) == []


def test_labelstudio_config_lists_every_class_and_images_are_written(labelled, tmp_path):
    run = json.loads(open(os.path.join(labelled["labels"], "_run.json")).read())
    vocab = tmp_path / "shapes.txt"
    vocab.write_text("star\ncircle\ntriangle\nsquare\n")
    run["details"]["config"]["model"] = {"vocab": str(vocab)}
    run["identity"] = {"vocabulary": {"name": "shapes", "num_classes": 4}}
    open(os.path.join(labelled["labels"], "_run.json"), "w").write(json.dumps(run))
    out = tmp_path / "ls" / "tasks.json"
    stats = export_labelstudio(labelled["labels"], str(out), with_images=True)
    assert stats["images_written"] == 3 and stats["images_missing"] == 0
    config = (tmp_path / "ls" / "tasks.config.xml").read_text()
    # the whole vocabulary, in its order: a reviewer can pick a class no prediction has
    assert re.findall(r'<Label value="([^"]+)"/>', config) == ["star", "circle", "triangle", "square"]
    for task in json.load(open(out)):  # each URL names a file the export wrote, below the document root
        path = urllib.parse.unquote(task["data"]["image"].removeprefix("/data/local-files/?d="))
        assert (tmp_path / "ls" / path).is_file()
    assert (tmp_path / "ls" / "images" / "shard-000000" / "000000000005.png").read_bytes() == open(
        os.path.join(labelled["images"], "000000000005.png"), "rb"
    ).read()
    # --classes: a COCO json's categories (here without "star")
    export_labelstudio(labelled["labels"], str(tmp_path / "c.json"), classes=labelled["ann"], image_url="{key}")
    config = (tmp_path / "c.config.xml").read_text()
    assert re.findall(r'<Label value="([^"]+)"/>', config) == ["circle", "square", "triangle"]
    li_mod = pytest.importorskip("label_studio_sdk.label_interface", reason=_NO_LS)
    li = li_mod.LabelInterface((tmp_path / "ls" / "tasks.config.xml").read_text())
    assert all(li.validate_prediction(t["predictions"][0], return_errors=True) == [] for t in json.load(open(out)))


def test_labelstudio_polygons_validate(labelled, tmp_path):
    out = str(tmp_path / "tasks.json")
    export_labelstudio(labelled["labels"], out, masks="polygon")
    tasks = json.load(open(out))
    assert tasks[0]["predictions"][0]["result"][0]["type"] == "polygonlabels"
    li_mod = pytest.importorskip("label_studio_sdk.label_interface", reason=_NO_LS)
    li = li_mod.LabelInterface(open(str(tmp_path / "tasks.config.xml")).read())
    assert all(li.validate_prediction(t["predictions"][0], return_errors=True) == [] for t in tasks)


def _label_rows(labels):
    from ovsam_ray.labels.reader import iter_label_rows

    return [r for r in iter_label_rows(labels) if r["status"] == "ok"]


# --- WebDataset and Ray Data ---------------------------------------------------------------------


def test_export_wds_reads_back_with_webdataset(labelled, tmp_path):
    out = str(tmp_path / "wds")
    assert main(["export", "wds", "--input", labelled["labels"], "--output", out]) == 0
    assert sorted(os.listdir(out)) == ["_ovsam_written.json", "shard-000000.tar"]
    import webdataset as wds

    samples = list(wds.WebDataset([os.path.join(out, "shard-000000.tar")], shardshuffle=False).decode("rgb8"))
    # converted shards are mixed (a seeded order), so the keys come in that order, not sorted
    assert sorted(s["__key__"] for s in samples) == ["000000000005", "000000000009", "000000000012"]
    rows = {r["key"]: r for r in _label_rows(labelled["labels"])}
    for s in samples:
        labels = s["json"]
        source = np.asarray(
            __import__("PIL.Image", fromlist=["Image"])
            .open(os.path.join(labelled["images"], f"{s['__key__']}.png"))
            .convert("RGB")
        )
        assert (s["png"] == source).all() and s["png"].shape == (labels["height"], labels["width"], 3)
        expected = rows[s["__key__"]]["instances"]
        assert len(labels["instances"]) == len(expected)
        for got, want in zip(labels["instances"], expected):
            assert (decode_rle(got["rle"]) == decode_rle(want["rle"])).all() and got["label"] == want["label"]


def test_ray_data_joins_labels_and_images_by_shard_and_key(ray_local, labelled, tmp_path):
    ds = read_labelled_images(labelled["labels"], rows_per_batch=2)
    rows = sorted(ds.take_all(), key=lambda r: r["key"])
    assert [r["key"] for r in rows] == ["000000000005", "000000000009", "000000000012"]
    for r in rows:
        assert bytes(r["image"]) == open(os.path.join(labelled["images"], f"{r['key']}.png"), "rb").read()
        assert r["image_ext"] == "png" and r["status"] == "ok"
    assert [len(r["instances"]) for r in rows] == [2, 2, 0]
    assert {c["name"] for c in CATEGORIES} >= {i["label"] for r in rows for i in r["instances"]}


def test_export_wds_of_a_shard_mixing_jpeg_and_png_reads_in_ray_data(ray_local, tmp_path):
    """Ray Data's read_webdataset needs one image column per tar: a shard mixing JPEG and PNG is
    written all PNG, each image's pixels unchanged."""
    import PIL.Image
    import ray

    rng = np.random.default_rng(0)
    pixels = {k: rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for k in ("a", "b")}
    shard = tmp_path / "in" / "shard-000000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tf:
        for key, fmt in (("a", "JPEG"), ("b", "PNG")):
            buf = io.BytesIO()
            PIL.Image.fromarray(pixels[key]).save(buf, format=fmt)
            info = tarfile.TarInfo(f"{key}.{'jpg' if fmt == 'JPEG' else 'png'}")
            info.size = len(buf.getvalue())
            tf.addfile(info, io.BytesIO(buf.getvalue()))
    rows = [{"key": k, "shard": "shard-000000", "width": 32, "height": 24, "status": "ok"} for k in pixels]
    labels = tmp_path / "labels"
    labels.mkdir()
    pq.write_table(rows_to_table(rows), labels / "shard-000000.parquet")
    out = tmp_path / "wds"
    stats = export_wds(str(labels), str(out), shards=str(shard))
    assert stats["samples"] == 2 and stats["transcoded"] == 1
    got = {r["__key__"]: r for r in ray.data.read_webdataset(str(out / "shard-000000.tar")).take_all()}
    assert set(got) == {"a", "b"}
    jpeg = np.asarray(PIL.Image.open(io.BytesIO(_member(shard, "a.jpg"))).convert("RGB"))
    assert (np.asarray(got["a"]["png"]) == jpeg).all()  # the JPEG's decoded pixels, losslessly
    assert (np.asarray(got["b"]["png"]) == pixels["b"]).all()


def _member(tar: object, name: str) -> bytes:
    with tarfile.open(tar) as tf:
        return tf.extractfile(name).read()


def test_readme_export_commands_run_as_written(labelled, tmp_path, monkeypatch):
    """Each ``ovsam-ray export`` line of the README (optional ``[...]`` flags included) on a label
    output at ``labels/``: exit 0 and the files the README's table loads."""
    import shlex

    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")).read()
    lines = [line.split("  #")[0].strip() for line in readme.splitlines() if line.startswith("ovsam-ray export ")]
    lines = list(dict.fromkeys(lines))  # a command shown twice is run once
    assert {shlex.split(line)[2] for line in lines} == {"coco", "yolo", "labelstudio", "sa1b", "wds"}
    monkeypatch.chdir(tmp_path)
    for line in lines:
        args = shlex.split(line.replace("[", "").replace("]", ""))
        assert _quiet(main, args[1:]) == 0, line
    assert {"images", "annotations", "categories"} <= set(json.load(open("coco/labels.json")))
    assert os.path.isfile("yolo/data.yaml") and os.path.isfile("ls/tasks.config.xml")
    assert os.path.isfile("ls/images/shard-000000/000000000005.png")
    assert os.path.isfile("labelled_shards/shard-000000.tar") and os.listdir("sa1b_style")
