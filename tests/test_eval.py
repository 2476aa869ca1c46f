"""Evaluation: interior points (exact distance transform), Table-1 scoring, mask AP against a
direct pycocotools computation, and ``ovsam-ray eval`` end to end on a local Ray."""

from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np
import pytest
from coco_fixture import gt_label_output, make_coco, polygon_mask, rle_str
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ovsam_ray.convert import convert_detections
from ovsam_ray.data.synthetic import generate_shards
from ovsam_ray.evaluation.coco_ap import coco_dataset, instance_results, mask_ap
from ovsam_ray.evaluation.points import distance_to_background, interior_points
from ovsam_ray.evaluation.prompts import gt_prompts
from ovsam_ray.evaluation.run_eval import EvalConfig, run_eval
from ovsam_ray.evaluation.table1 import ClassLookup, score_image, summarize, table1_markdown
from ovsam_ray.inference import ModelConfig
from ovsam_ray.vocabulary import Vocabulary


def brute_distance(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    ys, xs = np.nonzero(~padded)
    out = np.zeros(mask.shape)
    for y, x in zip(*np.nonzero(mask)):
        out[y, x] = np.sqrt(((ys - y - 1) ** 2 + (xs - x - 1) ** 2).min())
    return out


def test_distance_transform_is_exact_euclidean():
    rng = np.random.default_rng(0)
    for _ in range(25):
        mask = rng.random((int(rng.integers(1, 25)), int(rng.integers(1, 25)))) > rng.uniform(0.0, 0.6)
        np.testing.assert_allclose(distance_to_background(mask), brute_distance(mask), atol=1e-5)
    assert not distance_to_background(np.zeros((3, 4), bool)).any()


def test_interior_points():
    masks = np.zeros((4, 20, 30), bool)
    masks[0, 2:9, 3:10] = True  # 7x7 square: its centre
    masks[1, :, :] = True  # whole image: the border counts as outside -> centre
    yy, xx = np.mgrid[:20, :30]
    masks[2] = ((yy - 10) ** 2 + (xx - 22) ** 2 < 36) | ((yy - 10) ** 2 + (xx - 6) ** 2 < 16)  # bigger disk wins
    points = interior_points(masks)
    assert points[0].tolist() == [6, 5]
    assert points[1].tolist() in ([14, 9], [14, 10], [15, 9], [15, 10])
    assert points[2].tolist() == [22, 10]
    assert points[3].tolist() == [-1, -1]
    assert interior_points(np.zeros((0, 5, 5), bool)).shape == (0, 2)


def test_gt_prompts_skip_crowd_and_bad_boxes():
    anns = [{"bbox": [0, 0, 4, 4], "category_name": "a", "segmentation": rle_str(np.pad(np.ones((4, 4)), ((0, 6),
                                                                                                        (0, 6))))},
            {"bbox": [1, 1, 2, 2], "iscrowd": 1, "category_name": "a"},
            {"bbox": [1, 1, 0, 2], "category_name": "a"},
            {"bbox": [5, 5, 4, 4], "category_name": "b", "segmentation": [[5, 5, 9, 5, 9, 9, 5, 9]]}]
    out = gt_prompts(anns, height=10, width=10, mode="both", keep=lambda a: a["category_name"] != "b")
    assert out["boxes"] == [[0.0, 0.0, 4.0, 4.0]] and out["box_annotations"] == [0] and out["labels"] == ["a"]
    assert out["points"] == [[1.0, 1.0]] and out["point_boxes"] == out["boxes"]  # 4-way tie: first in raster order
    assert gt_prompts(anns, height=10, width=10, mode="point")["point_annotations"] == [0, 3]


def _inst(mask: np.ndarray, label: str, prompt_type: str, box=None, point=None) -> dict:
    return {"prompt_type": prompt_type, "prompt_box": box, "point": point, "rle": rle_str(mask), "label": label}


def test_table1_hand_made_case():
    vocab = Vocabulary("t", ("cat", "dog", "bird"), (("cat",), ("dog", "puppy"), ("bird",)), (True, False, True),
                       (False, False, True), (1, 2, 3))
    lookup = ClassLookup(vocab)
    a0 = np.zeros((10, 10), bool)
    a0[0:4, 0:4] = True
    a1 = np.zeros((10, 10), bool)
    a1[5:10, 5:10] = True
    anns = [{"category_name": "cat", "bbox": [0, 0, 4, 4], "segmentation": rle_str(a0)},
            {"category_name": "puppy", "bbox": [5, 5, 5, 5], "segmentation": [[5, 5, 10, 5, 10, 10, 5, 10]]},
            {"category_id": 3, "bbox": [0, 5, 2, 2], "segmentation": rle_str(a0)},  # bird: excluded
            {"category_name": "cat", "bbox": [0, 0, 1, 1], "iscrowd": 1}]
    assert (polygon_mask([5, 5, 10, 5, 10, 10, 5, 10], 10, 10) == a1).all()
    meta = {"annotations": anns, "box_annotations": [0, 1, 2], "point_annotations": [0, 1],
            "boxes": [[0, 0, 4, 4], [5, 5, 10, 10], [0, 5, 2, 7]], "points": [[1, 1], [7, 7]]}
    half = np.zeros((10, 10), bool)
    half[5:10, 5:7] = True  # IoU 10/25 with a1
    extra = a1.copy()
    extra[0:5, 5:10] = True  # IoU 25/50 with a1
    row = {"width": 10, "height": 10, "instances": [
        _inst(a0, "cat", "box", [0, 0, 4, 4]), _inst(half, "cat", "box", [5, 5, 10, 10]),
        _inst(a0, "bird", "box", [0, 5, 2, 7]),
        _inst(np.zeros((10, 10), bool), "dog", "point", point=[1, 1]), _inst(extra, "dog", "point", point=[7, 7])]}
    records, missing = score_image(row, meta, lookup)
    assert missing == 0 and len(records) == 4
    m = summarize(records)
    assert m["box"] == pytest.approx({"objects": 2, "miou": 0.7, "accuracy": 0.5, "objects_base": 1, "miou_base": 1.0,
                                      "accuracy_base": 1.0, "objects_novel": 1, "miou_novel": 0.4,
                                      "accuracy_novel": 0.0, "box_fill_miou": 1.0})
    assert m["point"] == pytest.approx({"objects": 2, "miou": 0.25, "accuracy": 0.5, "objects_base": 1,
                                        "miou_base": 0.0, "accuracy_base": 0.0, "objects_novel": 1,
                                        "miou_novel": 0.5, "accuracy_novel": 1.0})
    md = table1_markdown(m)
    assert "| box | 2 (1/1) | 70.0 | 100.0 | 40.0 | 50.0 | 100.0 | 0.0 |" in md
    # a prompt the label job did not answer is counted, not scored, and does not shift the others
    _, missing = score_image({**row, "instances": row["instances"][:2]}, meta, lookup)
    assert missing == 3
    records, missing = score_image({**row, "instances": [row["instances"][i] for i in (0, 2, 4)]}, meta, lookup)
    assert missing == 2 and [(r.prompt_type, r.iou) for r in records] == [("box", 1.0), ("point", 0.5)]


def _direct_cocoeval(gt: dict, results: list, cat_ids=None) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = json.loads(json.dumps(gt))
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(json.loads(json.dumps(results))), "segm")
        if cat_ids is not None:
            ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def test_mask_ap_equals_direct_pycocotools():
    h, w = 30, 40
    yy, xx = np.mgrid[:h, :w]
    disk = (yy - 15) ** 2 + (xx - 12) ** 2 < 64
    square = [25, 5, 38, 5, 38, 20, 25, 20]
    images = [{"id": 1, "width": w, "height": h}, {"id": 2, "width": w, "height": h}]
    anns = [{"image_id": 1, "category_id": 4, "segmentation": rle_str(disk), "bbox": [4, 7, 16, 16]},
            {"image_id": 1, "category_id": 6, "segmentation": [square], "bbox": [25, 5, 13, 15], "area": 195},
            {"image_id": 2, "category_id": 4, "segmentation": rle_str(disk[:, ::-1]), "bbox": [20, 7, 16, 16]},
            {"image_id": 2, "category_id": 6, "segmentation": rle_str(~disk), "bbox": [0, 0, 40, 30], "iscrowd": 1}]
    gt = coco_dataset(images, anns, [{"id": 4, "name": "disk"}, {"id": 6, "name": "square"}])
    assert [a["id"] for a in gt["annotations"]] == [1, 2, 3, 4] and gt["annotations"][0]["area"] == disk.sum()
    shifted = np.roll(disk, 3, axis=1)
    results = [
        {"image_id": 1, "category_id": 4, "segmentation": rle_str(shifted), "score": 0.9},
        {"image_id": 1, "category_id": 6, "segmentation": rle_str(polygon_mask(square, h, w)), "score": 0.3},
        {"image_id": 1, "category_id": 4, "segmentation": rle_str(disk[:, ::-1]), "score": 0.8},
        {"image_id": 2, "category_id": 4, "segmentation": rle_str(disk[:, ::-1]), "score": 0.5},
        {"image_id": 2, "category_id": 6, "segmentation": rle_str(~disk & (xx > 20)), "score": 0.7},  # on the crowd
    ]
    ours = mask_ap(gt, results)
    direct = _direct_cocoeval(gt, results)
    assert [ours[k] for k in ours] == pytest.approx([None if v < 0 else v for v in direct])
    assert 0 < ours["AP"] < 1
    sub = mask_ap(gt, results, cat_ids=[6])
    assert sub["AP"] == pytest.approx(_direct_cocoeval(gt, results, [6])[0]) and sub["AP"] == pytest.approx(1.0)
    empty = mask_ap(gt, [])
    assert empty["AP"] == 0.0 and mask_ap(gt, results, cat_ids=[])["AP"] is None


def test_instance_results_labels_and_scores():
    inst = {"label": "Traffic_Light", "detector_label": "car", "label_score": 0.5, "detector_score": 0.8,
            "rle": {"size": [2, 2], "counts": "04"}}
    cats = {"traffic light": 10, "car": 3}
    res, dropped = instance_results([inst, {**inst, "label": "zebra"}], 7, cats)
    assert dropped == 1 and res[0]["category_id"] == 10 and res[0]["score"] == pytest.approx(0.4)
    res, _ = instance_results([inst], 7, cats, label_source="detector")
    assert res[0]["category_id"] == 3 and res[0]["score"] == pytest.approx(0.8)
    res, _ = instance_results([{**inst, "detector_score": None}], 7, cats, score="auto")
    assert res[0]["score"] == pytest.approx(0.5)


@pytest.fixture
def shapes_json_vocab(tmp_path) -> str:
    path = tmp_path / "shapes.json"
    path.write_text(json.dumps({"name": "shapes", "classes": [
        {"id": 0, "name": "circle", "seen": True}, {"id": 1, "name": "square", "seen": False},
        {"id": 2, "name": "triangle", "seen": True}]}))
    return str(path)


def test_eval_detector_mode_on_ground_truth_labels_gives_ap_1(ray_local, tmp_path, shapes_json_vocab):
    ann_path, images, dataset, _ = make_coco(str(tmp_path / "coco"))
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in dataset["annotations"] if not a["iscrowd"]]
    (tmp_path / "res.json").write_text(json.dumps(results))
    shards = str(tmp_path / "shards")
    convert_detections(str(tmp_path / "res.json"), ann_path, images, shards, images_per_shard=2)
    labels = str(tmp_path / "gt_labels")
    gt_label_output(dataset, labels, shard_of=lambda i: "shard-000000" if i <= 9 else "shard-000001")
    model = ModelConfig(preset="ovsam_tiny", random_init=True, vocab=shapes_json_vocab, train_vocab="shapes")
    out = run_eval(EvalConfig(input=shards, output=str(tmp_path / "eval"), mode="detector", labels=labels,
                              model=model, categories=ann_path))
    m = out["metrics"]
    assert m["all"]["AP"] == pytest.approx(1.0) and m["base"]["AP"] == pytest.approx(1.0)
    assert m["novel"]["AP"] == pytest.approx(1.0)
    assert out["counts"] == {"images": 4, "images_error": 1, "ground_truth": 5, "detections": 4,
                             "dropped_unknown_label": 0}
    assert "| all | 100.0 |" in open(tmp_path / "eval" / "metrics.md").read()
    # the same numbers straight from pycocotools on the original json
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ann_path)
    exported = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 0.9,
                 "segmentation": rle_str(gt.annToMask(a))} for a in dataset["annotations"] if not a["iscrowd"]]
    direct = _direct_cocoeval(dataset, exported)
    assert direct[0] == pytest.approx(m["all"]["AP"])


def test_eval_interactive_and_detector_end_to_end(ray_local, tmp_path, shapes_vocab):
    src = str(tmp_path / "synthetic")
    generate_shards(src, num_images=4, images_per_shard=2, seed=5, image_size=(64, 48))
    model = ModelConfig(preset="ovsam_tiny", random_init=True, vocab=shapes_vocab)
    out = str(tmp_path / "eval")
    result = run_eval(EvalConfig(input=src, output=out, prompts="both", model=model, batch_size=4))
    objects = sum(len(json.loads(s)["annotations"]) for s in _jsons(src))
    m = result["metrics"]
    assert m["box"]["objects"] == m["point"]["objects"] == objects
    assert m["box"]["objects_novel"] == objects  # shape names are not COCO base classes
    assert 0.0 <= m["box"]["miou"] <= 1.0 and 0.0 <= m["point"]["accuracy"] <= 1.0
    assert result["counts"] == {"images": 4, "images_error": 0, "prompts_without_instance": 0}
    assert os.path.exists(os.path.join(out, "shards_both", "shard-000001.tar"))
    saved = json.load(open(os.path.join(out, "metrics.json")))
    assert saved["metrics"] == json.loads(json.dumps(m)) and saved["config"]["model"]["random_init"] is True
    assert "random weights" in open(os.path.join(out, "metrics.md")).read()

    # detector mode: the synthetic boxes/labels are the "detections"; labels from the detector
    det = run_eval(EvalConfig(input=src, output=str(tmp_path / "det"), mode="detector", label_source="detector",
                              model=model))
    assert det["counts"]["detections"] == objects and det["counts"]["ground_truth"] == objects
    assert 0.0 <= det["metrics"]["all"]["AP"] <= 1.0
    # re-score the committed labels; the run record names the model
    again = run_eval(EvalConfig(input=src, output=str(tmp_path / "det2"), mode="detector", label_source="detector",
                                labels=str(tmp_path / "det" / "labels_detector"), model=None))
    assert again["metrics"] == det["metrics"]


def _jsons(folder: str) -> list[bytes]:
    from ovsam_ray.data.shards import list_shards, read_shard

    return [s["json_bytes"] for u in list_shards(folder) for s in read_shard(u).samples]
