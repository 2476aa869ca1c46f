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
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ovsam_ray.convert import convert_detections
from ovsam_ray.data.gt_prompts import gt_prompts
from ovsam_ray.data.points import distance_to_background, interior_points
from ovsam_ray.data.synthetic import generate_shards
from ovsam_ray.evaluation.coco_ap import coco_dataset, instance_results, mask_ap
from ovsam_ray.evaluation.run_eval import EvalConfig, run_eval
from ovsam_ray.evaluation.table1 import ClassLookup, mask_iou, score_image, summarize, table1_markdown
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
    anns = [
        {
            "bbox": [0, 0, 4, 4],
            "category_name": "a",
            "segmentation": rle_str(np.pad(np.ones((4, 4)), ((0, 6), (0, 6)))),
        },
        {"bbox": [1, 1, 2, 2], "iscrowd": 1, "category_name": "a"},
        {"bbox": [1, 1, 0, 2], "category_name": "a"},
        {"bbox": [5, 5, 4, 4], "category_name": "b", "segmentation": [[5, 5, 9, 5, 9, 9, 5, 9]]},
    ]
    out = gt_prompts(anns, height=10, width=10, mode="both", keep=lambda a: a["category_name"] != "b")
    assert out["boxes"] == [[0.0, 0.0, 4.0, 4.0]] and out["box_annotations"] == [0] and out["labels"] == ["a"]
    assert out["points"] == [[1.0, 1.0]] and out["point_boxes"] == out["boxes"]  # 4-way tie: first in raster order
    assert gt_prompts(anns, height=10, width=10, mode="point")["point_annotations"] == [0, 3]


def _inst(mask: np.ndarray, label: str, prompt_type: str, box=None, point=None) -> dict:
    return {"prompt_type": prompt_type, "prompt_box": box, "point": point, "rle": rle_str(mask), "label": label}


def test_table1_hand_made_case():
    vocab = Vocabulary(
        "t",
        ("cat", "dog", "bird"),
        (("cat",), ("dog", "puppy"), ("bird",)),
        (True, False, True),
        (False, False, True),
        (1, 2, 3),
    )
    lookup = ClassLookup(vocab)
    a0 = np.zeros((10, 10), bool)
    a0[0:4, 0:4] = True
    a1 = np.zeros((10, 10), bool)
    a1[5:10, 5:10] = True
    anns = [
        {"category_name": "cat", "bbox": [0, 0, 4, 4], "segmentation": rle_str(a0)},
        {"category_name": "puppy", "bbox": [5, 5, 5, 5], "segmentation": [[5, 5, 10, 5, 10, 10, 5, 10]]},
        {"category_id": 3, "bbox": [0, 5, 2, 2], "segmentation": rle_str(a0)},  # bird: excluded
        {"category_name": "cat", "bbox": [0, 0, 1, 1], "iscrowd": 1},
    ]
    assert (polygon_mask([5, 5, 10, 5, 10, 10, 5, 10], 10, 10) == a1).all()
    meta = {
        "annotations": anns,
        "box_annotations": [0, 1, 2],
        "point_annotations": [0, 1],
        "boxes": [[0, 0, 4, 4], [5, 5, 10, 10], [0, 5, 2, 7]],
        "points": [[1, 1], [7, 7]],
    }
    half = np.zeros((10, 10), bool)
    half[5:10, 5:7] = True  # IoU 10/25 with a1
    extra = a1.copy()
    extra[0:5, 5:10] = True  # IoU 25/50 with a1
    row = {
        "width": 10,
        "height": 10,
        "instances": [
            _inst(a0, "cat", "box", [0, 0, 4, 4]),
            _inst(half, "cat", "box", [5, 5, 10, 10]),
            _inst(a0, "bird", "box", [0, 5, 2, 7]),
            _inst(np.zeros((10, 10), bool), "dog", "point", point=[1, 1]),
            _inst(extra, "dog", "point", point=[7, 7]),
        ],
    }
    records, missing = score_image(row, meta, lookup)
    assert missing == 0 and len(records) == 4
    m = summarize(records)
    assert m["box"] == pytest.approx(
        {
            "objects": 2,
            "miou": 0.7,
            "accuracy": 0.5,
            "objects_base": 1,
            "miou_base": 1.0,
            "accuracy_base": 1.0,
            "objects_novel": 1,
            "miou_novel": 0.4,
            "accuracy_novel": 0.0,
            "box_fill_miou": 1.0,
            "box_fill_miou_base": 1.0,
            "box_fill_miou_novel": 1.0,
        }
    )
    assert m["point"] == pytest.approx(
        {
            "objects": 2,
            "miou": 0.25,
            "accuracy": 0.5,
            "objects_base": 1,
            "miou_base": 0.0,
            "accuracy_base": 0.0,
            "objects_novel": 1,
            "miou_novel": 0.5,
            "accuracy_novel": 1.0,
        }
    )
    md = table1_markdown(m)
    assert "| box | 2 (1/1) | 70.0 | 100.0 | 40.0 | 50.0 | 100.0 | 0.0 |" in md
    # a prompt the label job did not answer is counted, not scored, and does not shift the others
    _, missing = score_image({**row, "instances": row["instances"][:2]}, meta, lookup)
    assert missing == 3
    records, missing = score_image({**row, "instances": [row["instances"][i] for i in (0, 2, 4)]}, meta, lookup)
    assert missing == 2 and [(r.prompt_type, r.iou) for r in records] == [("box", 1.0), ("point", 0.5)]


def test_mask_iou_golden_values_and_the_empty_convention():
    a = np.zeros((4, 4), bool)
    a[:2, :2] = True  # 4 pixels
    b = np.zeros((4, 4), bool)
    b[1:3, 1:3] = True  # 4 pixels, 1 shared: IoU 1/7
    empty = np.zeros((4, 4), bool)
    assert mask_iou(a, b) == pytest.approx(1 / 7) and mask_iou(a, a) == 1.0
    assert mask_iou(empty, empty) == 0.0, "COCO: an empty union scores 0, an empty pair is no match"
    assert mask_iou(empty, a) == 0.0 == mask_iou(a, empty)
    stack = np.stack([a, b, empty])
    rles = mask_utils.encode(np.asfortranarray(stack.transpose(1, 2, 0).astype(np.uint8)))
    coco = mask_utils.iou(rles, rles, [0, 0, 0])
    np.testing.assert_allclose([[mask_iou(x, y) for y in stack] for x in stack], coco)


def _shapes_vocab(seen: tuple[bool, ...]) -> Vocabulary:
    names = ("circle", "cross", "star")[: len(seen)]
    return Vocabulary("shapes", names, tuple((n,) for n in names), seen, (False,) * len(seen), tuple(range(len(seen))))


def test_scorer_splits_seen_and_unseen_with_their_own_box_fill():
    lookup = ClassLookup(_shapes_vocab((True, False)))
    circle = np.zeros((8, 8), bool)
    circle[2:6, 2:4] = True  # 8 pixels; its prompt box [2, 2, 6, 6] fills 16: box-fill IoU 0.5
    cross = np.zeros((8, 8), bool)
    cross[0:2, 6:8] = True  # 4 pixels, prompt box exactly around it: box-fill IoU 1
    predicted_cross = np.zeros((8, 8), bool)
    predicted_cross[0:2, 4:8] = True  # IoU 4/8 with the cross
    anns = [
        {"category_name": "circle", "bbox": [2, 2, 2, 4], "segmentation": rle_str(circle)},
        {"category_name": "cross", "bbox": [6, 0, 2, 2], "segmentation": rle_str(cross)},
    ]
    meta = {"annotations": anns, "boxes": [[2, 2, 6, 6], [6, 0, 8, 2]], "box_annotations": [0, 1]}
    row = {
        "width": 8,
        "height": 8,
        "instances": [
            _inst(circle, "circle", "box", [2, 2, 6, 6]),
            _inst(predicted_cross, "circle", "box", [6, 0, 8, 2]),
        ],
    }
    records, missing = score_image(row, meta, lookup)
    assert missing == 0
    assert summarize(records) == {
        "box": pytest.approx(
            {
                "objects": 2,
                "miou": 0.75,
                "accuracy": 0.5,
                "box_fill_miou": 0.75,
                "objects_base": 1,
                "miou_base": 1.0,
                "accuracy_base": 1.0,
                "box_fill_miou_base": 0.5,
                "objects_novel": 1,
                "miou_novel": 0.5,
                "accuracy_novel": 0.0,
                "box_fill_miou_novel": 1.0,
            }
        )
    }


def test_scorer_on_empty_inputs():
    lookup = ClassLookup(_shapes_vocab((True,)))
    assert summarize([]) == {}
    assert score_image({"width": 4, "height": 4, "instances": []}, {}, lookup) == ([], 0)
    obj = np.zeros((4, 4), bool)
    obj[1:3, 1:3] = True
    meta = {
        "annotations": [{"category_name": "circle", "bbox": [1, 1, 2, 2], "segmentation": rle_str(obj)}],
        "boxes": [[1, 1, 3, 3]],
        "box_annotations": [0],
    }
    assert score_image({"width": 4, "height": 4, "instances": []}, meta, lookup) == ([], 1)  # unanswered prompt
    empty_pred = _inst(np.zeros((4, 4), bool), "circle", "box", [1, 1, 3, 3])
    records, _ = score_image({"width": 4, "height": 4, "instances": [empty_pred]}, meta, lookup)
    assert [(r.iou, r.correct, r.fill_iou) for r in records] == [(0.0, True, 1.0)]
    # no segmentation: the object's ground truth is its box
    no_segm = {**meta, "annotations": [{"category_name": "circle", "bbox": [1, 1, 2, 2]}]}
    records, _ = score_image(
        {"width": 4, "height": 4, "instances": [_inst(obj, "circle", "box", [1, 1, 3, 3])]}, no_segm, lookup
    )
    assert records[0].iou == 1.0
    m = summarize(records)
    assert m["box"]["objects_novel"] == 0 and m["box"]["miou_novel"] is None and "point" not in m


class BoxFillPredictor:
    """Stands in for ``OVSAMPredictor`` in :func:`label_samples`: each prompt's mask is its box
    filled (a point's: its CLIP box), every label class 0."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def embed(self, images):
        self.calls.append(len(images))
        return [im.shape[:2] for im in images]

    def predict(self, sizes, prompts):
        from ovsam_ray.data.rle import box_fill_mask, boxes_from_binary_masks
        from ovsam_ray.model.predictor import ImagePrediction

        out = []
        for (h, w), p in zip(sizes, prompts):
            point_boxes = p.point_boxes if p.point_boxes is not None else np.full((len(p.points), 4), np.nan)
            boxes = np.concatenate([p.boxes, point_boxes]).astype(np.float32)
            n = len(boxes)
            masks = np.stack([box_fill_mask(b, h, w) for b in boxes]) if n else np.zeros((0, h, w), bool)
            z = np.zeros((n, 3), np.float32)
            out.append(
                ImagePrediction(
                    masks=masks,
                    mask_boxes=boxes_from_binary_masks(masks),
                    low_res_logits=np.zeros((n, 1, 4, 4)),
                    head_logits=z,
                    clip_logits=z,
                    fused_logits=z,
                    labels=np.zeros(n, np.int64),
                    scores=np.ones(n, np.float32),
                    head_labels=np.zeros(n, np.int64),
                    topk_ids=np.zeros((n, 1), np.int64),
                    topk_scores=np.ones((n, 1), np.float32),
                    region_embeddings=np.zeros((n, 2), np.float32),
                    clip_embeddings=np.zeros((n, 2), np.float32),
                    clip_valid=np.ones(n, bool),
                    is_point=np.arange(n) >= len(p.boxes),
                )
            )
        return out


def test_label_samples_decodes_prompts_predicts_and_keeps_bad_samples_as_error_rows(tmp_path):
    from ovsam_ray.data.gt_prompts import rewrite_shard_prompts
    from ovsam_ray.data.shards import iter_shard_samples
    from ovsam_ray.labelling import label_samples

    (url,) = generate_shards(str(tmp_path), num_images=3, images_per_shard=3, seed=5, image_size=(64, 48))
    rewrite_shard_prompts(url, url, mode="both")
    samples = list(iter_shard_samples(url))
    samples.insert(1, {**samples[0], "key": "broken", "image_bytes": b"not an image"})
    stages: list[str] = []

    @contextlib.contextmanager
    def stage(name):
        stages.append(name)
        yield

    predictor = BoxFillPredictor()
    rows = list(label_samples(predictor, _shapes_vocab((True, True, True)), samples, batch_size=2, stage=stage))
    assert [r["key"] for r in rows] == [s["key"] for s in samples]
    assert rows[1]["status"] == "error" and rows[1]["instances"] == [] and "image" in rows[1]["error"]
    assert predictor.calls == [1, 2], "the broken sample is not sent to the model"
    assert stages == ["jpeg_decode", "embed", "predict", "records"] * 2
    for row, sample in zip(rows, samples):
        if row["status"] != "ok":
            continue
        meta = json.loads(sample["json_bytes"])
        assert (row["width"], row["height"]) == (64, 48)
        assert [i["prompt_type"] for i in row["instances"]] == ["box"] * len(meta["boxes"]) + ["point"] * len(
            meta["points"]
        )
        assert {i["source"] for i in row["instances"]} <= {"shard"}  # every prompt is the shard's
        np.testing.assert_allclose(
            [i["prompt_box"] for i in row["instances"][: len(meta["boxes"])]], meta["boxes"], atol=1e-4
        )


def test_evaluate_predictor_pairs_every_prompt_with_its_own_object(tmp_path):
    """With box-fill masks, a prompt paired with its own object scores exactly the box-fill IoU;
    any mis-pairing would break the equality."""
    from ovsam_ray.data.synthetic import shape_vocabulary_names
    from ovsam_ray.evaluation.table1 import evaluate_predictor, shard_metas

    shards = generate_shards(str(tmp_path), num_images=6, images_per_shard=3, seed=9, image_size=(80, 60))
    names = tuple(shape_vocabulary_names())
    held_out = ("pentagon", "cross")
    vocab = Vocabulary(
        "shapes",
        names,
        tuple((n,) for n in names),
        tuple(n not in held_out for n in names),
        (False,) * len(names),
        tuple(range(len(names))),
    )
    out = evaluate_predictor(BoxFillPredictor(), vocab, shards, batch_size=4)
    anns = [a for url in shards for meta in shard_metas(url).values() for a in meta["annotations"]]
    box, point = out["metrics"]["box"], out["metrics"]["point"]
    assert out["counts"] == {"images": 6, "images_error": 0, "prompts_without_instance": 0}
    assert box["objects"] == point["objects"] == len(anns)
    assert box["objects_novel"] == sum(a["category_name"] in held_out for a in anns)
    assert box["miou"] == pytest.approx(box["box_fill_miou"]) and point["miou"] == pytest.approx(box["box_fill_miou"])
    assert box["miou_base"] == pytest.approx(box["box_fill_miou_base"])
    assert box["accuracy"] == pytest.approx(sum(a["category_name"] == names[0] for a in anns) / len(anns))
    assert 0.3 < box["box_fill_miou"] < 1.0


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
    anns = [
        {"image_id": 1, "category_id": 4, "segmentation": rle_str(disk), "bbox": [4, 7, 16, 16]},
        {"image_id": 1, "category_id": 6, "segmentation": [square], "bbox": [25, 5, 13, 15], "area": 195},
        {"image_id": 2, "category_id": 4, "segmentation": rle_str(disk[:, ::-1]), "bbox": [20, 7, 16, 16]},
        {"image_id": 2, "category_id": 6, "segmentation": rle_str(~disk), "bbox": [0, 0, 40, 30], "iscrowd": 1},
    ]
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
    inst = {
        "label": "Traffic_Light",
        "detector_label": "car",
        "label_score": 0.5,
        "detector_score": 0.8,
        "rle": {"size": [2, 2], "counts": "04"},
    }
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
    path.write_text(
        json.dumps(
            {
                "name": "shapes",
                "classes": [
                    {"id": 0, "name": "circle", "seen": True},
                    {"id": 1, "name": "square", "seen": False},
                    {"id": 2, "name": "triangle", "seen": True},
                ],
            }
        )
    )
    return str(path)


def test_eval_detector_mode_on_ground_truth_labels_gives_ap_1(ray_local, tmp_path, shapes_json_vocab, bystanders):
    ann_path, images, dataset, _ = make_coco(str(tmp_path / "coco"))
    results = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
        for a in dataset["annotations"]
        if not a["iscrowd"]
    ]
    (tmp_path / "res.json").write_text(json.dumps(results))
    shards = str(tmp_path / "shards")
    convert_detections(str(tmp_path / "res.json"), ann_path, images, shards, images_per_shard=2)
    labels = str(tmp_path / "gt_labels")
    gt_label_output(dataset, labels, shard_of=lambda i: "shard-000000" if i <= 9 else "shard-000001")
    model = ModelConfig(preset="ovsam_tiny", random_init=True, vocab=shapes_json_vocab, train_vocab="shapes")
    bystanders.around(tmp_path / "eval")
    out = run_eval(
        EvalConfig(
            input=shards,
            output=str(tmp_path / "eval"),
            mode="detector",
            labels=labels,
            model=model,
            categories=ann_path,
        )
    )
    m = out["metrics"]
    assert m["all"]["AP"] == pytest.approx(1.0) and m["base"]["AP"] == pytest.approx(1.0)
    assert m["novel"]["AP"] == pytest.approx(1.0)
    assert out["counts"] == {
        "images": 4,
        "images_error": 1,
        "ground_truth": 5,
        "detections": 4,
        "dropped_unknown_label": 0,
    }
    assert "| all | 100.0 |" in open(tmp_path / "eval" / "metrics.md").read()
    # the same numbers straight from pycocotools on the original json
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ann_path)
    exported = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "score": 0.9,
            "segmentation": rle_str(gt.annToMask(a)),
        }
        for a in dataset["annotations"]
        if not a["iscrowd"]
    ]
    direct = _direct_cocoeval(dataset, exported)
    assert direct[0] == pytest.approx(m["all"]["AP"])


def test_eval_interactive_and_detector_end_to_end(ray_local, tmp_path, shapes_vocab, bystanders):
    src = str(tmp_path / "synthetic")
    generate_shards(src, num_images=4, images_per_shard=2, seed=5, image_size=(64, 48))
    model = ModelConfig(preset="ovsam_tiny", random_init=True, vocab=shapes_vocab)
    out = str(tmp_path / "eval")
    bystanders.around(out)
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
    det = run_eval(
        EvalConfig(input=src, output=str(tmp_path / "det"), mode="detector", label_source="detector", model=model)
    )
    assert det["counts"]["detections"] == objects and det["counts"]["ground_truth"] == objects
    assert 0.0 <= det["metrics"]["all"]["AP"] <= 1.0
    # re-score the committed labels; the run record names the model
    again = run_eval(
        EvalConfig(
            input=src,
            output=str(tmp_path / "det2"),
            mode="detector",
            label_source="detector",
            labels=str(tmp_path / "det" / "labels_detector"),
            model=None,
        )
    )
    assert again["metrics"] == det["metrics"]


def _jsons(folder: str) -> list[bytes]:
    from ovsam_ray.data.shards import list_shards, read_shard

    return [s["json_bytes"] for u in list_shards(folder) for s in read_shard(u).samples]
