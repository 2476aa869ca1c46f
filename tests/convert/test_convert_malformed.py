"""Converters on malformed input files: a bad record is skipped and counted with its reason, an unusable
file stops with one ConvertError line naming it; never a traceback, never a silent drop."""

from __future__ import annotations

import copy
import json
import logging
import math
import os

import numpy as np
import pytest
from coco_fixture import make_coco

from ovsam_ray.cli import main
from ovsam_ray.convert import (
    ConvertError,
    convert_coco,
    convert_detections,
    convert_lvis,
    convert_sa1b,
    load_synset_map,
)
from ovsam_ray.data.shards import list_shards, read_shard
from ovsam_ray.data.synthetic import encode_image, tar_bytes


def _strict(text: str | bytes):
    """json.loads that refuses NaN/Infinity: what every other JSON reader does."""

    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def written(output: str) -> dict[str, dict]:
    out = {}
    for url in list_shards(output):
        for s in read_shard(url).samples:
            out[s["key"]] = _strict(s["json_bytes"])
    return out


def record(output: str) -> dict:
    return _strict(open(os.path.join(output, "_convert.json")).read())


def reasons(rec: dict) -> str:
    return " | ".join(e["reason"] for e in rec["skipped_examples"] + rec["skipped_record_examples"])


@pytest.fixture
def coco(tmp_path):
    path, images, dataset, _ = make_coco(str(tmp_path / "coco"))
    return path, images, copy.deepcopy(dataset)  # its categories are the fixture module's own list


def _convert(tmp_path, dataset, images, name="shards", **kw):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(dataset))
    out = str(tmp_path / name)
    summary = convert_coco(str(path), images, out, **kw)
    return summary, out


# -- the file as a whole ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b"[1, 2, 3]",  # a list, not an object
        b'{"images": {"id": 1}}',  # images not a list
        b'{"images": [], "annotations": {"a": 1}}',  # annotations not a list
        b'{"images": [], "categories": "cats"}',
        b'{"images": [\xff\xfe]}',  # not UTF-8
        b"[" * 100_000 + b"]" * 100_000,  # nested too deeply for the parser
        b'{"images": [',  # cut short
    ],
)
def test_unusable_file_stops_with_one_line_naming_it(tmp_path, coco, content, caplog, capsys):
    _, images, _ = coco
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(ConvertError, match="bad.json"):
        convert_coco(str(path), images, str(tmp_path / "out"))
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert (
            main(
                ["convert", "coco", "--annotations", str(path), "--images", images, "--output", str(tmp_path / "out2")]
            )
            == 2
        )
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "bad.json" in errors[0] and "\n" not in errors[0]
    assert not os.path.exists(tmp_path / "out2")  # refused before anything is written


# -- image records ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, why",
    [
        (None, "must be an object"),
        ([1, 2], "must be an object"),
        ({"id": True, "file_name": "000000000009.png"}, "id must be an integer or text"),
        ({"id": 9.5, "file_name": "000000000009.png"}, "id must be an integer or text"),
        ({"id": None, "file_name": "000000000009.png"}, "id must be an integer or text"),
        ({"id": -9, "file_name": "000000000009.png"}, "outside"),
        ({"id": 10**400, "file_name": "000000000009.png"}, "outside"),
        ({"id": "...", "file_name": "000000000009.png"}, "no usable sample key"),
        ({"id": 9, "file_name": None}, "file_name must be text"),
        ({"id": 9, "file_name": ["a.png"]}, "file_name must be text"),
        ({"id": 9, "file_name": "000000000009.png", "width": -64}, "width"),
        ({"id": 9, "file_name": "000000000009.png", "height": 0}, "height"),
        ({"id": 9, "file_name": "000000000009.png", "width": "64"}, "width"),
        ({"id": 9, "file_name": "000000000009.png", "width": math.inf}, "width"),
        ({"id": 9, "file_name": "000000000009.png", "width": True}, "width"),
    ],
)
def test_malformed_image_is_skipped_with_reason(tmp_path, coco, bad, why):
    _, images, dataset = coco
    dataset["images"][1] = bad
    summary, out = _convert(tmp_path, dataset, images)
    assert summary.images == 2 and summary.skipped == 1
    assert set(written(out)) == {"000000000005", "000000000012"}
    rec = record(out)
    assert rec["skipped"] == 1 and why in rec["skipped_examples"][0]["reason"]
    assert "images[1]" in rec["skipped_examples"][0]["sample"]


@pytest.mark.parametrize(
    "name, why",
    [
        ("../coco/images/000000000009.png", "'..'"),
        ("/etc/hostname.png", "absolute"),
        ("a\\..\\000000000009.png", "backslash"),
        ("000000000009\x00.png", "NUL"),
        ("link/000000000009.png", "outside --images through a link"),
    ],
)
def test_file_name_leaving_images_is_refused(tmp_path, coco, name, why):
    _, images, dataset = coco
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "000000000009.png").write_bytes(b"not yours")
    os.symlink(outside, os.path.join(images, "link"))
    dataset["images"][1]["file_name"] = name
    summary, out = _convert(tmp_path, dataset, images)
    assert summary.images == 2 and summary.skipped == 1 and why in reasons(record(out))
    assert all(b"not yours" not in open(u, "rb").read() for u in list_shards(out))


def test_links_inside_images_are_followed(tmp_path, coco):
    _, images, dataset = coco
    os.makedirs(os.path.join(images, "sub"))
    os.symlink(os.path.join(images, "000000000009.png"), os.path.join(images, "sub", "nine.png"))
    dataset["images"][1]["file_name"] = "sub/nine.png"
    summary, _ = _convert(tmp_path, dataset, images)
    assert summary.images == 3 and summary.skipped == 0


def test_duplicate_and_mixed_type_ids(tmp_path, coco):
    _, images, dataset = coco
    dataset["images"].append(dict(dataset["images"][0]))  # id 5 twice: neither copy is used
    dataset["images"][1] = {**dataset["images"][1], "id": "12"}  # "12" and 12 are one id
    summary, out = _convert(tmp_path, dataset, images)
    assert summary.images == 0 and summary.skipped == 4
    assert "appears more than once" in reasons(record(out))


def test_text_image_id_matches_integer_annotation_image_id(tmp_path, coco):
    _, images, dataset = coco
    dataset["images"][0]["id"] = "5"
    summary, out = _convert(tmp_path, dataset, images)
    assert summary.images == 3 and len(written(out)["5"]["annotations"]) == 3


def test_point_prompts_without_size_skip_the_image(tmp_path, coco):
    _, images, dataset = coco
    del dataset["images"][0]["width"]
    summary, out = _convert(tmp_path, dataset, images, prompts="point")
    assert summary.images == 2 and summary.skipped == 1 and "width" in reasons(record(out))


# -- annotation and category records ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, why",
    [
        (lambda a: a.update(bbox="4,4,20,20"), "bbox must be a list of 4 numbers"),
        (lambda a: a.update(bbox=None), "bbox must be a list of 4 numbers"),
        (lambda a: a.update(bbox={"x": 1}), "bbox must be a list of 4 numbers"),
        (lambda a: a.update(bbox=[4, 4, math.inf, 20]), "not a finite number"),
        (lambda a: a.update(bbox=[4, 4, math.nan, 20]), "not a finite number"),
        (lambda a: a.update(bbox=[4, 4, 10**400, 20]), "not a finite number"),
        (lambda a: a.update(bbox=[4, 4, -3, 20]), "negative"),
        (lambda a: a.update(bbox=[4, True, 3, 20]), "not a finite number"),
        (lambda a: a.update(segmentation=None), "segmentation"),
        (lambda a: a.update(segmentation=[[1, "2", 3, 4, 5, 6]]), "polygon"),
        (lambda a: a.update(segmentation=[[0, 0, 1e9, 0, 1e9, 1e9]]), "beyond"),  # pycocotools segfaults on it
        (lambda a: a.update(segmentation=[[0, 0, 9, 0, 9, 9], None]), "polygons must be lists"),
        (lambda a: a.update(bbox=[1e300, 4, 3, 20]), "beyond"),
        (lambda a: a.update(segmentation={"counts": "abc", "size": [48]}), "RLE size"),
        (lambda a: a.update(segmentation={"counts": {"x": 1}, "size": [48, 64]}), "RLE counts"),
        (lambda a: a.update(segmentation={"counts": [0, 2**31, 5], "size": [48, 64]}), "add up to"),  # heap corruption
        (lambda a: a.update(area=math.nan), "area"),
        (lambda a: a.update(iscrowd="yes"), "iscrowd"),
        (lambda a: a.update(category_id=None), "category_id"),
        (lambda a: a.update(category_id=99), "names no category"),
        (lambda a: a.update(image_id=None), "image_id"),
        (lambda a: a.update(image_id=[5]), "image_id"),
        (lambda a: a.update(image_id=4242), "names no image"),
        (lambda a: a.update(id=False), "id must be"),
    ],
)
def test_malformed_annotation_is_skipped_with_reason(tmp_path, coco, change, why):
    _, images, dataset = coco
    change(dataset["annotations"][0])
    summary, out = _convert(tmp_path, dataset, images, prompts="both")
    rec = record(out)
    assert summary.images == 3 and summary.skipped == 0
    assert rec["skipped_records"] == {"annotations": 1} and why in rec["skipped_record_examples"][0]["reason"]
    assert rec["skipped_record_examples"][0]["record"].startswith("annotations[0]")
    assert len(written(out)["000000000005"]["annotations"]) == 2


def test_null_and_duplicate_annotations(tmp_path, coco):
    _, images, dataset = coco
    dataset["annotations"].append(None)
    dataset["annotations"].append(copy.deepcopy(dataset["annotations"][3]))  # same id twice
    summary, out = _convert(tmp_path, dataset, images)
    rec = record(out)
    assert summary.images == 3 and rec["skipped_records"] == {"annotations": 3}
    assert summary.annotations == 4  # 5 less both copies of id 104


@pytest.mark.parametrize(
    "bad, why",
    [
        (None, "must be an object"),
        ({"id": 1}, "name must be text"),
        ({"id": 1, "name": ""}, "name is empty"),
        ({"id": 1, "name": "\ud800"}, "not valid UTF-8"),
        ({"id": 1, "name": "circle", "weight": math.nan}, "finite"),
        ([{"id": 1, "name": "circle"}, {"id": "1", "name": "round"}], "appears more than once"),
    ],
)
def test_malformed_category_is_skipped_and_its_annotations_too(tmp_path, coco, bad, why):
    _, images, dataset = coco
    dataset["categories"][0:1] = bad if isinstance(bad, list) else [bad]
    summary, out = _convert(tmp_path, dataset, images)
    rec = record(out)
    assert summary.images == 3 and why in reasons(rec)
    assert rec["skipped_records"]["annotations"] == 2  # the two circles: category 1 is not usable
    assert all(c["id"] != 1 for c in _strict(open(os.path.join(out, "_categories.json")).read())["categories"])


def test_huge_integer_beyond_the_digit_limit(tmp_path, coco):
    _, images, dataset = coco
    path = tmp_path / "huge.json"
    text = json.dumps(dataset).replace('"id": 9,', '"id": ' + "9" * 5000 + ",", 1)
    path.write_text(text)
    summary = convert_coco(str(path), images, str(tmp_path / "out"))
    assert summary.images == 2 and summary.skipped == 1


def test_cli_prints_the_counts(tmp_path, coco, capsys):
    _, images, dataset = coco
    dataset["images"].append(None)
    dataset["annotations"][0]["bbox"] = "x"
    path = tmp_path / "a.json"
    path.write_text(json.dumps(dataset))
    assert (
        main(["convert", "coco", "--annotations", str(path), "--images", images, "--output", str(tmp_path / "out")])
        == 0
    )
    printed = capsys.readouterr().out
    assert '"skipped": 1' in printed and '"annotations": 1' in printed


# -- LVIS, detections, SA-1B --------------------------------------------------------------------------------------


def test_lvis_image_without_a_path_is_skipped(tmp_path):
    _, _, dataset, _ = make_coco(str(tmp_path / "coco"), image_dir="val2017")
    for image in dataset["images"]:
        del image["file_name"]
    dataset["images"][0]["coco_url"] = None
    dataset["images"][1]["coco_url"] = 7
    dataset["images"][2]["neg_category_ids"] = [math.inf]
    path = tmp_path / "lvis.json"
    path.write_text(json.dumps(dataset))
    summary = convert_lvis(str(path), str(tmp_path / "coco"), str(tmp_path / "out"))
    assert summary.images == 0 and summary.skipped == 3
    assert "coco_url" in reasons(record(str(tmp_path / "out")))


def test_malformed_detections_are_skipped_and_counted(tmp_path, coco):
    ann_path, images, _ = coco
    results = [
        {"image_id": 5, "category_id": 1, "bbox": [1, 1, 5, 5], "score": 0.9},
        None,
        {"image_id": 5, "category_id": 1, "bbox": "1 1 5 5", "score": 0.9},
        {"image_id": 5, "category_id": 1, "bbox": [1, 1, 5, 5], "score": "high"},
        {"image_id": 5, "category_id": 1, "bbox": [1, 1, 5, 5], "score": None},
        {"image_id": True, "category_id": 1, "bbox": [1, 1, 5, 5]},
        {"image_id": 5, "category_id": 123, "bbox": [1, 1, 5, 5]},
        {"image_id": 5, "category_id": 1, "segmentation": {"size": [48, 64], "counts": 5}},
        {"image_id": 5, "category_id": 1, "bbox": [1, 1, math.nan, 5]},
    ]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    out = str(tmp_path / "out")
    summary = convert_detections(str(path), ann_path, images, out)
    assert summary.images == 3 and summary.skipped_records == {"detections": 8}
    assert written(out)["000000000005"]["boxes"] == [[1.0, 1.0, 6.0, 6.0]]


def test_detections_file_of_the_wrong_type(tmp_path, coco):
    ann_path, images, _ = coco
    path = tmp_path / "results.json"
    path.write_text('"just text"')
    with pytest.raises(ConvertError, match="results.json"):
        convert_detections(str(path), ann_path, images, str(tmp_path / "out"))


def _sa1b_folder(tmp_path, metas: list[bytes]) -> str:
    folder = tmp_path / "sa1b"
    folder.mkdir()
    jpg = encode_image(np.zeros((8, 10, 3), np.uint8), "jpg")
    for i, meta in enumerate(metas):
        (folder / f"sa_{i}.jpg").write_bytes(jpg)
        (folder / f"sa_{i}.json").write_bytes(meta)
    return str(folder)


_GOOD_SA1B = {
    "image": {"image_id": 1, "width": 10, "height": 8, "file_name": "sa_1.jpg"},
    "annotations": [
        {
            "id": 1,
            "bbox": [1, 1, 3, 3],
            "segmentation": {"size": [8, 10], "counts": "0"},
            "area": 9,
            "predicted_iou": 0.9,
            "point_coords": [[2, 2]],
            "crop_box": [0, 0, 10, 8],
        }
    ],
}


def _sa1b_variant(change) -> bytes:
    meta = copy.deepcopy(_GOOD_SA1B)
    change(meta)
    return json.dumps(meta).encode()


SA1B_BAD_RECORDS = [
    b"[]",
    b"\xff\xfe not utf-8",
    b"{" * 5000,
    b'{"image": {"image_id": 1, "height": 1e400, "width": 10}, "annotations": []}',
    _sa1b_variant(lambda m: m.update(image=None)),
    _sa1b_variant(lambda m: m.update(annotations={"a": 1})),
    _sa1b_variant(lambda m: m["image"].update(width=-10)),
    _sa1b_variant(lambda m: m["image"].update(image_id=[1])),
]


def test_sa1b_bad_records_are_skipped_folder_and_tar(tmp_path):
    bad_annotations = _sa1b_variant(
        lambda m: m["annotations"].extend(
            [
                None,
                {"bbox": "x"},
                {"segmentation": {"size": [8], "counts": "0"}},
                {"predicted_iou": math.nan},
                {"point_coords": [[1]]},
            ]
        )
    )
    metas = [json.dumps(_GOOD_SA1B).encode(), bad_annotations, *SA1B_BAD_RECORDS]
    folder = _sa1b_folder(tmp_path, metas)
    summary = convert_sa1b(folder, str(tmp_path / "out"), workers=2)
    assert summary.images == 2 and summary.skipped == len(SA1B_BAD_RECORDS)
    assert summary.skipped_records == {"annotations": 5}
    (tmp_path / "tars").mkdir()
    members = []
    for name in sorted(os.listdir(folder)):
        members.append((name, open(os.path.join(folder, name), "rb").read()))
    (tmp_path / "tars" / "sa.tar").write_bytes(tar_bytes(members))
    summary = convert_sa1b(str(tmp_path / "tars"), str(tmp_path / "out_tar"))
    assert summary.images == 2 and summary.skipped == len(SA1B_BAD_RECORDS)
    assert summary.skipped_records == {"annotations": 5}
    assert len(written(str(tmp_path / "out_tar"))["sa_1"]["annotations"]) == 1


@pytest.mark.parametrize("content", [b"n01440764 tench\n\xff\xfe", b'{"n01": ', b"{" + b"[" * 100_000])
def test_unusable_synset_map_stops_with_one_line_naming_it(tmp_path, content):
    path = tmp_path / "synsets.txt"
    path.write_bytes(content)
    with pytest.raises(ConvertError, match="synsets.txt"):
        load_synset_map(str(path))


def test_odd_synset_map_json_is_read(tmp_path):
    path = tmp_path / "map.json"
    nested = "[" * 900 + '"deep"' + "]" * 900
    path.write_text('{"\\u00b2": ["n1", "two"], "' + "9" * 5000 + '": ["n2", "many"], "n3": ' + nested + "}")
    classes = load_synset_map(str(path))
    assert [c.synset for c in classes][:1] == ["\u00b2"] and len(classes) == 3


def test_sa1b_meta_needs_a_size_only_for_point_prompts():
    from ovsam_ray.convert.sa1b import sa1b_meta

    one = {
        "image": {"image_id": 1, "width": 1, "height": 1},
        "annotations": [{"id": 1, "bbox": [0, 0, 1, 1], "segmentation": [[0, 0, 1, 0, 1, 1, 0, 1]]}],
    }
    assert sa1b_meta(one, prompts="point")["points"]
    sizeless = {"image": {"image_id": 1}, "annotations": one["annotations"]}
    assert sa1b_meta(sizeless, prompts="box")["boxes"] == [[0.0, 0.0, 1.0, 1.0]]
    with pytest.raises(ConvertError, match="no image size"):
        sa1b_meta(sizeless, prompts="point", where="x.json")
