"""Listing and reading WebDataset shards, local and on S3; damaged tars never raise."""

from __future__ import annotations

import os

import pytest

from ovsam_ray import storage
from ovsam_ray.data.shards import (
    ShardSpecError,
    is_damage_marker,
    iter_shard_samples,
    list_shards,
    read_shard,
    shard_name,
    split_member_name,
)
from ovsam_ray.data.synthetic import generate_shards, tar_bytes


def _write(path, members):
    storage.atomic_write_bytes(str(path), tar_bytes(members))
    return str(path)


@pytest.fixture
def shard_dir(tmp_path):
    for i in range(4):
        _write(tmp_path / f"shards-{i:06d}.tar", [(f"k{i}.jpg", b"x")])
    _write(tmp_path / "nested" / "other.tar", [("z.jpg", b"x")])
    (tmp_path / "notes.txt").write_text("not a shard")
    return tmp_path


def test_list_shards_local_forms(shard_dir):
    d = str(shard_dir)
    all_tars = sorted([f"{d}/shards-{i:06d}.tar" for i in range(4)] + [f"{d}/nested/other.tar"])
    assert list_shards(d) == all_tars
    assert list_shards(d + "/") == all_tars
    assert list_shards(f"{d}/shards-*.tar") == all_tars[1:]
    assert list_shards(f"{d}/shards-{{000001..000002}}.tar") == all_tars[2:4]
    # several specs, overlapping: sorted and de-duplicated
    assert list_shards([f"{d}/shards-000003.tar", f"{d}/shards-{{000000..000003}}.tar"]) == all_tars[1:]


def test_list_shards_relative_paths_become_absolute(shard_dir, monkeypatch):
    monkeypatch.chdir(shard_dir)
    assert list_shards("shards-000000.tar") == [os.path.join(str(shard_dir), "shards-000000.tar")]


def test_list_shards_errors_name_what_is_missing(shard_dir):
    d = str(shard_dir)
    with pytest.raises(ShardSpecError, match="nothing-"):
        list_shards(f"{d}/nothing-*.tar")
    with pytest.raises(ShardSpecError, match=r"shards-000004.tar.*\(and 1 more\)"):
        list_shards(f"{d}/shards-{{000002..000009}}.tar")
    with pytest.raises(ShardSpecError):
        list_shards(f"{d}/empty-dir-that-does-not-exist/")
    with pytest.raises(ShardSpecError):
        list_shards([])


def test_list_shards_s3(s3_server, s3_bucket):
    root = f"s3://{s3_bucket}/data"
    urls = generate_shards(root, num_images=3, images_per_shard=1, seed=0, image_size=(32, 24), s3_endpoint=s3_server)
    assert urls == [f"{root}/shard-{i:06d}.tar" for i in range(3)]
    storage.atomic_write_bytes(f"{root}/readme.txt", b"x", s3_endpoint=s3_server)
    assert list_shards(root + "/", s3_endpoint=s3_server) == urls
    assert list_shards(root, s3_endpoint=s3_server) == urls
    assert list_shards(f"{root}/shard-*.tar", s3_endpoint=s3_server) == urls
    assert list_shards(f"{root}/shard-{{000001..000002}}.tar", s3_endpoint=s3_server) == urls[1:]
    with pytest.raises(ShardSpecError):
        list_shards(f"s3://{s3_bucket}/nope/", s3_endpoint=s3_server)


def test_shard_name():
    assert shard_name("s3://b/x/shard-000003.tar") == "shard-000003"
    assert shard_name("/data/a.b.tar") == "a.b"
    assert shard_name("/data/c.tgz") == "c"


@pytest.mark.parametrize(
    "name, expected",
    [
        ("a.jpg", ("a", "jpg")),
        ("./a.JPG", ("a", "jpg")),
        ("dir/sub/b.c.json", ("dir/sub/b", "c.json")),
        ("dir.x/b.png", ("dir.x/b", "png")),
        ("noext", None),
        (".hidden", None),
        ("a/.b.JPG", ("a/.b", "jpg")),
        ("..jpg", None),
        ("dir/", None),
    ],
)
def test_split_member_name(name, expected):
    assert split_member_name(name) == expected


def test_samples_grouped_by_key(tmp_path):
    url = _write(
        tmp_path / "s.tar",
        [
            ("__meta__.json", b"{}"),
            ("a.jpg", b"A"),
            ("a.json", b"{}"),
            ("a.txt", b"caption"),
            ("dir/b.seg.png", b"ignored"),
            ("dir/b.PNG", b"B"),
            ("c.json", b"{}"),
            ("d.webp", b"D"),
        ],
    )
    samples = list(iter_shard_samples(url))
    assert [s["key"] for s in samples] == ["a", "dir/b", "c", "d"]
    a, b, c, d = samples
    assert a == {"key": "a", "shard": "s", "image_bytes": b"A", "image_ext": "jpg", "json_bytes": b"{}", "error": None}
    assert (b["image_bytes"], b["image_ext"], b["json_bytes"]) == (b"B", "png", None)
    assert c["image_bytes"] is None and "no image member" in c["error"] and c["json_bytes"] == b"{}"
    assert d["image_ext"] == "webp" and d["error"] is None
    assert not any(is_damage_marker(s) for s in samples)


def test_duplicate_member_is_its_own_error_sample(tmp_path):
    url = _write(tmp_path / "dup.tar", [("a.jpg", b"1"), ("a.jpg", b"2")])
    first, dup = list(iter_shard_samples(url))
    assert (first["key"], first["image_bytes"], first["error"]) == ("a", b"1", None)
    assert dup["key"] == "a.jpg" and "duplicate member a.jpg" in dup["error"]


def test_truncated_tar_yields_prefix_then_marker(tmp_path):
    # 3 keys x (jpg, json), each member = 512 header + 1024 data bytes
    full = tar_bytes([(f"k{i}.{ext}", b"x" * 700) for i in range(3) for ext in ("jpg", "json")])
    cases = [
        (1536 * 4 + 700, ["k0", "k1", "k2"], [None, None, "damaged"]),  # inside k2.jpg's data
        (1536 * 3, ["k0", "k1"], [None, "damaged"]),  # at a header: k1's json may be lost
        (1536 * 2 + 100, ["k0"], ["damaged"]),  # inside the next header: it may have been k0's
        (100, [], []),  # inside the first header
    ]
    for cut, keys, errors in cases:
        path = tmp_path / f"cut{cut}.tar"
        path.write_bytes(full[:cut])
        samples = list(iter_shard_samples(str(path)))
        marker, rows = samples[-1], samples[:-1]
        assert is_damage_marker(marker) and marker["error"].startswith(f"damaged shard cut{cut}:")
        assert not any(is_damage_marker(s) for s in rows)
        assert [s["key"] for s in rows] == keys
        assert [s["error"] and "damaged" for s in rows] == errors


def test_cut_at_member_boundary_is_detected(tmp_path):
    full = tar_bytes([("a.jpg", b"x" * 512), ("b.jpg", b"y" * 512)])
    path = tmp_path / "boundary.tar"
    path.write_bytes(full[:1024])  # exactly after a.jpg: tarfile alone would stop silently
    result = read_shard(str(path))
    assert [s["key"] for s in result.samples] == ["a"]
    # a.jpg is complete but a.json may have followed: the sample being read is reported, not guessed
    assert "damaged while reading this sample" in result.samples[0]["error"]
    assert "truncated" in result.damage


def test_garbage_header_is_detected(tmp_path):
    data = bytearray(tar_bytes([("a.jpg", b"x" * 512), ("b.jpg", b"y" * 512)]))
    data[1024:1536] = b"Z" * 512
    path = tmp_path / "garbage.tar"
    path.write_bytes(bytes(data))
    result = read_shard(str(path))
    assert [s["key"] for s in result.samples] == ["a"] and "corrupt" in result.damage


@pytest.mark.parametrize("content", [b"", b"not a tar at all" * 10])
def test_unreadable_tar_gives_only_a_marker(tmp_path, content):
    path = tmp_path / "bad.tar"
    path.write_bytes(content)
    result = read_shard(str(path))
    assert result.samples == [] and result.damage.startswith("damaged shard bad")


def test_read_shard_counts(tmp_shards):
    result = read_shard(tmp_shards[-1])
    assert (result.shard, result.num_samples, result.num_errors, result.damage) == ("shard-000002", 2, 0, None)
    assert [s["key"] for s in result.samples] == ["000000008", "000000009"]
    assert sum(read_shard(u).num_samples for u in tmp_shards) == 10


def test_read_shard_s3(s3_server, s3_bucket):
    url = f"s3://{s3_bucket}/x/s.tar"
    full = tar_bytes([("a.jpg", b"A"), ("a.json", b"{}"), ("b.jpg", b"B" * 2000)])
    storage.atomic_write_bytes(url, full, s3_endpoint=s3_server)
    result = read_shard(url, s3_endpoint=s3_server)
    assert [s["key"] for s in result.samples] == ["a", "b"] and result.damage is None
    storage.atomic_write_bytes(url, full[:3000], s3_endpoint=s3_server)
    result = read_shard(url, s3_endpoint=s3_server)
    assert [s["error"] is None for s in result.samples] == [True, False] and result.damage


def test_missing_shard_raises_io_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_shard(str(tmp_path / "gone.tar"))
