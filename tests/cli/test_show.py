"""``ovsam-ray show``: one overlay PNG per sampled image, read from its shard."""

from __future__ import annotations

import json
import os

import numpy as np
from coco_fixture import gt_label_output, make_coco
from PIL import Image

from ovsam_ray.cli import main
from ovsam_ray.convert import convert_coco
from ovsam_ray.data.decode import decode_image
from ovsam_ray.show import colour, render_overlay, sample_rows, show


def test_render_overlay_tints_only_the_mask():
    from coco_fixture import rle_str

    image = np.full((30, 40, 3), 100, np.uint8)
    mask = np.zeros((30, 40), bool)
    mask[15:25, 10:30] = True
    inst = {"rle": rle_str(mask), "bbox": [10, 15, 30, 25], "label": "cat", "label_score": 0.9, "point": [12, 20]}
    out = np.asarray(render_overlay(image, [inst]))
    assert out.shape == (30, 40, 3)
    expected = np.round(0.55 * 100 + 0.45 * np.asarray(colour(0))).astype(np.uint8)
    assert (np.abs(out[22, 25].astype(int) - expected) <= 1).all()  # inside the mask, away from box and text
    assert (out[27:30, 0:8] == 100).all()  # far from everything: untouched
    assert not (out[:15] == 100).all()  # the label box is drawn above the mask's box
    assert (np.asarray(render_overlay(image, [inst], min_score=0.95)) == image).all()


def test_show_writes_one_png_per_sampled_image(tmp_path, bystanders):
    ann_path, images, dataset, _ = make_coco(str(tmp_path / "coco"))
    shards = str(tmp_path / "shards")
    convert_coco(ann_path, images, shards, images_per_shard=2)
    labels = str(tmp_path / "labels")
    gt_label_output(dataset, labels, shard_of=lambda i: "shard-000000" if i <= 9 else "shard-000001")
    assert len(sample_rows(labels, 10)) == 3  # error rows are never sampled
    assert [r["key"] for r in sample_rows(labels, 2, seed=1)] == [r["key"] for r in sample_rows(labels, 2, seed=1)]

    out = str(tmp_path / "show")
    bystanders.around(out)
    written = show(labels, out, n=2, shards=shards)
    assert len(written) == 2 and all(os.path.exists(p) for p in written)
    for path in written:
        shard, key = os.path.relpath(path, out)[: -len(".png")].split("/")
        png = np.asarray(Image.open(path).convert("RGB"))
        source = decode_image(open(os.path.join(images, f"{key}.png"), "rb").read())
        assert png.shape == source.shape
        if key != "000000000012":  # images with instances are drawn on
            assert (png != source).any()

    # without --shards the run record's input is used; the CLI writes the same files
    (tmp_path / "labels" / "_run.json").write_text(json.dumps({"details": {"config": {"input": shards}}}))
    assert main(["show", "--input", labels, "--output", str(tmp_path / "show2"), "-n", "3"]) == 0
    found = sorted(
        os.path.relpath(os.path.join(d, f), tmp_path / "show2") for d, _, fs in os.walk(tmp_path / "show2") for f in fs
    )
    assert found == [
        "_ovsam_written.json",
        "shard-000000/000000000005.png",
        "shard-000000/000000000009.png",
        "shard-000001/000000000012.png",
    ]  # and the list of what show wrote


def test_drawing_scales_with_the_image_and_labels_do_not_pile_up():
    from ovsam_ray.show import drawing_scale, place_labels

    small, large = drawing_scale(640, 480), drawing_scale(4000, 3000)
    assert large[0] >= 5 * small[0] and large[1] >= 5 * small[1]
    # ten objects with the same box: ten label rectangles, pairwise disjoint, inside the image
    rects = place_labels([(100, 100, 300, 300)] * 10, [(80, 20)] * 10, 640, 480)
    assert len(rects) == 10
    for i, a in enumerate(rects):
        assert 0 <= a[0] and a[2] <= 640 and 0 <= a[1] and a[3] <= 480
        for b in rects[:i]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)


def test_render_overlay_text_is_readable_on_a_large_image():
    from coco_fixture import rle_str

    from ovsam_ray.show import drawing_scale

    image = np.zeros((3000, 4000, 3), np.uint8)
    mask = np.zeros((3000, 4000), bool)
    mask[1000:2000, 1000:3000] = True
    inst = {"rle": rle_str(mask), "bbox": [1000, 1000, 3000, 2000], "label": "cat", "label_score": 0.9}
    out = np.asarray(render_overlay(image, [inst]))
    label_rows = np.flatnonzero((out[:1000, 1000:1300] == colour(0)).all(axis=2).any(axis=1))
    assert len(label_rows) >= drawing_scale(4000, 3000)[0]  # the label box is as tall as the scaled font
    box_cols = (out[1500, 990:1040] == colour(0)).all(axis=1).sum()
    assert box_cols >= drawing_scale(4000, 3000)[1]  # the box outline is as wide as the scaled line


def test_show_contact_sheet(tmp_path):
    ann_path, images, dataset, _ = make_coco(str(tmp_path / "coco"))
    shards = str(tmp_path / "shards")
    convert_coco(ann_path, images, shards, images_per_shard=2)
    labels = str(tmp_path / "labels")
    gt_label_output(dataset, labels, shard_of=lambda i: "shard-000000" if i <= 9 else "shard-000001")
    out = tmp_path / "show"
    assert main(["show", "--input", labels, "--output", str(out), "-n", "3", "--shards", shards, "--sheet"]) == 0
    assert sorted(os.listdir(out)) == ["_ovsam_written.json", "contact_sheet.png", "shard-000000", "shard-000001"]
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.width == 2 * 384 and sheet.height > 2 * 384  # 2 x 2 cells with captions
