"""Hostile and odd cases against the exporters, ``show``, ``convert`` and ``train export``: a user's
file is never changed or deleted, whatever links, manifests or half-written label outputs they
meet; refusals are one line (exit 2) naming the flag or file. None of these tests starts Ray."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

import pytest
from coco_fixture import coco_label_output
from test_overwrite import WRITERS

from ovsam_ray.cli import main
from ovsam_ray.labels.committer import ShardCommitter
from ovsam_ray.labels.run_record import RunRecord, check_or_write_run_record
from ovsam_ray.labels.schema import rows_to_table
from ovsam_ray.pipeline.lease import OutputLease
from ovsam_ray.written import MANIFEST_NAME


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> dict[str, str]:
    return coco_label_output(str(tmp_path_factory.mktemp("adv-exports")))


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def _digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _target(out, sub: str) -> str:
    return str(out / sub) if sub else str(out)


@pytest.fixture
def users_file(tmp_path):
    path = tmp_path / "users-own" / "precious.bin"
    path.parent.mkdir()
    path.write_bytes(b"the user's own bytes")
    return path


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_written_file_swapped_for_a_link_to_a_users_file_is_never_written_through(
    writer, labelled, tmp_path, users_file
):
    """Run once, replace one file the command wrote with a symbolic link to a user's file, rerun
    with --overwrite: the link is replaced (or the run refused), the user's file is unchanged."""
    argv, sub, name = WRITERS[writer]
    out = tmp_path / "out"
    assert main(argv(labelled, _target(out, sub))) == 0
    os.remove(out / name)
    os.symlink(users_file, out / name)
    code = main([*argv(labelled, _target(out, sub)), "--overwrite"])
    assert code in (0, 2)
    assert users_file.read_bytes() == b"the user's own bytes"


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_dangling_link_where_a_file_would_go_never_creates_a_file_outside(writer, labelled, tmp_path):
    argv, sub, name = WRITERS[writer]
    out = tmp_path / "out"
    outside = tmp_path / "outside" / "created-by-us"
    (tmp_path / "outside").mkdir()
    os.makedirs(os.path.dirname(out / name), exist_ok=True)
    os.symlink(outside, out / name)
    assert main(argv(labelled, _target(out, sub))) in (0, 2)
    assert not outside.exists()


@pytest.mark.parametrize("writer", ["yolo", "sa1b", "show"])
def test_a_subfolder_that_links_to_a_users_folder_is_never_written_into(writer, labelled, tmp_path, caplog):
    """``out/labels -> ~/data``: files the exporter would write there are the user's."""
    argv, sub, name = WRITERS[writer]
    out = tmp_path / "out"
    users = tmp_path / "users-folder"
    users.mkdir()
    top = name.split("/")[0]
    inner = name.split("/", 1)[1]
    os.makedirs(os.path.dirname(users / inner), exist_ok=True)
    (users / inner).write_bytes(b"mine")
    out.mkdir()
    os.symlink(users, out / top)
    assert main(argv(labelled, _target(out, sub))) == 2
    assert (users / inner).read_bytes() == b"mine"
    assert str(out) in _errors(caplog)[0]


@pytest.mark.parametrize("manifest", [b"", b"[]", b'{"producer": "ovsam-ray"}', b'{"producer": "x", "commands": {}}'])
def test_a_manifest_we_did_not_write_is_refused_and_kept(manifest, labelled, tmp_path, caplog):
    argv, sub, name = WRITERS["yolo"]
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST_NAME).write_bytes(manifest)
    assert main([*argv(labelled, _target(out, sub)), "--overwrite"]) == 2
    assert MANIFEST_NAME in _errors(caplog)[0]
    assert (out / MANIFEST_NAME).read_bytes() == manifest and sorted(os.listdir(out)) == [MANIFEST_NAME]


def test_export_of_a_label_output_with_no_committed_shard_yet_is_refused(labelled, tmp_path, caplog):
    labels = tmp_path / "labels"
    check_or_write_run_record(str(labels), RunRecord({"v": 1}, {"config": {"input": labelled["shards"]}}))
    shutil.copy(os.path.join(labelled["labels"], "shard-000000.parquet"), labels / "shard-000000.parquet")
    code = main(
        [
            "export",
            "coco",
            "--input",
            str(labels),
            "--shards",
            labelled["shards"],
            "--output",
            str(tmp_path / "coco.json"),
        ]
    )
    assert code == 2 and "no committed shard yet" in _errors(caplog)[0]
    assert not (tmp_path / "coco.json").exists()


def test_export_while_the_label_job_writes_exports_only_committed_shards(labelled, tmp_path):
    """A shard whose Parquet file is written but whose marker is not yet: not exported."""
    import pyarrow.parquet as pq

    labels = tmp_path / "labels"
    shutil.copytree(labelled["labels"], labels)
    record = RunRecord({"v": 1}, {"config": {"input": labelled["shards"]}}).to_dict()
    (labels / "_run.json").write_text(json.dumps(record))  # as the label job wrote it before its shards
    rows = [{**r, "shard": "shard-zz"} for r in pq.read_table(labels / "shard-000000.parquet").to_pylist()]
    ShardCommitter(str(labels)).commit("shard-zz", rows_to_table(rows))
    os.remove(labels / "_committed" / "shard-zz.json")  # its Parquet file is written, its marker not yet
    with OutputLease(str(labels)):
        assert (
            main(
                [
                    "export",
                    "coco",
                    "--input",
                    str(labels),
                    "--shards",
                    labelled["shards"],
                    "--output",
                    str(tmp_path / "coco.json"),
                ]
            )
            == 0
        )
    images = json.load(open(tmp_path / "coco.json"))["images"]
    assert images and "shard-zz" not in json.dumps(images)


def test_export_reads_only_its_own_run_records_shards_not_a_stray_parquet(labelled, tmp_path):
    labels = tmp_path / "labels"
    shutil.copytree(labelled["labels"], labels)
    ShardCommitter(str(labels)).commit("zz-empty", rows_to_table([]))
    (labels / "user-notes.parquet").write_bytes(b"PAR1 not labels")
    assert (
        main(
            [
                "export",
                "coco",
                "--input",
                str(labels),
                "--shards",
                labelled["shards"],
                "--output",
                str(tmp_path / "coco.json"),
            ]
        )
        == 0
    )
    assert (labels / "user-notes.parquet").read_bytes() == b"PAR1 not labels"


def test_show_output_inside_the_label_outputs_own_folder_is_refused(labelled, tmp_path, caplog):
    labels = tmp_path / "labels"
    shutil.copytree(labelled["labels"], labels)
    before = {f: _digest(os.path.join(r, f)) for r, _, fs in os.walk(labels) for f in fs}
    assert (
        main(
            ["show", "--input", str(labels), "--shards", labelled["shards"], "--output", str(labels / "_stats" / "png")]
        )
        == 2
    )
    assert "--output" in _errors(caplog)[0]
    assert {f: _digest(os.path.join(r, f)) for r, _, fs in os.walk(labels) for f in fs} == before
