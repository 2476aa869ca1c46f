"""Mixed shards (ovsam_ray.convert.mixed): each shard a seeded random sample across classes, every
image exactly once, resumable after a crash, the side files right for the new shards; ``reshard``."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from ovsam_ray import storage
from ovsam_ray.convert import ConvertError, convert_coco, convert_imagenet, mixed, reshard
from ovsam_ray.data.shards import list_shards, read_shard
from ovsam_ray.data.synthetic import encode_image, tar_bytes

CLASSES = 12
PER_CLASS = 5


def _jpg(value: int) -> bytes:
    return encode_image(np.full((8, 8, 3), value, np.uint8), "jpg")


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("in")
    folders, tars = root / "train", root / "tars"
    tars.mkdir()
    for c in range(CLASSES):
        synset = f"n{c:08d}"
        (folders / synset).mkdir(parents=True)
        members = []
        for j in range(PER_CLASS):
            (folders / synset / f"{synset}_{j}.JPEG").write_bytes(_jpg(c * 10 + j))
            members.append((f"{synset}_{j}.JPEG", _jpg(c * 10 + j)))
        (tars / f"{synset}.tar").write_bytes(tar_bytes(members))
    return {"folders": str(folders), "tars": str(tars)}


def _read(output: str) -> dict[str, list[dict]]:
    """Shard name -> its samples (key, synset) in stored order."""
    out = {}
    for url in list_shards(output):
        rows = read_shard(url).samples
        out[url.rsplit("/", 1)[-1]] = [
            {"key": s["key"], "synset": json.loads(s["json_bytes"])["synset"], "image": s["image_bytes"]} for s in rows
        ]
    return out


def _keys(shards: dict[str, list[dict]]) -> list[str]:
    return sorted(s["key"] for rows in shards.values() for s in rows)


ALL_KEYS = sorted(f"n{c:08d}_{j}" for c in range(CLASSES) for j in range(PER_CLASS))


@pytest.mark.parametrize("layout", ["folders", "tars"])
def test_shards_mix_classes_and_hold_every_image_once(imagenet, tmp_path, layout):
    out = str(tmp_path / "mixed")
    summary = convert_imagenet(imagenet[layout], out, images_per_shard=10, task_images=20, seed=1)
    shards = _read(out)
    assert _keys(shards) == ALL_KEYS and summary.images == len(ALL_KEYS) and summary.skipped == 0
    distinct = [len({s["synset"] for s in rows}) for rows in shards.values()]
    assert min(distinct) >= 4, f"every shard mixes classes: {distinct}"
    if layout == "folders":  # counts known: exact shard sizes
        assert sorted(len(rows) for rows in shards.values()) == [10] * 6
    ordered = _read(
        convert_imagenet(imagenet[layout], str(tmp_path / "src"), images_per_shard=10, order="source")
        .shards[0]
        .rsplit("/", 1)[0]
    )
    assert max(len({s["synset"] for s in rows}) for rows in ordered.values()) <= 2, "source order: class by class"
    written = json.loads((tmp_path / "mixed" / "_convert.json").read_text())
    assert written["images"] == len(ALL_KEYS) and written["shards"] == len(shards)
    assert not (tmp_path / "mixed" / "_convert" / "staging").exists(), "staging files are removed at the end"


def test_order_is_seeded(imagenet, tmp_path):
    a = _read(
        convert_imagenet(imagenet["folders"], str(tmp_path / "a"), images_per_shard=10, seed=3)
        .shards[0]
        .rsplit("/", 1)[0]
    )
    b = _read(
        convert_imagenet(imagenet["folders"], str(tmp_path / "b"), images_per_shard=10, seed=3)
        .shards[0]
        .rsplit("/", 1)[0]
    )
    c = _read(
        convert_imagenet(imagenet["folders"], str(tmp_path / "c"), images_per_shard=10, seed=4)
        .shards[0]
        .rsplit("/", 1)[0]
    )
    assert a == b and a != c


@pytest.mark.parametrize("layout", ["folders", "tars"])
def test_a_crash_then_a_rerun_writes_every_image_exactly_once(imagenet, tmp_path, monkeypatch, layout):
    out = str(tmp_path / "out")
    real, calls = mixed._write_shard, []

    def crash_on_third(task):
        calls.append(task.index)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(task)

    monkeypatch.setattr(mixed, "_write_shard", crash_on_third)
    with pytest.raises(RuntimeError, match="killed"):
        convert_imagenet(imagenet[layout], out, images_per_shard=10, task_images=20)
    before = {u: storage.read_bytes(u) for u in list_shards(out)}
    assert len(before) == 2
    monkeypatch.setattr(mixed, "_write_shard", real)
    rerun: list[int] = []
    monkeypatch.setattr(mixed, "_write_shard", lambda task: rerun.append(task.index) or real(task))
    summary = convert_imagenet(imagenet[layout], out, images_per_shard=10, task_images=20)
    assert sorted(rerun) == sorted(set(range(len(summary.shards) if layout == "folders" else 6)) - set(calls[:2]))
    assert all(storage.read_bytes(u) == data for u, data in before.items()), "committed shards are kept"
    assert _keys(_read(out)) == ALL_KEYS and summary.images == len(ALL_KEYS)
    fresh = convert_imagenet(imagenet[layout], str(tmp_path / "fresh"), images_per_shard=10, task_images=20)
    assert _read(out) == _read(fresh.shards[0].rsplit("/", 1)[0]), "a resumed run writes what one run writes"


def test_a_rerun_with_other_settings_is_refused(imagenet, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    monkeypatch.setattr(mixed, "_write_shard", lambda task: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError):
        convert_imagenet(imagenet["folders"], out, images_per_shard=10)
    monkeypatch.undo()
    with pytest.raises(ConvertError, match="unfinished conversion"):
        convert_imagenet(imagenet["folders"], out, images_per_shard=10, seed=9)


def test_a_key_in_two_tars_is_written_once_and_counted(tmp_path):
    src = tmp_path / "tars"
    src.mkdir()
    # classes "a.b" and "a_b" give one key to x_1 (a dot is no key character)
    (src / "a.b.tar").write_bytes(tar_bytes([("x_1.jpg", _jpg(1)), ("x_2.jpg", _jpg(2))]))
    (src / "a_b.tar").write_bytes(tar_bytes([("x_1.jpg", _jpg(3)), ("x_3.jpg", _jpg(4))]))
    summary = convert_imagenet(str(src), str(tmp_path / "out"), images_per_shard=2)
    assert summary.images == 3 and summary.skipped == 1
    assert "also an earlier image" in summary.skipped_examples[0]["reason"]


def test_coco_side_files_follow_the_mixed_shards(tmp_path):
    from coco_fixture import make_coco

    ann_path, images, dataset, _ = make_coco(str(tmp_path / "coco"))
    out = str(tmp_path / "out")
    summary = convert_coco(ann_path, images, out, images_per_shard=2)
    where = {s["key"]: url.rsplit("/", 1)[-1] for url in list_shards(out) for s in read_shard(url).samples}
    table = pq.read_table(str(tmp_path / "out" / "_image_classes.parquet")).to_pylist()
    assert {r["key"]: r["shard"] for r in table} == where and summary.images == len(where)
    assert (tmp_path / "out" / "_categories.json").exists()


def test_reshard_mixes_class_sorted_shards(imagenet, tmp_path):
    old = str(tmp_path / "old")
    convert_imagenet(imagenet["folders"], old, images_per_shard=10, order="source")
    before = _read(old)
    out = str(tmp_path / "new")
    summary = reshard(old, out, images_per_shard=10, task_images=20)
    after = _read(out)
    assert _keys(after) == ALL_KEYS and summary.images == len(ALL_KEYS)
    as_before = {s["key"]: s for rows in before.values() for s in rows}
    assert all(s == as_before[s["key"]] for rows in after.values() for s in rows), "copied byte for byte"
    assert min(len({s["synset"] for s in rows}) for rows in after.values()) >= 3
    assert (tmp_path / "new" / "_categories.json").read_bytes() == (tmp_path / "old" / "_categories.json").read_bytes()
    assert json.loads((tmp_path / "new" / "_convert.json").read_text())["images"] == len(ALL_KEYS)


def test_reshard_cli(imagenet, tmp_path):
    from cli_helpers import run_cli

    old = str(tmp_path / "old")
    convert_imagenet(imagenet["folders"], old, images_per_shard=10, order="source")
    out = str(tmp_path / "new")
    code = run_cli("reshard", "--shuffle", "--input", old, "--output", out, "--images-per-shard", "20")
    assert code == 0 and _keys(_read(out)) == ALL_KEYS


@pytest.mark.slow
def test_ray_data_writes_the_same_shards(imagenet, tmp_path, ray_local):
    local = convert_imagenet(imagenet["tars"], str(tmp_path / "local"), images_per_shard=10, task_images=20)
    on_ray = convert_imagenet(
        imagenet["tars"], str(tmp_path / "ray"), images_per_shard=10, task_images=20, ray_address="auto"
    )
    assert _read(local.shards[0].rsplit("/", 1)[0]) == _read(on_ray.shards[0].rsplit("/", 1)[0])
