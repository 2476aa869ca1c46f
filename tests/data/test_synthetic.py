"""Synthetic shards: deterministic, annotations consistent with the pixels; bad-input shards."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from bad_inputs import BAD_INPUT_MAX_PIXELS, make_bad_input_shards

from ovsam_ray import storage
from ovsam_ray.data.decode import decode_image, decode_sample
from ovsam_ray.data.rle import boxes_from_binary_masks, decode_rle
from ovsam_ray.data.shards import list_shards, read_shard
from ovsam_ray.data.synthetic import SHAPE_CLASSES, generate_shards, render_image, shape_vocabulary_names


def _digest(urls, s3_endpoint=None):
    return [hashlib.sha256(storage.read_bytes(u, s3_endpoint=s3_endpoint)).hexdigest() for u in urls]


def test_vocabulary():
    names = shape_vocabulary_names()
    assert names == list(SHAPE_CLASSES) and len(set(names)) >= 5
    assert {"circle", "square", "triangle", "star", "hexagon", "ellipse"} <= set(names)


def test_layout_and_determinism(tmp_path):
    kw = dict(num_images=7, images_per_shard=3, image_size=(64, 48))
    a = generate_shards(str(tmp_path / "a"), seed=3, **kw)
    b = generate_shards(str(tmp_path / "b"), seed=3, **kw)
    c = generate_shards(str(tmp_path / "c"), seed=4, **kw)
    assert [u.rsplit("/", 1)[-1] for u in a] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert _digest(a) == _digest(b) != _digest(c)
    samples = [s for u in a for s in read_shard(u).samples]
    assert [s["key"] for s in samples] == [f"{i:09d}" for i in range(7)]
    assert all(s["image_ext"] == "jpg" and s["json_bytes"] for s in samples)
    # an image depends on (seed, index) only, not on how images are grouped into shards
    regrouped = generate_shards(str(tmp_path / "d"), seed=3, num_images=7, images_per_shard=7, image_size=(64, 48))
    assert read_shard(regrouped[0]).samples[4]["image_bytes"] == samples[4]["image_bytes"]


def test_annotations_match_the_visible_masks(tmp_shards):
    seen = set()
    for sample in (s for u in tmp_shards for s in read_shard(u).samples):
        meta = json.loads(sample["json_bytes"])
        image = decode_image(sample["image_bytes"])
        assert image.shape == (48, 64, 3)
        assert meta["image_id"] == int(sample["key"])
        assert 1 <= len(meta["boxes"]) == len(meta["labels"]) == len(meta["annotations"]) <= 4
        masks = []
        for box, label, ann in zip(meta["boxes"], meta["labels"], meta["annotations"]):
            mask = decode_rle(ann["segmentation"])
            assert mask.shape == (48, 64) and mask.sum() == ann["area"] > 0
            x0, y0, x1, y1 = boxes_from_binary_masks(mask[None])[0].tolist()
            assert box == [x0, y0, x1, y1] and ann["bbox"] == [x0, y0, x1 - x0, y1 - y0]
            assert ann["category_name"] == label == SHAPE_CLASSES[ann["category_id"]] and ann["iscrowd"] == 0
            masks.append(mask)
            seen.add(label)
        # visible masks never overlap (occlusion is resolved)
        assert np.stack(masks).sum(axis=0).max() == 1
    assert len(seen) >= 3


def test_occlusion_and_colours():
    rng = np.random.default_rng(5)
    for _ in range(10):
        image, kinds, masks = render_image(rng, 96, 72, min_objects=3, max_objects=4)
        assert image.shape == (72, 96, 3) and image.dtype == np.uint8
        assert 3 <= len(kinds) <= 4 and masks.shape == (len(kinds), 72, 96)
        assert (masks.sum(axis=0) <= 1).all() and (masks.sum(axis=(1, 2)) >= 40).all()
        for m in masks:  # each shape is drawn in a colour that differs from the background
            inside, outside = image[m].mean(0), image[~masks.any(0)].mean(0)
            assert np.abs(inside - outside).sum() > 60


def test_size_range_and_png(tmp_path):
    urls = generate_shards(
        str(tmp_path),
        num_images=4,
        images_per_shard=4,
        seed=0,
        image_size=((40, 30), (80, 60)),
        image_format="png",
        min_objects=0,
        max_objects=1,
    )
    shapes = {decode_image(s["image_bytes"]).shape for s in read_shard(urls[0]).samples}
    assert all(40 <= w <= 80 and 30 <= h <= 60 for h, w, _ in shapes) and len(shapes) > 1
    with pytest.raises(ValueError):
        generate_shards(str(tmp_path), num_images=1, images_per_shard=0, seed=0)


def test_generate_on_s3(s3_server, s3_bucket):
    root = f"s3://{s3_bucket}/synthetic"
    urls = generate_shards(root, num_images=3, images_per_shard=2, seed=0, image_size=(32, 24), s3_endpoint=s3_server)
    assert list_shards(root, s3_endpoint=s3_server) == urls
    assert read_shard(urls[1], s3_endpoint=s3_server).num_samples == 1


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory):
    return make_bad_input_shards(str(tmp_path_factory.mktemp("bad")))


EXPECTED_KINDS = {
    "zero_byte_image",
    "undecodable_image",
    "truncated_jpeg",
    "odd_modes",
    "exif_rotated",
    "one_pixel",
    "too_large",
    "malformed_json",
    "bad_boxes",
    "missing_image",
    "truncated_tar",
    "empty_tar",
}


def test_every_bad_input_kind_is_there(bad_shards):
    assert set(bad_shards) == EXPECTED_KINDS


@pytest.mark.parametrize("kind", sorted(EXPECTED_KINDS))
def test_bad_input_gives_error_rows_never_exceptions(bad_shards, kind):
    shard = bad_shards[kind]
    result = read_shard(shard.url)
    assert (result.damage is not None) == shard.damaged
    decoded = [decode_sample(s, max_pixels=BAD_INPUT_MAX_PIXELS) for s in result.samples]
    assert len(decoded) == shard.expected_rows
    assert ["ok" if d.ok else "error" for d in decoded] == shard.expected_statuses
    assert all(d.error for d in decoded if not d.ok)
    if "shape" in shard.expected:
        assert {d.image.shape for d in decoded} == {tuple(shard.expected["shape"])}
    if kind == "bad_boxes":
        prompts = decoded[0].prompts
        assert prompts.num_boxes == shard.expected["num_boxes"]
        assert len(prompts.warnings) == shard.expected["num_warnings"]
        np.testing.assert_array_equal(prompts.boxes, shard.expected["boxes"])
