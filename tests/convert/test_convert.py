"""Converters: COCO, LVIS, SA-1B, ImageNet and detector results -> shards (DESIGN §4 JSON)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from coco_fixture import CATEGORIES, make_coco, polygon_mask, rle_str

from ovsam_ray.cli import main
from ovsam_ray.convert import (
    convert_coco,
    convert_detections,
    convert_imagenet,
    convert_lvis,
    convert_sa1b,
    load_synset_map,
    sample_key,
)
from ovsam_ray.data.rle import annotation_mask, decode_rle
from ovsam_ray.data.shards import list_shards, read_shard
from ovsam_ray.data.synthetic import encode_image, tar_bytes


def samples(output: str, s3_endpoint: str | None = None) -> dict[str, dict]:
    out = {}
    for url in list_shards(output, s3_endpoint=s3_endpoint):
        for s in read_shard(url, s3_endpoint=s3_endpoint).samples:
            assert s["error"] is None
            out[s["key"]] = {
                "shard": url.rsplit("/", 1)[-1],
                "ext": s["image_ext"],
                "image": s["image_bytes"],
                "meta": json.loads(s["json_bytes"]),
            }
    return out


def test_sample_key_is_safe():
    assert sample_key("a/b.c d") == "a_b_c_d"
    assert sample_key("n01440764", "x.JPEG") == "n01440764_x_JPEG"
    with pytest.raises(ValueError):
        sample_key("..")


def test_convert_coco_keeps_rle_polygons_crowd_and_prompts(tmp_path):
    ann_path, images, dataset, masks = make_coco(str(tmp_path / "coco"))
    out = str(tmp_path / "shards")
    summary = convert_coco(ann_path, images, out, images_per_shard=2, prompts="both")
    assert summary.images == 3 and summary.annotations == 5 and summary.skipped == 0
    assert [u.rsplit("/", 1)[-1] for u in summary.shards] == ["shard-000000.tar", "shard-000001.tar"]
    got = samples(out)
    assert list(got) == ["000000000005", "000000000009", "000000000012"]
    assert got["000000000012"]["shard"] == "shard-000001.tar"
    meta = got["000000000005"]["meta"]
    assert meta["image_id"] == 5 and (meta["width"], meta["height"]) == (64, 48)
    square, circle, crowd = meta["annotations"]
    assert isinstance(square["segmentation"], list) and square["category_name"] == "square"
    assert isinstance(circle["segmentation"]["counts"], str) and circle["category_name"] == "circle"
    assert crowd["iscrowd"] == 1 and isinstance(crowd["segmentation"]["counts"], list)
    for ann in meta["annotations"]:
        assert (annotation_mask(ann, 48, 64) == masks[ann["id"]]).all()
    # prompts: crowd regions are not objects
    assert meta["labels"] == ["square", "circle"] and meta["box_annotations"] == [0, 1]
    assert meta["boxes"][0] == [4.0, 4.0, 24.0, 24.0]
    for (x, y), i in zip(meta["points"], meta["point_annotations"]):
        assert masks[meta["annotations"][i]["id"]][int(y), int(x)]
    assert meta["point_boxes"] == meta["boxes"]
    assert "boxes" not in got["000000000012"]["meta"]
    assert json.load(open(os.path.join(out, "_categories.json")))["categories"] == CATEGORIES
    # deterministic: the same input gives byte-identical shards
    again = str(tmp_path / "again")
    convert_coco(ann_path, images, again, images_per_shard=2, prompts="both")
    for name in ("shard-000000.tar", "shard-000001.tar"):
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(again, name), "rb").read()


def test_convert_coco_skips_missing_image_and_cli(tmp_path, bystanders):
    ann_path, images, _, _ = make_coco(str(tmp_path / "coco"))
    os.remove(os.path.join(images, "000000000009.png"))
    out = str(tmp_path / "shards")
    bystanders.beside(out)
    assert (
        main(
            [
                "convert",
                "coco",
                "--annotations",
                ann_path,
                "--images",
                images,
                "--output",
                out,
                "--images-per-shard",
                "10",
                "--prompts",
                "none",
            ]
        )
        == 0
    )
    got = samples(out)
    assert list(got) == ["000000000005", "000000000012"]
    assert "boxes" not in got["000000000005"]["meta"]
    record = json.load(open(os.path.join(out, "_convert.json")))
    assert (
        record["images"] == 2
        and record["skipped"] == 1
        and "000000000009.png" in record["skipped_examples"][0]["sample"]
    )


def test_convert_coco_to_s3(tmp_path, s3_server, s3_bucket):
    ann_path, images, _, _ = make_coco(str(tmp_path / "coco"))
    out = f"s3://{s3_bucket}/coco"
    summary = convert_coco(ann_path, images, out, images_per_shard=2, s3_endpoint=s3_server)
    assert summary.images == 3
    assert set(samples(out, s3_server)) == {"000000000005", "000000000009", "000000000012"}


def test_convert_lvis_reads_coco_url_and_keeps_federated_fields(tmp_path):
    _, _, dataset, _ = make_coco(str(tmp_path / "coco"), image_dir="val2017")
    for image in dataset["images"]:
        del image["file_name"]
        image["neg_category_ids"] = [7]
        image["not_exhaustive_category_ids"] = []
    dataset["categories"] = [
        {**c, "synonyms": [c["name"]], "frequency": "rcf"[i]} for i, c in enumerate(dataset["categories"])
    ]
    path = tmp_path / "lvis_v1_val.json"
    path.write_text(json.dumps(dataset))
    out = str(tmp_path / "shards")
    summary = convert_lvis(str(path), str(tmp_path / "coco"), out, images_per_shard=8)
    assert summary.images == 3
    meta = samples(out)["000000000005"]["meta"]
    assert meta["file_name"] == "val2017/000000000005.png"
    assert meta["neg_category_ids"] == [7] and meta["not_exhaustive_category_ids"] == []
    assert len(meta["boxes"]) == 2
    cats = json.load(open(os.path.join(out, "_categories.json")))["categories"]
    assert [c["frequency"] for c in cats] == ["r", "c", "f"]


def _sa1b_pair(i: int) -> tuple[bytes, dict]:
    yy, xx = np.mgrid[:40, :50]
    masks = [(yy - 20) ** 2 + (xx - 15) ** 2 < 64, polygon_mask([30, 5, 45, 5, 45, 30, 30, 30], 40, 50)]
    image = np.zeros((40, 50, 3), np.uint8)
    for m in masks:
        image[m] = 200
    anns = [
        {
            "id": 10 * i + j,
            "segmentation": rle_str(m),
            "bbox": [0, 0, 1, 1],
            "area": int(m.sum()),
            "predicted_iou": 0.9,
            "point_coords": [[1.0, 2.0]],
            "stability_score": 0.95,
            "crop_box": [0, 0, 50, 40],
        }
        for j, m in enumerate(masks)
    ]
    for a, m in zip(anns, masks):
        ys, xs = np.nonzero(m)
        a["bbox"] = [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)]
    meta = {"image": {"image_id": i, "width": 50, "height": 40, "file_name": f"sa_{i}.jpg"}, "annotations": anns}
    return encode_image(image, "jpg"), meta


def test_convert_sa1b_folder_and_tar_agree(tmp_path):
    folder = tmp_path / "sa1b"
    folder.mkdir()
    members = []
    for i in (1, 2, 3):
        image, meta = _sa1b_pair(i)
        (folder / f"sa_{i}.jpg").write_bytes(image)
        (folder / f"sa_{i}.json").write_text(json.dumps(meta))
        members += [(f"sa_{i}.jpg", image), (f"sa_{i}.json", json.dumps(meta).encode())]
    (tmp_path / "tars").mkdir()
    (tmp_path / "tars" / "sa_000000.tar").write_bytes(tar_bytes(members))

    from_folder = (
        samples(str(tmp_path / "out_folder"))
        if convert_sa1b(str(folder), str(tmp_path / "out_folder"), images_per_shard=2).images == 3
        else None
    )
    from_tar = (
        samples(str(tmp_path / "out_tar"))
        if convert_sa1b(str(tmp_path / "tars"), str(tmp_path / "out_tar"), images_per_shard=2).images == 3
        else None
    )
    assert from_folder is not None and from_tar is not None
    assert list(from_folder) == ["sa_1", "sa_2", "sa_3"]
    assert {k: v["meta"] for k, v in from_folder.items()} == {k: v["meta"] for k, v in from_tar.items()}
    meta = from_folder["sa_2"]["meta"]
    assert meta["image_id"] == 2 and len(meta["annotations"]) == 2 and len(meta["boxes"]) == 2
    assert meta["annotations"][0]["predicted_iou"] == 0.9 and "category_name" not in meta["annotations"][0]
    assert decode_rle(meta["annotations"][1]["segmentation"]).sum() == meta["annotations"][1]["area"]


def test_convert_imagenet_folder_and_tar_per_class(tmp_path):
    synsets = tmp_path / "LOC_synset_mapping.txt"
    synsets.write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\nn09999999 unused\n")
    assert load_synset_map(str(synsets))[0].synonyms == ("Tinca tinca",)
    jpg = encode_image(np.full((20, 30, 3), 90, np.uint8), "jpg")
    folders = tmp_path / "train"
    for synset in ("n01443537", "n01440764"):
        (folders / synset).mkdir(parents=True)
        for j in (2, 1):
            (folders / synset / f"{synset}_{j}.JPEG").write_bytes(jpg)
    tars = tmp_path / "fall11"
    tars.mkdir()
    for synset in ("n01443537", "n01440764"):
        (tars / f"{synset}.tar").write_bytes(tar_bytes([(f"{synset}_{j}.JPEG", jpg) for j in (1, 2)]))

    for src in (folders, tars):
        out = str(tmp_path / f"out_{src.name}")
        summary = convert_imagenet(str(src), out, synsets=str(synsets), images_per_shard=3, order="source")
        assert summary.images == 4 and len(summary.shards) == 2
        got = samples(out)
        assert list(got) == ["n01440764_1", "n01440764_2", "n01443537_1", "n01443537_2"]
        mixed = convert_imagenet(str(src), out + "_mixed", synsets=str(synsets), images_per_shard=3)

        def strip(found: dict) -> dict:
            return {k: {f: v for f, v in d.items() if f != "shard"} for k, d in found.items()}

        assert mixed.images == 4 and strip(samples(out + "_mixed")) == strip(got), "the same samples, mixed"
        meta = got["n01443537_2"]["meta"]
        assert meta == {
            "image_id": "n01443537/n01443537_2",
            "class_name": "goldfish",
            "synset": "n01443537",
            "class_id": 1,
            "synonyms": ["Carassius auratus"],
        }
        assert got["n01440764_1"]["ext"] == "jpeg"
    # without a map, folder names are the classes; a JSON map works too
    json_map = tmp_path / "map.json"
    json_map.write_text(json.dumps({"0": ["n01440764", "tench"], "1": ["n01443537", "goldfish"]}))
    out = str(tmp_path / "out_json")
    convert_imagenet(str(folders), out, synsets=str(json_map))
    assert samples(out)["n01443537_1"]["meta"]["class_name"] == "goldfish"
    out = str(tmp_path / "out_nomap")
    convert_imagenet(str(folders), out)
    assert samples(out)["n01443537_1"]["meta"]["class_name"] == "n01443537"


def test_convert_detections(tmp_path):
    ann_path, images, dataset, _ = make_coco(str(tmp_path / "coco"))
    results = [
        {"image_id": 5, "category_id": 3, "bbox": [4, 4, 20, 20], "score": 0.6},
        {"image_id": 5, "category_id": 1, "bbox": [34, 20, 20, 20], "score": 0.9},
        {"image_id": 5, "category_id": 7, "bbox": [1, 1, 5, 5], "score": 0.01},
        {"image_id": 9, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.5},
        {"image_id": 999, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.5},
    ]
    res_path = tmp_path / "results.json"
    res_path.write_text(json.dumps(results))
    out = str(tmp_path / "shards")
    summary = convert_detections(str(res_path), ann_path, images, out, min_score=0.05)
    assert summary.images == 3 and any("dropped 1" in n and "1 on images not in" in n for n in summary.notes)
    got = samples(out)
    meta = got["000000000005"]["meta"]
    assert meta["boxes"] == [[34.0, 20.0, 54.0, 40.0], [4.0, 4.0, 24.0, 24.0]]
    assert meta["scores"] == [0.9, 0.6] and meta["labels"] == ["circle", "square"]
    assert len(meta["annotations"]) == 3  # the ground truth travels along
    assert got["000000000012"]["meta"]["boxes"] == []
    out2 = str(tmp_path / "no_gt")
    convert_detections(str(res_path), ann_path, images, out2, keep_ground_truth=False, max_per_image=1)
    meta = samples(out2)["000000000005"]["meta"]
    assert meta["annotations"] == [] and meta["labels"] == ["circle"]
