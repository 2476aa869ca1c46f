"""Hostile and odd cases against the label job, relabel, eval, the readers, the lease and the tar/JSON
input paths: each one either works exactly (every image once, nothing dropped) or is refused with
one line (exit 2) that names the file or flag, and changes nothing that the command did not write."""

from __future__ import annotations

import hashlib
import io as _io
import json
import os
import shutil
import tarfile
import time

import numpy as np
import pytest
from cli_helpers import error_lines as _errors
from cli_helpers import run_cli as _main

from ovsam_ray.data.synthetic import encode_image, generate_shards
from ovsam_ray.labels.committer import ShardCommitter
from ovsam_ray.labels.run_record import RunMismatchError, RunRecord, check_or_write_run_record
from ovsam_ray.labels.schema import rows_to_table
from ovsam_ray.pipeline.lease import LEASE_NAME, OutputLease


def _snapshot(root) -> dict[str, str]:
    """Every file below ``root`` (links followed) -> its sha256."""
    out = {}
    for folder, _, files in os.walk(root, followlinks=True):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _label(*extra: str) -> tuple[str, ...]:
    return ("label", "--baseline", "box-fill", *extra)


def _own_output(path, identity=None) -> None:
    """An output as a label run leaves it: run record, one committed shard."""
    check_or_write_run_record(str(path), RunRecord(identity or {"v": 1}))
    ShardCommitter(str(path)).commit("s1", rows_to_table([]))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    src = str(tmp_path_factory.mktemp("adv") / "shards")
    generate_shards(src, num_images=4, images_per_shard=2, seed=5, image_size=(32, 24))
    return src


@pytest.fixture
def user_folder(tmp_path):
    """A user's folder of JSON and Parquet files, which an output's own names may link to."""
    folder = tmp_path / "users-own"
    folder.mkdir()
    (folder / "a.json").write_text('{"mine": 1}')
    (folder / "b.json").write_text('{"mine": 2}')
    (folder / "s1.parquet").write_bytes(b"PAR1 mine")
    return folder


# --- 1-4: the output's own names are symbolic links to a user's data -----------------------------------


@pytest.mark.parametrize("name", ["_committed", "_stats", "_parts"])
@pytest.mark.parametrize("owned", [False, True], ids=["fresh", "own-output"])
def test_own_folder_that_is_a_symlink_is_refused_and_its_target_kept(
    name, owned, shards, tmp_path, user_folder, caplog
):
    out = tmp_path / "out"
    if owned:
        _own_output(out)
        shutil.rmtree(out / name, ignore_errors=True)  # a user swapped the folder for a link
    else:
        out.mkdir()
    os.symlink(user_folder, out / name)
    before = _snapshot(user_folder)
    flags = ("--allow-foreign-files", "--overwrite")
    assert _main(*_label("--input", shards, "--output", str(out), *flags)) == 2
    [error] = _errors(caplog)
    assert f"{name} -> {user_folder}" in error and "symbolic link" in error
    assert _snapshot(user_folder) == before


@pytest.mark.parametrize("name", ["_summary.json", "_stats.json", "_run.json"])
def test_own_file_that_is_a_symlink_is_refused(name, shards, tmp_path, user_folder, caplog):
    out = tmp_path / "out"
    _own_output(out) if name != "_run.json" else out.mkdir()
    os.symlink(user_folder / "a.json", out / name)
    assert _main(*_label("--input", shards, "--output", str(out), "--overwrite")) == 2
    assert name in _errors(caplog)[0]
    assert (user_folder / "a.json").read_text() == '{"mine": 1}'


def test_shard_parquet_that_is_a_symlink_is_replaced_not_written_through(ray_local, shards, tmp_path, user_folder):
    """An own output whose committed ``<shard>.parquet`` was swapped for a link to a user's file:
    ``--overwrite`` deletes the link, never the file behind it."""
    out = tmp_path / "out"
    assert _main(*_label("--input", shards, "--output", str(out))) == 0
    name = sorted(f for f in os.listdir(out) if f.endswith(".parquet"))[0]
    os.remove(out / name)
    os.symlink(user_folder / "s1.parquet", out / name)
    assert _main(*_label("--input", shards, "--output", str(out), "--overwrite", "--max-prompts", "9")) == 0
    assert (user_folder / "s1.parquet").read_bytes() == b"PAR1 mine"
    assert not os.path.islink(out / name)


# --- 5-9: what the output folder already holds --------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["_summary.json", "_stats.json", "_committed/x.json", "_stats/x.json", "_parts/x/y.parquet"]
)
def test_users_files_under_our_names_in_a_fresh_output_are_never_overwritten(name, shards, tmp_path, caplog):
    out = tmp_path / "out"
    os.makedirs(os.path.dirname(out / name), exist_ok=True)
    (out / name).write_text("the user's own")
    assert _main(*_label("--input", shards, "--output", str(out), "--allow-foreign-files", "--overwrite")) == 2
    [error] = _errors(caplog)
    assert name in error and "no run record" in error
    assert (out / name).read_text() == "the user's own"
    assert not (out / "_run.json").exists()


def test_output_that_is_a_file_is_refused_and_kept(shards, tmp_path, caplog):
    out = tmp_path / "labels.parquet"
    out.write_bytes(b"PAR1 mine")
    assert _main(*_label("--input", shards, "--output", str(out))) == 2
    assert str(out) in _errors(caplog)[0]
    assert out.read_bytes() == b"PAR1 mine"


def test_output_inside_a_symlinked_input_is_refused(shards, tmp_path, caplog):
    os.symlink(shards, tmp_path / "link")
    before = _snapshot(shards)
    assert _main(*_label("--input", shards, "--output", str(tmp_path / "link" / "out"))) == 2
    assert "lies inside --input" in _errors(caplog)[0]
    assert _snapshot(shards) == before


def test_two_spellings_of_one_output_share_one_lease(shards, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    with OutputLease("out"):
        assert _main(*_label("--input", shards, "--output", "./out/")) == 2
        assert "in use by another label job" in _errors(caplog)[0]
        assert sorted(os.listdir("out")) == [LEASE_NAME]


@pytest.mark.parametrize(
    "record",
    [
        b"",
        b'{"identity": {"v": 1}, "crea',
        b"[1, 2]",
        b'"text"',
        b'{"tool": "someone else", "version": 3}',
        b'{"identity": [1]}',
    ],
    ids=["empty", "truncated", "list", "string", "other-tool", "identity-not-object"],
)
def test_overwrite_on_a_run_record_that_is_not_ours_changes_nothing(record, shards, tmp_path, bystanders, caplog):
    out = tmp_path / "out"
    out.mkdir()
    (out / "_run.json").write_bytes(record)
    name = sorted(os.listdir(shards))[0].removesuffix(".tar")
    (out / f"{name}.parquet").write_bytes(b"PAR1 mine")  # would be a "stray" of the run's shards
    bystanders.around(out)
    before = _snapshot(out)
    assert _main(*_label("--input", shards, "--output", str(out), "--overwrite", "--allow-foreign-files")) == 2
    [error] = _errors(caplog)
    assert f"{out}/_run.json" in error and "not written by ovsam-ray" in error
    assert _snapshot(out) == before


def test_run_record_from_a_newer_version_is_refused_naming_the_field(tmp_path, bystanders):
    out = str(tmp_path / "out")
    _own_output(out, {"v": 1, "new_in_v9": {"knob": 3}})
    bystanders.around(out)
    before = _snapshot(out)
    with pytest.raises(RunMismatchError, match=r"new_in_v9\.knob: 3 -> '<absent>'"):
        check_or_write_run_record(out, RunRecord({"v": 1}), shards={"s1"})
    assert _snapshot(out) == before


def test_reading_a_run_record_that_is_not_json_names_the_file(tmp_path, caplog):
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "_run.json").write_text("[not json")
    assert _main("relabel", "--input", str(labels), "--output", str(tmp_path / "y"), "--vocab", "v.txt") == 2
    assert f"{labels}/_run.json is not JSON" in _errors(caplog)[0]
    assert not (tmp_path / "y" / "_run.json").exists()


# --- 10-12: markers and readers ---------------------------------------------------------------------------


def test_markers_that_lie_are_not_followed(tmp_path):
    """A marker naming another Parquet file (``../x.parquet``) or lying about its counts changes
    neither what readers read nor any file outside the output."""
    from ovsam_ray.labels.reader import iter_label_rows, label_files

    out = tmp_path / "out"
    _own_output(out)
    (tmp_path / "x.parquet").write_bytes(b"PAR1 not labels")
    marker = out / "_committed" / "s1.json"
    m = json.loads(marker.read_text())
    marker.write_text(json.dumps({**m, "parquet": "../x.parquet", "num_rows": 10**9, "shard": "../../etc"}))
    assert label_files(str(out)) == [f"{out}/s1.parquet"]
    assert list(iter_label_rows(str(out))) == []
    assert (tmp_path / "x.parquet").read_bytes() == b"PAR1 not labels"


def test_readers_of_an_output_being_written_see_only_committed_shards(tmp_path):
    from ovsam_ray.labels.reader import label_files

    out = tmp_path / "out"
    check_or_write_run_record(str(out), RunRecord({"v": 1}))
    (out / "s1.parquet").write_bytes(b"PAR1 written, marker not yet")
    (out / "user.parquet").write_bytes(b"PAR1 the user's")
    with pytest.raises(FileNotFoundError, match="no committed shard yet"):
        label_files(str(out))
    ShardCommitter(str(out)).commit("s2", rows_to_table([]))
    assert label_files(str(out)) == [f"{out}/s2.parquet"]


def test_relabel_of_a_source_still_being_written_is_refused(tmp_path, caplog):
    src = tmp_path / "src"
    check_or_write_run_record(str(src), RunRecord({"with_embedding": True}, {"config": {"model": {}}}))
    with OutputLease(str(src)):
        assert _main("relabel", "--input", str(src), "--output", str(tmp_path / "y"), "--vocab", "v.txt") == 2
    [error] = _errors(caplog)
    assert f"--input {src} is being written by a label job" in error
    assert not os.path.exists(tmp_path / "y" / "_run.json")


# --- 13-15: the lease ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"my notes", b"[]", b'{"heartbeat": 1}'], ids=["text", "list", "no-job-id"])
def test_a_users_file_named_like_the_lease_is_never_taken_over(content, shards, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    (out / LEASE_NAME).write_bytes(content)
    assert _main(*_label("--input", shards, "--output", str(out))) == 2
    assert f"{out}/{LEASE_NAME} is not a lease of ovsam-ray" in _errors(caplog)[0]
    assert sorted(os.listdir(out)) == [LEASE_NAME] and (out / LEASE_NAME).read_bytes() == content


def test_a_lease_that_is_a_folder_stops_the_job_with_one_line(shards, tmp_path, caplog):
    out = tmp_path / "out"
    (out / LEASE_NAME).mkdir(parents=True)
    assert _main(*_label("--input", shards, "--output", str(out))) == 2
    assert LEASE_NAME in _errors(caplog)[0]


# --- 16-21: the input list ----------------------------------------------------------------------------------


def test_one_tar_named_twice_is_labelled_once(shards, monkeypatch):
    from ovsam_ray.data.shards import list_shards, shard_names

    monkeypatch.chdir(os.path.dirname(shards))
    first = sorted(os.listdir(shards))[0]
    for spec in (
        f"shards/{{{first},{first}}}",
        f"shards/{{{first},./{first}}}",
        [f"shards/{first}", os.path.join(shards, first)],
        f"shards/{{{first},*.tar}}",
    ):
        urls = list_shards(spec)
        assert len(shard_names(urls)) == len(set(urls)) and os.path.join(shards, first) in urls


def test_a_symlinked_alias_of_a_shard_is_refused(shards, tmp_path, caplog):
    folder = tmp_path / "in"
    folder.mkdir()
    first = sorted(os.listdir(shards))[0]
    os.symlink(os.path.join(shards, first), folder / first)
    os.symlink(os.path.join(shards, first), folder / "latest.tar")
    assert _main(*_label("--input", str(folder), "--output", str(tmp_path / "out"))) == 2
    [error] = _errors(caplog)
    assert "listed under two names" in error and f"{folder}/latest.tar" in error and f"{folder}/{first}" in error


def test_odd_shard_names_keep_every_image(ray_local, tmp_path):
    from ovsam_ray.labels.reader import iter_label_rows

    src = tmp_path / "in"
    names = ["a b", "50%", "ünï-çødé", "#hash?q", "_run", "_committed", "x.tar"]
    generate_shards(str(src), num_images=len(names), images_per_shard=1, seed=2, image_size=(16, 16))
    for old, new in zip(sorted(os.listdir(src)), names):
        os.rename(src / old, src / f"{new}.tar")
    out = tmp_path / "out"
    assert _main(*_label("--input", str(src), "--output", str(out))) == 0
    rows = list(iter_label_rows(str(out)))
    assert sorted(r["shard"] for r in rows) == sorted(
        ["a b", "50%", "ünï-çødé", "#hash?q", "@_run", "@_committed", "x.tar"]
    )  # x.tar.tar: one suffix comes off
    record = json.loads((out / "_run.json").read_text())
    assert "identity" in record  # the shard "_run" did not clobber the run record


def test_a_shard_name_too_long_for_the_output_is_refused_at_start(shards, tmp_path, caplog):
    src = tmp_path / "in"
    src.mkdir()
    long = "é" * 110 + ".tar"  # 220 bytes: fits the input folder, not ".<name>.parquet.tmp-<32 hex>"
    os.symlink(os.path.join(shards, sorted(os.listdir(shards))[0]), src / long)
    assert _main(*_label("--input", str(src), "--output", str(tmp_path / "out"))) == 2
    assert "too long" in _errors(caplog)[0]
    assert not os.path.exists(tmp_path / "out" / "_run.json")


def test_output_inside_another_label_outputs_own_folder_is_refused(shards, tmp_path, caplog):
    other = tmp_path / "other"
    _own_output(other)
    for sub in ("_parts/mine", "_stats/mine", "_committed"):
        caplog.clear()
        assert _main(*_label("--input", shards, "--output", str(other / sub))) == 2
        assert f"inside {sub.split('/')[0]}/ of the label output {other}" in _errors(caplog)[0]


# --- 22-27: tar members and prompt JSON ---------------------------------------------------------------------


def _tar(members: list[tarfile.TarInfo], data: dict[str, bytes]) -> bytes:
    buf = _io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info in members:
            tar.addfile(info, _io.BytesIO(data[info.name]) if info.isfile() else None)
    return buf.getvalue()


def test_hostile_tar_members_give_one_row_or_one_counted_skip_each(tmp_path):
    """Duplicate keys, a folder named like an image, hard and symbolic links (inside and out), a
    FIFO and a device named ``.jpg``, ``../x.jpg``, ``/abs.jpg``: every image-named member is a row
    or a counted skip, nothing is read from outside the tar."""
    from ovsam_ray.data.shards import read_shard

    jpg = encode_image(np.zeros((8, 8, 3), np.uint8), "jpg")
    infos, data = [], {}

    def file(name: str, payload: bytes = jpg) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        infos.append(info)
        data[name] = payload

    def special(name: str, kind: bytes, link: str = "") -> None:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, link
        infos.append(info)

    file("a.jpg")
    file("a.jpg")  # the same key twice
    special("d.jpg", tarfile.DIRTYPE)
    special("h.jpg", tarfile.LNKTYPE, "a.jpg")
    special("s.jpg", tarfile.SYMTYPE, "../../etc/passwd")
    special("f.jpg", tarfile.FIFOTYPE)
    special("c.jpg", tarfile.CHRTYPE)
    file("../up.jpg")
    file("/abs.jpg")
    file("e.json", json.dumps({"boxes": [[0, 0, 1e308 * 10, 5]]}).encode())  # a JSON without image
    shard = tmp_path / "hostile.tar"
    shard.write_bytes(_tar(infos, data))
    read = read_shard(str(shard))
    rows = {s["key"]: s["error"] for s in read.samples}
    assert rows["a"] is None and any(k.startswith("a.jpg") for k in rows)  # the second a.jpg: an error row
    assert rows["h"] is None  # a hard link inside the tar: the same image
    assert rows["s"] is not None and "link" in rows["s"]  # never read from disk
    assert rows["../up"] is None and rows["abs"] is None and rows["e"] is not None
    assert read.skipped["directory"] == 1 and read.skipped["not a file or link (device, FIFO...)"] == 2
    image_members = 7  # a.jpg x2, h, s, ../up, /abs + e.json's error row
    assert len(read.samples) == image_members


def test_sparse_member_reads_whole_or_is_an_error_row(tmp_path):
    from ovsam_ray.data.shards import read_shard

    png = encode_image(np.full((8, 8, 3), 7, np.uint8), "png")
    # a GNU sparse header around a real image: tarfile reassembles it (or the row says why not)
    buf = _io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("sp.png")
        info.size = len(png)
        tar.addfile(info, _io.BytesIO(png))
    raw = bytearray(buf.getvalue())
    raw[156:157] = b"S"  # the type flag: GNU sparse, with an empty sparse map
    header = raw[:512]
    header[148:156] = b" " * 8
    raw[148:156] = (f"{sum(header):06o}\0 ").encode()
    (tmp_path / "sparse.tar").write_bytes(bytes(raw))
    read = read_shard(str(tmp_path / "sparse.tar"))
    assert len(read.samples) + sum(read.skipped.values()) + (read.damage is not None) >= 1


def test_a_million_boxes_are_capped_with_a_warning_and_huge_numbers_dropped():
    from ovsam_ray.data.prompt_json import parse_prompts_json

    boxes = [[1, 1, 5, 5]] * 1_000_000 + [[1e999, 0, 1, 1]]
    data = json.dumps({"boxes": boxes}).replace("Infinity", "1e999").encode()
    t0 = time.time()
    prompts = parse_prompts_json(data, width=10, height=10, max_prompts=1000)
    assert prompts.num_boxes == 1000 and any("1000" in w for w in prompts.warnings)
    assert time.time() - t0 < 30


def test_huge_integers_in_a_sidecar_are_a_warning_not_a_crash():
    from ovsam_ray.data.prompt_json import parse_prompts_json

    data = b'{"boxes": [[' + b"9" * 5000 + b', 0, 1, 1], [0, 0, 2, 2]], "image_id": ' + b"1" * 5000 + b"}"
    prompts = parse_prompts_json(data, width=10, height=10)
    assert prompts.num_boxes >= 1


# --- 28-29: an interrupted --overwrite, eval beside a user's files -----------------------------------------


def test_overwrite_interrupted_midway_then_rerun_deletes_only_ours(tmp_path, bystanders, monkeypatch):
    from ovsam_ray import storage

    out = str(tmp_path / "out")
    check_or_write_run_record(out, RunRecord({"v": 1}))
    for n in ("s1", "s2", "s3"):
        ShardCommitter(out).commit(n, rows_to_table([]))
    bystanders.around(out)
    real, calls = storage.remove, []

    def dying_remove(url, **kw):
        calls.append(url)
        if len(calls) == 3:
            raise KeyboardInterrupt  # SIGTERM's exception, midway through the deletion
        real(url, **kw)

    monkeypatch.setattr(storage, "remove", dying_remove)
    with pytest.raises(KeyboardInterrupt):
        check_or_write_run_record(out, RunRecord({"v": 2}), overwrite=True, shards={"s1", "s2", "s3"})
    monkeypatch.setattr(storage, "remove", real)
    committer = ShardCommitter(out)
    assert committer.markers_without_parquet() == []  # markers go first: none points at a deleted file
    assert json.load(open(os.path.join(out, "_run.json")))["identity"] == {"v": 1}
    assert (
        check_or_write_run_record(out, RunRecord({"v": 2}), overwrite=True, shards={"s1", "s2", "s3"}) == "overwritten"
    )
    assert committer.committed_shards() == set() and not any(
        f.endswith(".parquet") and f.startswith("s") for f in os.listdir(out)
    )


@pytest.mark.ray  # `ovsam-ray eval` in this process starts Ray (a CLI call the conftest rules do not see)
def test_eval_never_overwrites_a_users_metrics(tmp_path, caplog):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text('{"my": "numbers"}')
    labels = tmp_path / "labels"
    _own_output(labels)
    code = _main(
        "eval", "--input", str(tmp_path / "gt"), "--labels", str(labels), "--output", str(out), "--random-init"
    )
    assert code == 2
    assert f"{out}/metrics.json was not written by ovsam-ray eval" in _errors(caplog)[0]
    assert (out / "metrics.json").read_text() == '{"my": "numbers"}'


# --- 30: object-store keys ----------------------------------------------------------------------------------


def test_s3_keys_with_odd_characters_are_compared_as_keys():
    from ovsam_ray.locations import OverlappingLocationsError, check_disjoint

    for same in ("s3://b/in//", "s3://b//in", "s3://b/./in/", "s3a://b/in"):
        with pytest.raises(OverlappingLocationsError):
            check_disjoint([("--input", "s3://b/in")], [("--output", same)])
    for inside in ("s3://b/in/#frag", "s3://b/in/?x=1", "s3://b/in/ "):
        with pytest.raises(OverlappingLocationsError, match="lies inside"):
            check_disjoint([("--input", "s3://b/in")], [("--output", inside)])
    for apart in ("s3://b/in ", "s3://b/in#x", "s3://b/in?x", "s3://b/in2"):  # other keys: other places
        check_disjoint([("--input", "s3://b/in")], [("--output", apart)])


def test_s3_output_with_hash_and_question_mark_writes_where_it_says(ray_local, s3_server, s3_bucket, shards):
    import fsspec

    fs = fsspec.filesystem("s3", endpoint_url=s3_server)
    out = f"s3://{s3_bucket}/out #1?v=2"
    assert _main(*_label("--input", shards, "--output", out, "--s3-endpoint", s3_server)) == 0
    keys = fs.find(s3_bucket)
    assert keys and all(k.startswith(f"{s3_bucket}/out #1?v=2/") for k in keys), keys


def test_relabel_of_a_source_whose_parquet_file_is_gone_stops_with_one_line(tmp_path, caplog):
    src = tmp_path / "src"
    check_or_write_run_record(str(src), RunRecord({"with_embedding": True}, {"config": {"model": {}}}))
    ShardCommitter(str(src)).commit("s1", rows_to_table([]))
    os.remove(src / "s1.parquet")
    assert _main("relabel", "--input", str(src), "--output", str(tmp_path / "y"), "--vocab", "v.txt") == 2
    [error] = _errors(caplog)
    assert "s1.parquet is missing" in error and str(src) in error
    assert not os.path.exists(tmp_path / "y" / "_run.json")


@pytest.mark.parametrize("spec", ["{folder}", "{folder}/*.tar", "{folder}/pipe.tar"])
def test_a_fifo_named_like_a_shard_is_refused_not_read(spec, shards, tmp_path, caplog):
    """Reading a FIFO would block the job for ever (or read a stream once, different on the rerun)."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(os.path.join(shards, sorted(os.listdir(shards))[0]), folder)
    os.mkfifo(folder / "pipe.tar")
    assert _main(*_label("--input", spec.format(folder=folder), "--output", str(tmp_path / "out"))) == 2
    assert f"{folder}/pipe.tar is not a regular file" in _errors(caplog)[0]
