"""Every exporter and ``show`` on a label output that ``label`` produced from a shard with odd
member names (prefix keys, 300-byte keys, deep keys, non-UTF-8 bytes, ``..``, absolute names,
backslashes, control characters, empty components, links, two images for one key): no
exception, every labelled image exported once, inside the output folder, under the file name
the exported record gives, with the original key in the record."""

from __future__ import annotations

import io as _io
import json
import os
import tarfile
import urllib.parse

import numpy as np
import pyarrow.dataset as pds
import pytest

from ovsam_ray.data.shards import iter_shard_samples
from ovsam_ray.data.synthetic import encode_image
from ovsam_ray.export import export_coco, export_labelstudio, export_sa1b, export_wds, export_yolo
from ovsam_ray.inference import ModelConfig
from ovsam_ray.pipeline.label_job import LabelConfig, run_label
from ovsam_ray.show import show
from ovsam_ray.written import MANIFEST_NAME

_BYTES_KEY = b"caf\xe9-latin1"  # not UTF-8: tarfile hands it over surrogate-escaped
KEYS = [
    "d",
    "d.jpg/x",
    "d/x",
    "p%2Fq",
    "p/q",
    "k" * 300,
    "/".join(["deep" * 25] * 12),
    "../../escaped",
    "/abs/x",
    "back\\slash",
    "ctl\x01\x1bx",
    "e//f",
    ".hid",
    "tilde~%~x",
    _BYTES_KEY.decode("utf-8", "surrogateescape"),
]


def _add(
    tf: tarfile.TarFile, name: str, data: bytes | None = None, *, link: str | None = None, kind: bytes = tarfile.SYMTYPE
) -> None:
    info = tarfile.TarInfo(name)
    if link is not None:
        info.type, info.linkname = kind, link
    else:
        info.size = len(data or b"")
    tf.addfile(info, _io.BytesIO(data or b""))


def _odd_shard(path: str) -> None:
    rng = np.random.default_rng(0)
    prompts = json.dumps({"boxes": [[4, 4, 30, 20]], "labels": ["square"]}).encode()
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tf:
        for i, key in enumerate(KEYS):
            ext = "png" if i % 2 else "jpg"
            _add(tf, f"{key}.{ext}", encode_image(rng.integers(0, 255, (24 + i, 40, 3), dtype=np.uint8), ext))
            _add(tf, f"{key}.json", prompts)
        png = encode_image(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8), "png")
        _add(tf, "target.png", png)
        _add(tf, "sym.png", link="target.png")  # a link: labelled as a png
        _add(tf, "hard.png", link="target.png", kind=tarfile.LNKTYPE)
        _add(tf, "dup.png", png)  # the first image of a key is the one labelled...
        _add(tf, "dup.jpg", encode_image(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8), "jpg"))  # ...not this


@pytest.fixture(scope="module")
def odd_labels(ray_local, shapes_vocab, tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    os.makedirs(root / "shards")
    shard = str(root / "shards" / "shard-000000.tar")
    _odd_shard(shard)
    labels = str(root / "labels")
    run_label(
        LabelConfig(
            input=str(root / "shards"),
            output=labels,
            baseline="box-fill",
            batch_size=8,
            model=ModelConfig(preset="ovsam_tiny", random_init=True, vocab=shapes_vocab),
        )
    )
    rows = pds.dataset(labels, format="parquet").to_table(columns=["shard", "key", "status"]).to_pylist()
    ok = {(r["shard"], r["key"]) for r in rows if r["status"] == "ok"}
    images = {(s["shard"], s["key"]): (s["image_bytes"], s["image_ext"]) for s in iter_shard_samples(shard)}
    return {"root": root, "labels": labels, "shards": shard, "ok": ok, "images": images}


def _new_files(root) -> list[str]:
    """The data files below ``root``: the list of what a command wrote is left out."""
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f != MANIFEST_NAME)


def _inside(out: str, files: list[str]) -> None:
    real = os.path.realpath(out)
    assert all(os.path.realpath(f).startswith(real + os.sep) for f in files)


def test_the_label_job_labels_every_odd_key(odd_labels):
    keys = {k for _, k in odd_labels["ok"]}
    assert len(keys) == len(KEYS) + 4  # + target, sym, hard, dup
    assert {"d", "d.jpg/x", "k" * 300, "../../escaped", "caf\\xe9-latin1", "sym", "dup"} <= keys


def test_coco_exports_every_image_once_under_its_file_name(odd_labels, tmp_path):
    out = str(tmp_path / "coco" / "labels.json")
    stats = export_coco(odd_labels["labels"], out, shards=odd_labels["shards"], with_images=True)
    images = json.load(open(out))["images"]
    assert stats["images"] == stats["images_written"] == len(odd_labels["ok"]) and stats["images_missing"] == 0
    assert {(im["shard"], im["key"]) for im in images} == odd_labels["ok"]
    assert len({im["file_name"] for im in images}) == len(images)
    for im in images:
        data, ext = odd_labels["images"][(im["shard"], im["key"])]
        path = os.path.join(tmp_path, "coco", "images", im["file_name"])
        assert im["file_name"].endswith(f".{ext}") and open(path, "rb").read() == data
    assert len(_new_files(tmp_path / "coco" / "images")) == len(images)
    _inside(str(tmp_path / "coco"), _new_files(tmp_path))


def test_yolo_labels_and_images_pair_up(odd_labels, tmp_path):
    out = tmp_path / "yolo"
    stats = export_yolo(odd_labels["labels"], str(out), shards=odd_labels["shards"], with_images=True)
    n = len(odd_labels["ok"])
    assert stats["images"] == stats["images_written"] == n and stats["images_missing"] == 0
    index = [json.loads(line) for line in open(out / "keys.jsonl")]
    assert {(r["shard"], r["key"]) for r in index} == odd_labels["ok"]
    images = _new_files(out / "images")
    assert len(images) == n and len(_new_files(out / "labels")) == n
    for r in index:
        assert os.path.isfile(out / r["labels"])
        stem = str(out / r["labels"])[: -len(".txt")].replace(f"{os.sep}labels{os.sep}", f"{os.sep}images{os.sep}", 1)
        ext = odd_labels["images"][(r["shard"], r["key"])][1]
        assert os.path.isfile(f"{stem}.{ext}")  # Ultralytics' images/ <-> labels/ rule finds the pair
    _inside(str(out), _new_files(tmp_path))


def test_labelstudio_urls_name_the_copied_images(odd_labels, tmp_path):
    out = str(tmp_path / "tasks.json")
    stats = export_labelstudio(odd_labels["labels"], out, shards=odd_labels["shards"], with_images=True)
    tasks = json.load(open(out))
    assert stats["tasks"] == len(tasks) == len(odd_labels["ok"]) == stats["images_written"]
    assert {(t["data"]["shard"], t["data"]["key"]) for t in tasks} == odd_labels["ok"]
    for t in tasks:  # the default URL: Label Studio's local-files URL (quoted) of the file --with-images wrote
        path = urllib.parse.unquote(t["data"]["image"].removeprefix("/data/local-files/?d="))
        assert os.path.isfile(os.path.join(tmp_path, path))
    plain = str(tmp_path / "t2.json")
    export_labelstudio(odd_labels["labels"], plain, shards=odd_labels["shards"], image_url="images/{file_name}")
    tasks = json.load(open(plain))
    coco = tmp_path / "coco"
    export_coco(odd_labels["labels"], str(coco / "coco.json"), shards=odd_labels["shards"], with_images=True)
    for t in tasks:  # {file_name}: the image's file below images/ of a COCO export with images
        assert os.path.isfile(os.path.join(coco, t["data"]["image"]))


def test_sa1b_one_record_per_image(odd_labels, tmp_path):
    out = tmp_path / "sa1b"
    stats = export_sa1b(odd_labels["labels"], str(out), shards=odd_labels["shards"])
    files = _new_files(out)
    assert stats["images"] == len(files) == len(odd_labels["ok"])
    records = [json.load(open(f))["image"] for f in files]
    assert {(r["shard"], r["key"]) for r in records} == odd_labels["ok"]
    for f, r in zip(files, records):
        ext = odd_labels["images"][(r["shard"], r["key"])][1]
        assert r["file_name"].endswith(f".{ext}") and f.endswith(r["file_name"][: -len(ext)] + "json")
    _inside(str(out), files)


def test_wds_holds_every_image_once(odd_labels, tmp_path):
    out = tmp_path / "wds"
    stats = export_wds(odd_labels["labels"], str(out), shards=odd_labels["shards"])
    n = len(odd_labels["ok"])
    assert stats["samples"] == n and stats["missing_images"] == 0
    with tarfile.open(out / "shard-000000.tar") as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf}
    assert len(members) == 2 * n
    labels = [json.loads(v) for k, v in members.items() if k.endswith(".json")]
    assert {(r["shard"], r["key"]) for r in labels} == odd_labels["ok"]
    for name, data in members.items():
        if not name.endswith(".json"):
            record = json.loads(members[name.rsplit(".", 1)[0] + ".json"])
            original = odd_labels["images"][(record["shard"], record["key"])][0]
            if data != original:  # the shard mixes formats: re-encoded as PNG, the same pixels
                assert name.endswith(".png") and stats["transcoded"] > 0
                assert (_pixels(data) == _pixels(original)).all()


def _pixels(data: bytes) -> np.ndarray:
    import PIL.Image

    return np.asarray(PIL.Image.open(_io.BytesIO(data)).convert("RGB"))


def test_show_draws_every_sampled_image(odd_labels, tmp_path):
    out = tmp_path / "show"
    n = len(odd_labels["ok"])
    written = show(odd_labels["labels"], str(out), n=n, shards=odd_labels["shards"], sheet=True)
    assert len(written) == n + 1 and len(set(written)) == n + 1
    assert all(os.path.isfile(p) for p in written) and len(_new_files(out)) == n + 1
    _inside(str(out), _new_files(tmp_path))
