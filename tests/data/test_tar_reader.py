"""Hostile shards, built here with tarfile: every image member is one row, keys are unique, text
encodes as UTF-8, skipped members are counted, and nothing is read from outside the tar."""

from __future__ import annotations

import gzip
import io as _io
import logging
import os
import tarfile

import pytest
from PIL import Image

from ovsam_ray.data.decode import decode_sample
from ovsam_ray.data.shards import list_shards, read_shard, shard_name
from ovsam_ray.data.tar_reader import (
    SKIP_APPLEDOUBLE,
    SKIP_DUPLICATE_JSON,
    SKIP_METADATA,
    SKIP_NO_EXTENSION,
    SKIP_OTHER_EXTENSION,
)


def _png() -> bytes:
    buf = _io.BytesIO()
    Image.new("RGB", (4, 3), (1, 2, 3)).save(buf, "PNG")
    return buf.getvalue()


def _link(name: str, target: str, kind: bytes = tarfile.LNKTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def _tar(members, *, fmt=tarfile.USTAR_FORMAT, mode="w") -> bytes:
    """A tar of ``(name, bytes)`` pairs and ready TarInfos (links, directories, FIFOs); names may
    hold undecodable bytes as surrogates, written as the raw bytes."""
    buf = _io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode, format=fmt, encoding="utf-8", errors="surrogateescape") as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tf.addfile(info, _io.BytesIO(m[1]))
    return buf.getvalue()


def _read(tmp_path, members, name="s.tar", **kw):
    path = tmp_path / name
    path.write_bytes(_tar(members, **kw))
    return read_shard(str(path))


def _assert_clean(result):
    """The reader's contract on any shard: unique keys, every string storable as UTF-8."""
    keys = [s["key"] for s in result.samples]
    assert len(keys) == len(set(keys))
    for s in result.samples:
        for value in (s["key"], s["shard"], s["error"] or ""):
            value.encode("utf-8")


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_member_name_with_invalid_utf8_is_escaped_and_labelled(tmp_path, fmt):
    bad = os.fsdecode(b"caf\xe9")  # how Python carries the byte 0xE9 of a Latin-1 name
    result = _read(tmp_path, [(f"{bad}.png", _png()), (f"{bad}.json", b"{}"), (f"{bad}.txt", b"x")], fmt=fmt)
    _assert_clean(result)
    (sample,) = result.samples
    assert sample["key"] == "caf\\xe9" and sample["error"] is None and sample["json_bytes"] == b"{}"
    assert decode_sample(sample).ok  # the image is still labelled
    assert result.skipped_examples[SKIP_OTHER_EXTENSION] == ["caf\\xe9.txt"]


def test_shard_file_name_not_utf8(tmp_path):
    folder = os.fsencode(str(tmp_path))
    with open(os.path.join(folder, b"sh\xffard.tar"), "wb") as f:
        f.write(_tar([("a.png", _png())]))
    (url,) = list_shards(str(tmp_path))
    assert shard_name(url) == "sh%FFard"
    result = read_shard(url)
    _assert_clean(result)
    assert [(s["key"], s["shard"], s["error"]) for s in result.samples] == [("a", "sh%FFard", None)]


@pytest.mark.parametrize(
    "file_name, expected",
    [
        (".tar", "@"),
        ("_meta.tar", "@_meta"),
        (".hidden.tar", "@.hidden"),
        ("@at.tar", "@@at"),
        ("..tar", "@."),
        ("back\\slash.tar", "back%5Cslash"),
        ("new\nline.tar", "new%0Aline"),
        ("plain-000001.TAR", "plain-000001"),
        ("x.tar.gz", "x"),
        ("x.tgz", "x"),
    ],
)
def test_shard_names_are_safe_output_names(file_name, expected):
    name = shard_name(f"/data/{file_name}")
    assert name == expected
    assert name and name[0] not in "._" and "/" not in name and "\\" not in name


def test_a_file_called_dot_tar_is_read(tmp_path):
    (tmp_path / ".tar").write_bytes(_tar([("a.png", _png())]))
    (url,) = list_shards(str(tmp_path))
    result = read_shard(url)
    assert result.shard == "@" and [s["shard"] for s in result.samples] == ["@"]


def test_gzipped_shards_are_listed_and_read(tmp_path):
    members = [("a.png", _png()), ("a.json", b"{}"), ("b.png", _png())]
    (tmp_path / "one.tar.gz").write_bytes(_tar(members, mode="w:gz"))
    (tmp_path / "two.tgz").write_bytes(_tar(members, mode="w:gz"))
    (tmp_path / "three.tar").write_bytes(_tar(members))
    urls = list_shards(str(tmp_path))
    assert [os.path.basename(u) for u in urls] == ["one.tar.gz", "three.tar", "two.tgz"]
    for url in urls:
        result = read_shard(url)
        assert [s["key"] for s in result.samples] == ["a", "b"] and result.damage is None
        assert result.samples[0]["json_bytes"] == b"{}"


def test_truncated_gzip_shard_is_damage_not_a_crash(tmp_path):
    data = gzip.compress(_tar([("a.png", _png()), ("b.png", os.urandom(20_000))]), mtime=0)
    (tmp_path / "cut.tgz").write_bytes(data[: len(data) // 2])
    result = read_shard(str(tmp_path / "cut.tgz"))
    assert result.damage and result.damage.startswith("damaged shard cut:")
    assert [s["key"] for s in result.samples] in ([], ["a"], ["a", "b"])


def test_hard_link_member_is_its_own_row(tmp_path):
    png = _png()
    result = _read(tmp_path, [("a.png", png), _link("b.png", "a.png"), _link("b.json", "./a.png")])
    assert [(s["key"], s["error"], s["image_bytes"]) for s in result.samples] == [("a", None, png), ("b", None, png)]
    assert result.samples[1]["json_bytes"] == png


def test_symbolic_links_are_followed_inside_the_tar_only(tmp_path):
    png = _png()
    result = _read(
        tmp_path,
        [
            ("dir/a.png", png),
            _link("dir/b.png", "a.png", tarfile.SYMTYPE),
            _link("dir/c.png", "../dir/a.png", tarfile.SYMTYPE),
            _link("evil.png", "/etc/passwd", tarfile.SYMTYPE),
            _link("up.png", "../../../etc/passwd", tarfile.SYMTYPE),
            _link("dangling.png", "nowhere.png", tarfile.SYMTYPE),
            _link("loop1.png", "loop2.png", tarfile.SYMTYPE),
            _link("loop2.png", "loop1.png", tarfile.SYMTYPE),
        ],
    )
    _assert_clean(result)
    rows = {s["key"]: s for s in result.samples}
    assert [rows[k]["image_bytes"] for k in ("dir/a", "dir/b", "dir/c")] == [png] * 3
    assert "evil.png is a symbolic link to /etc/passwd, outside the shard" in rows["evil"]["error"]
    assert "outside the shard" in rows["up"]["error"] and rows["up"]["image_bytes"] is None
    assert "not in the shard" in rows["dangling"]["error"]
    assert "chain of more than" in rows["loop1"]["error"]


def test_two_images_with_one_key_give_two_rows(tmp_path):
    result = _read(tmp_path, [("a.jpg", b"J"), ("a.png", b"P"), ("a.json", b"{}")])
    a, extra = result.samples
    assert (a["key"], a["image_bytes"], a["image_ext"], a["json_bytes"], a["error"]) == ("a", b"J", "jpg", b"{}", None)
    assert extra["key"] == "a.png" and extra["image_bytes"] is None
    assert "second image a.png for key 'a'" in extra["error"] and "a.jpg" in extra["error"]


def test_duplicated_member_keeps_the_first_image(tmp_path):
    result = _read(tmp_path, [("a.jpg", b"good"), ("a.jpg", b"later"), ("a.jpg", b"third"), ("a.png", b"P")])
    _assert_clean(result)
    assert [s["key"] for s in result.samples] == ["a", "a.jpg", "a.jpg#2", "a.png"]
    assert result.samples[0]["image_bytes"] == b"good" and result.samples[0]["error"] is None
    assert all("duplicate member a.jpg" in s["error"] for s in result.samples[1:3])


def test_reserved_and_hidden_names(tmp_path):
    result = _read(
        tmp_path,
        [
            ("__key__.jpg", b"K"),  # an image whose key looks reserved is still an image
            ("__meta__.json", b"{}"),  # WebDataset metadata: skipped, counted
            ("b.jpg", b"B"),
            ("b.__key__", b"x"),
            ("b.__url__", b"x"),
            ("dir/.hidden.jpg", b"H"),  # a hidden image member is a row
            ("dir/._b.jpg", b"\x00\x05\x16\x07\x00\x02"),  # macOS resource fork beside b.jpg: skipped
            ("._c.jpg", b"C"),  # named like one, but not one: an image row
            ("noext", b"N"),
            (".profile", b"x"),
        ],
    )
    assert [(s["key"], s["image_bytes"], s["error"]) for s in result.samples] == [
        ("__key__", b"K", None),
        ("b", b"B", None),
        ("dir/.hidden", b"H", None),
        ("._c", b"C", None),
    ]
    assert result.skipped == {SKIP_METADATA: 1, SKIP_OTHER_EXTENSION: 2, SKIP_NO_EXTENSION: 2, SKIP_APPLEDOUBLE: 1}
    assert result.num_skipped == 6 and result.skipped_examples[SKIP_NO_EXTENSION] == ["noext", ".profile"]


def test_json_far_from_its_image_joins_it(tmp_path):
    result = _read(
        tmp_path, [("a.jpg", b"A"), ("b.jpg", b"B"), ("a.json", b'{"x": 1}'), ("b.json", b"{}"), ("a.json", b"{}")]
    )
    assert [(s["key"], s["json_bytes"], s["error"]) for s in result.samples] == [
        ("a", b'{"x": 1}', None),
        ("b", b"{}", None),
    ]
    assert result.skipped == {SKIP_DUPLICATE_JSON: 1}


def test_directories_fifos_and_skips_are_reported_in_a_safe_log(tmp_path, caplog):
    fifo = tarfile.TarInfo("pipe.jpg")
    fifo.type = tarfile.FIFOTYPE
    folder = tarfile.TarInfo("dir")
    folder.type = tarfile.DIRTYPE
    forged = "x\nERROR forged line"
    with caplog.at_level(logging.INFO, logger="ovsam_ray.data.shards"):
        result = _read(tmp_path, [folder, fifo, ("dir/a.jpg", b"A"), (f"{forged}", b"?"), ("dir/a.jpg", b"again")])
    assert [s["key"] for s in result.samples] == ["dir/a", "dir/a.jpg"]
    assert result.skipped["directory"] == 1 and sum(result.skipped.values()) == 3
    messages = [r.getMessage() for r in caplog.records]
    assert any("skipped 3 members" in m for m in messages)
    assert all("\n" not in m for m in messages) and any("x\\nERROR forged line" in m for m in messages)


def test_hostile_shard_contract(tmp_path):
    bad = os.fsdecode(b"\xff\xfe")
    result = _read(
        tmp_path,
        [
            (f"{bad}.jpg", b"1"),
            (f"{bad}.png", b"2"),
            (f"{bad}.jpg", b"3"),
            ("k\nnew.jpg", b"4"),
            ("k.json", b"{}"),
            _link("h.jpg", f"{bad}.jpg"),
            ("./k.jpg", b"5"),
            ("k.jpg", b"6"),
        ],
        fmt=tarfile.PAX_FORMAT,
    )
    _assert_clean(result)
    assert [s["key"] for s in result.samples] == [
        "\\xff\\xfe",
        "\\xff\\xfe.png",
        "\\xff\\xfe.jpg",
        "k\nnew",
        "k",
        "h",
        "k.jpg",
    ]
    assert result.samples[5]["image_bytes"] == b"1"
