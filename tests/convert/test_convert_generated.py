"""Property-based: converters over generated malformed JSON either account for every image record
(written + skipped = total) or raise ConvertError; never any other exception, never non-standard JSON out."""

from __future__ import annotations

import json
import math
import os
import tempfile

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ovsam_ray.convert import ConvertError, convert_coco, convert_detections, convert_lvis, convert_sa1b
from ovsam_ray.data.shards import read_shard
from ovsam_ray.data.synthetic import tar_bytes

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 12),
    st.integers(2**63 - 2, 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from(["1", "5", "", "..", "\ud800", "a.png"]),
)
ANY = st.recursive(
    SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3), max_leaves=6
)
ID = st.one_of(st.integers(0, 5), st.sampled_from(["1", "2", "a.b", "a_b", "000000000003"]), ANY)
NUMBER = st.one_of(
    st.floats(-5, 60), st.integers(-2, 60), st.sampled_from([math.inf, -math.inf, math.nan, 10**400, 1e9, -1e300])
)
SIDE = st.one_of(st.integers(-1, 40), st.integers(1, 40), ANY)
FILE_NAME = st.one_of(
    st.sampled_from(
        [
            "a.png",
            "b.png",
            "sub/c.png",
            "A.PNG",
            "missing.png",
            "../a.png",
            "/etc/a.png",
            "link/x.png",
            "a",
            "a.txt",
            "sub\\c.png",
        ]
    ),
    ANY,
)
SEGMENTATION = st.one_of(
    st.lists(st.lists(NUMBER, max_size=8), max_size=2),
    st.fixed_dictionaries(
        {
            "size": st.lists(SIDE, max_size=3),
            "counts": st.one_of(st.text(max_size=6), st.lists(st.integers(-1, 50)), ANY),
        }
    ),
    ANY,
)


def _or_any(strategy):
    """Mostly well-formed, sometimes anything at all."""
    return st.one_of(strategy, strategy, ANY)


IMAGE = st.fixed_dictionaries(
    {"id": ID, "file_name": FILE_NAME},
    optional={"width": SIDE, "height": SIDE, "coco_url": _or_any(st.just("x/val/b.png")), "neg_category_ids": ANY},
)
ANNOTATION = st.fixed_dictionaries(
    {"image_id": ID, "category_id": ID, "bbox": _or_any(st.lists(NUMBER, min_size=4, max_size=4))},
    optional={
        "id": ID,
        "segmentation": SEGMENTATION,
        "area": _or_any(NUMBER),
        "iscrowd": _or_any(st.sampled_from([0, 1])),
    },
)
CATEGORY = st.fixed_dictionaries({"id": ID, "name": _or_any(st.sampled_from(["a", "b"]))}, optional={"x": ANY})
DATASET = st.fixed_dictionaries(
    {"images": st.lists(_or_any(IMAGE), max_size=6)},
    optional={
        "annotations": _or_any(st.lists(_or_any(ANNOTATION), max_size=8)),
        "categories": _or_any(st.lists(_or_any(CATEGORY), max_size=4)),
    },
)
DETECTION = st.fixed_dictionaries(
    {"image_id": ID, "category_id": ID},
    optional={
        "bbox": _or_any(st.lists(NUMBER, min_size=4, max_size=4)),
        "score": _or_any(NUMBER),
        "segmentation": SEGMENTATION,
    },
)


def _strict(data: bytes):
    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(data, parse_constant=refuse)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    (root / "val").mkdir()
    for name in ("a.png", "b.png", "sub/c.png", "A.PNG", "val/b.png"):
        (root / name).write_bytes(b"\x89PNG image " + name.encode())
    outside = tmp_path_factory.mktemp("outside")
    (outside / "x.png").write_bytes(b"not yours")
    os.symlink(outside, root / "link")
    return str(root)


def _check_output(output: str, total: int, summary) -> None:
    assert summary.images + summary.skipped == total, summary.to_dict()
    event("images written" if summary.images else "no image written")  # --hypothesis-show-statistics
    for name in sorted(os.listdir(output)):
        if not name.endswith(".tar"):
            continue
        for s in read_shard(os.path.join(output, name)).samples:
            assert s["image_bytes"] != b"not yours"
            _strict(s["json_bytes"])
    for name in ("_convert.json", "_categories.json"):
        if os.path.exists(os.path.join(output, name)):
            _strict(open(os.path.join(output, name), "rb").read())


def _run(convert, content: bytes, total: int | None, **kw) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "in.json")
        with open(path, "wb") as f:
            f.write(content)
        output = os.path.join(tmp, "out")
        try:
            summary = convert(path, output=output, **kw)
        except ConvertError as e:
            event("refused")
            assert ("in.json" in str(e) or "dataset.json" in str(e)) and "\n" not in str(e)
            return
        assert total is not None, "a file that is not a COCO object was accepted"
        _check_output(output, total, summary)


def _total(dataset) -> int | None:
    ok = (
        isinstance(dataset, dict)
        and isinstance(dataset.get("images"), list)
        and all(dataset.get(k) is None or isinstance(dataset[k], list) for k in ("annotations", "categories"))
    )
    return len(dataset["images"]) if ok else None


@SETTINGS
@given(dataset=st.one_of(DATASET, DATASET, DATASET, ANY), prompts=st.sampled_from(["box", "point", "both", "none"]))
def test_coco_accounts_for_every_image_or_refuses(images, dataset, prompts):
    _run(
        lambda path, **kw: convert_coco(path, images, **kw),
        json.dumps(dataset).encode(),
        _total(dataset),
        prompts=prompts,
        workers=1,
    )


@SETTINGS
@given(dataset=DATASET, prompts=st.sampled_from(["box", "point"]))
def test_lvis_accounts_for_every_image_or_refuses(images, dataset, prompts):
    for image in dataset["images"]:
        if isinstance(image, dict) and image.get("file_name") in ("a", "a.png"):
            del image["file_name"]  # then coco_url names the file
            image.setdefault("coco_url", "http://images.cocodataset.org/val/b.png")
    _run(
        lambda path, **kw: convert_lvis(path, images, **kw),
        json.dumps(dataset).encode(),
        _total(dataset),
        prompts=prompts,
        workers=1,
    )


@SETTINGS
@given(dataset=DATASET, results=st.one_of(st.lists(_or_any(DETECTION), max_size=8), ANY))
def test_detections_account_for_every_image_or_refuse(images, dataset, results):
    with tempfile.TemporaryDirectory() as tmp:
        annotations = os.path.join(tmp, "dataset.json")
        with open(annotations, "w") as f:
            json.dump(dataset, f)
        total = (
            _total(dataset)
            if isinstance(results, list) or (isinstance(results, dict) and isinstance(results.get("annotations"), list))
            else None
        )
        _run(
            lambda path, **kw: convert_detections(path, annotations, images, **kw),
            json.dumps(results).encode(),
            total,
            workers=1,
        )


SA1B_RECORD = st.fixed_dictionaries(
    {
        "image": _or_any(
            st.fixed_dictionaries({}, optional={"image_id": ID, "width": SIDE, "height": SIDE, "file_name": FILE_NAME})
        ),
        "annotations": _or_any(
            st.lists(
                _or_any(
                    st.fixed_dictionaries(
                        {},
                        optional={
                            "id": ID,
                            "segmentation": SEGMENTATION,
                            "bbox": _or_any(st.lists(NUMBER, min_size=4, max_size=4)),
                            "area": NUMBER,
                            "predicted_iou": NUMBER,
                            "point_coords": ANY,
                            "crop_box": ANY,
                        },
                    )
                ),
                max_size=4,
            )
        ),
    }
)


@SETTINGS
@given(
    records=st.lists(st.one_of(SA1B_RECORD, SA1B_RECORD, ANY, st.binary(max_size=20)), min_size=1, max_size=4),
    prompts=st.sampled_from(["box", "point"]),
)
def test_sa1b_accounts_for_every_image(records, prompts):
    members = []
    for i, rec in enumerate(records):
        members.append((f"sa_{i}.jpg", b"jpeg bytes"))
        members.append((f"sa_{i}.json", rec if isinstance(rec, bytes) else json.dumps(rec).encode()))
    with tempfile.TemporaryDirectory() as tmp:
        os.mkdir(os.path.join(tmp, "folder"))
        for name, data in members:
            with open(os.path.join(tmp, "folder", name), "wb") as f:
                f.write(data)
        os.mkdir(os.path.join(tmp, "tars"))
        with open(os.path.join(tmp, "tars", "sa.tar"), "wb") as f:
            f.write(tar_bytes(members))
        for source in ("folder", "tars"):
            output = os.path.join(tmp, f"out_{source}")
            summary = convert_sa1b(os.path.join(tmp, source), output, prompts=prompts, workers=2)
            _check_output(output, len(records), summary)
