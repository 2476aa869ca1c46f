"""Tar headers that tarfile rejects mid-stream (hand-built PAX records): the samples before them
are kept, the damage names the member and the byte offset, and the label job commits the shard."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile

import pytest
from PIL import Image

from ovsam_ray.data.tar_reader import read_tar


def _member(name: str, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info.tobuf(format=tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def _pax(records: bytes) -> bytes:
    """A PAX extended header (applies to the member after it) holding ``records`` verbatim."""
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, len(records)
    return info.tobuf(format=tarfile.USTAR_FORMAT) + records + b"\0" * (-len(records) % tarfile.BLOCKSIZE)


def _record(key: str, value: object) -> bytes:
    body = f" {key}={value}\n".encode()
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return str(n).encode() + body


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (200, 30, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def _shard(bad_header: bytes) -> bytes:
    """a.jpg + a.json, b.jpg, then ``bad_header`` before c.jpg, then the end of the archive."""
    img = _jpeg()
    good = _member("a.jpg", img) + _member("a.json", b"{}") + _member("b.jpg", img)
    return good + bad_header + _member("c.jpg", img) + b"\0" * (2 * tarfile.BLOCKSIZE)


BAD_HEADERS = {
    "pax_size_far_past_the_file": (_pax(_record("size", 10**30)), "c.jpg", "byte "),
    "pax_size_past_a_seek": (_pax(_record("size", 2**62)), "c.jpg", "byte "),
    "pax_size_a_bit_past_the_file": (_pax(_record("size", 50_000)), "c.jpg", "byte "),
    "pax_record_with_a_bad_length": (_pax(b"99 size=5\n"), "c.jpg", "byte"),
    "pax_record_of_length_zero": (_pax(b"0 size=5\n"), "b.jpg", "byte"),
}


@pytest.mark.parametrize("gzipped", [False, True], ids=["tar", "tar.gz"])
@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_a_rejected_header_is_damage_naming_member_and_offset(tmp_path, case, gzipped):
    header, member, offset = BAD_HEADERS[case]
    data = _shard(header)
    path = tmp_path / ("s.tar.gz" if gzipped else "s.tar")
    path.write_bytes(gzip.compress(data) if gzipped else data)
    with open(path, "rb") as f:  # a real file: seeking past 2**63 is an OSError there, not data
        read = read_tar(f, "s")
    assert read.damage is not None and member in read.damage and offset in read.damage, read.damage
    keys = [s["key"] for s in read.samples]
    assert keys[:2] == ["a", "b"] if member == "c.jpg" else keys[:1] == ["a"]
    assert read.samples[0]["error"] is None and read.samples[0]["json_bytes"] == b"{}"


def test_a_shard_with_a_rejected_header_commits_its_images_and_stays_committed(ray_local, shapes_vocab, tmp_path):
    from ovsam_ray.inference import ModelConfig
    from ovsam_ray.labels.committer import ShardCommitter
    from ovsam_ray.pipeline.label_job import EXIT_FAILED, LabelConfig, run_label

    src, out = tmp_path / "shards", str(tmp_path / "labels")
    src.mkdir()
    (src / "bad.tar").write_bytes(_shard(BAD_HEADERS["pax_size_far_past_the_file"][0]))
    cfg = LabelConfig(
        input=str(src),
        output=out,
        baseline="box-fill",
        model=ModelConfig(preset="ovsam_tiny", random_init=True, vocab=shapes_vocab),
    )
    summary = run_label(cfg)
    assert summary.shards_failed == [] and summary.shards_committed == 1
    assert [d["shard"] for d in summary.shards_damaged] == ["bad"]
    assert "c.jpg" in summary.shards_damaged[0]["error"] and "byte" in summary.shards_damaged[0]["error"]
    assert summary.images_ok == 2 and summary.exit_code(cfg.max_error_fraction) == EXIT_FAILED
    marker = ShardCommitter(out).read_marker("bad")
    assert "c.jpg" in marker["stats"]["damage"]
    rerun = run_label(cfg)
    assert rerun.shards_skipped == 1 and rerun.shards_committed == 0 and rerun.shards_failed == []
    assert json.loads(open(os.path.join(out, "_summary.json")).read())["shards_skipped"] == 1
