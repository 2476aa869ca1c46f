"""Nothing outside what a command wrote is ever changed: an output is compared with the inputs as a
location (``./X``, ``X/``, a symlink, ``s3://b//x/./``), never as a string, and a command deletes
only names it generates itself, in a folder whose run record is its own."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
from cli_helpers import error_lines as _errors
from cli_helpers import run_cli as _main

from ovsam_ray.data.synthetic import generate_shards
from ovsam_ray.labels.committer import ShardCommitter
from ovsam_ray.labels.run_record import RunRecord, check_or_write_run_record
from ovsam_ray.labels.schema import rows_to_table
from ovsam_ray.locations import OverlappingLocationsError, canonical_location, check_disjoint


def _snapshot(root) -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _label_output(path) -> None:
    """A label output as ``label --with-embedding`` leaves it: run record, marker, Parquet file."""
    committer = ShardCommitter(str(path))
    check_or_write_run_record(str(path), RunRecord({"with_embedding": True}, {"config": {"model": {}}}))
    committer.commit("s1", rows_to_table([]))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    src = str(tmp_path_factory.mktemp("safety") / "shards")
    generate_shards(src, num_images=2, images_per_shard=2, seed=3, image_size=(32, 24))
    return src


# --- one canonical location per place ----------------------------------------------------------------


def test_canonical_location_s3_spellings_meet():
    same = {canonical_location(u) for u in ("s3://b/x", "s3://b/x/", "s3://b//x/./", "s3a://b/x", "S3://b/x")}
    assert len(same) == 1
    assert canonical_location("s3://b/x").contains(canonical_location("s3://b//x/./y/"))
    assert not canonical_location("s3://b/x").contains(canonical_location("s3://b/xy"))
    assert not canonical_location("s3://b/x").contains(canonical_location("s3://c/x"))
    with pytest.raises(OverlappingLocationsError, match=r"--output s3://b//x/\./ is the same location as --input"):
        check_disjoint([("--input", "s3://b/x")], [("--output", "s3://b//x/./")])
    with pytest.raises(OverlappingLocationsError, match="contains"):
        check_disjoint([("--input", "s3://b/x/y/*.tar")], [("--output", "s3://b/x/")])
    check_disjoint([("--input", "s3://b/x")], [("--output", "s3://b/x2")])


@pytest.mark.parametrize("spelling", ["./X", "X/", "absolute", "symlink", "inside", "around"])
def test_relabel_onto_its_input_is_refused_and_the_input_is_intact(spelling, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    _label_output(tmp_path / "X")
    os.symlink(tmp_path / "X", tmp_path / "link")
    (tmp_path / "v.txt").write_text("a\nb\n")
    before = _snapshot(tmp_path / "X")
    out = {"absolute": str(tmp_path / "X"), "symlink": "link", "inside": "X/./sub", "around": "."}.get(
        spelling, spelling
    )
    assert _main("relabel", "--input", "X", "--output", out, "--vocab", "v.txt", "--overwrite") == 2
    assert _snapshot(tmp_path / "X") == before
    [error] = _errors(caplog)
    assert f"--output {out} " in error and "--input X" in error


def test_relabel_on_s3_spellings_is_refused(s3_server, s3_bucket, caplog):
    import fsspec

    fs = fsspec.filesystem("s3", endpoint_url=s3_server)
    fs.pipe_file(f"{s3_bucket}/x/_run.json", b"{}")
    code = _main(
        "relabel",
        "--input",
        f"s3://{s3_bucket}/x",
        "--output",
        f"s3://{s3_bucket}//x/./",
        "--vocab",
        "v",
        "--s3-endpoint",
        s3_server,
    )
    assert code == 2 and "is the same location as --input" in _errors(caplog)[0]
    assert fs.find(s3_bucket) == [f"{s3_bucket}/x/_run.json"]


def test_every_writing_command_refuses_an_output_inside_its_input(tmp_path, caplog):
    x = str(tmp_path / "X")
    _label_output(x)
    (tmp_path / "X" / "ann.json").write_text("{}")
    before = _snapshot(x)
    runs = [
        ("export", "coco", "--input", x, "--output", f"{x}/coco.json"),
        ("export", "wds", "--input", x, "--output", f"{x}/../X/wds"),
        ("show", "--input", x, "--output", f"{x}/png"),
        ("convert", "coco", "--annotations", f"{x}/ann.json", "--images", x, "--output", f"{x}/shards"),
        ("train", "export", "--run", x, "--output", f"{x}/weights"),
    ]
    for argv in runs:
        caplog.clear()
        assert _main(*argv) == 2, argv
        [error] = _errors(caplog)
        assert "--output" in error and ("lies inside" in error or "is the same" in error), error
    assert _snapshot(x) == before


def test_export_refuses_an_output_inside_the_shards_of_the_run_record(tmp_path, caplog):
    labels = tmp_path / "labels"
    check_or_write_run_record(str(labels), RunRecord({}, {"config": {"input": str(tmp_path / "shards")}}))
    assert _main("show", "--input", str(labels), "--output", str(tmp_path / "shards" / "png")) == 2
    assert "run record's input" in _errors(caplog)[0]


def test_eval_refuses_outputs_inside_its_inputs_and_takes_its_own_prompted_shards(tmp_path):
    from ovsam_ray.evaluation.run_eval import EvalConfig
    from ovsam_ray.inference import ModelConfig

    model = ModelConfig(random_init=True)
    with pytest.raises(OverlappingLocationsError, match="--input"):
        EvalConfig(input=str(tmp_path / "gt"), output=str(tmp_path / "gt" / "eval"), model=model)
    with pytest.raises(OverlappingLocationsError, match="--labels"):
        EvalConfig(input=str(tmp_path / "gt"), output=str(tmp_path), labels=str(tmp_path / "metrics.json"))
    out = tmp_path / "eval"  # the documented rerun: score the labels of this command's own prompted shards
    EvalConfig(input=str(out / "shards_both"), output=str(out), labels=str(out / "labels_both"))


# --- the label job's inputs -----------------------------------------------------------------------------


def test_glob_input_that_would_match_the_output_is_refused(shards, tmp_path, bystanders, caplog):
    root = os.path.dirname(shards)
    out = os.path.join(root, "out")
    bystanders.inside(out)  # a .tar in the output: `**/*.tar` would pick it up
    assert _main("label", "--baseline", "box-fill", "--input", f"{root}/**/*.tar", "--output", out) == 2
    [error] = _errors(caplog)
    assert f"--output {out} lies inside --input {root}/**/*.tar" in error


def test_input_file_inside_the_output_is_refused_and_image_classes_kept(tmp_path, bystanders, caplog):
    folder = tmp_path / "converted"
    generate_shards(str(folder), num_images=2, images_per_shard=2, seed=1, image_size=(32, 24))
    (folder / "_image_classes.parquet").write_bytes(b"PAR1 converter's file")
    bystanders.files[str(folder / "_image_classes.parquet")] = hashlib.sha256(b"PAR1 converter's file").hexdigest()
    shard = sorted(folder.glob("*.tar"))[0]
    assert _main("label", "--baseline", "box-fill", "--input", str(shard), "--output", str(folder)) == 2
    assert "contains --input" in _errors(caplog)[0]
    assert not (folder / "_run.json").exists()


def test_distinct_names_error_names_the_colliding_shards(shards, tmp_path, caplog):
    first = sorted(os.listdir(shards))[0]
    for sub in ("a", "b"):
        os.makedirs(tmp_path / sub)
        shutil.copy(os.path.join(shards, first), tmp_path / sub / first)
    code = _main(
        "label", "--baseline", "box-fill", "--input", f"{tmp_path}/{{a,b}}/{first}", "--output", str(tmp_path / "out")
    )
    assert code == 2
    [error] = _errors(caplog)
    assert f"{tmp_path}/a/{first} and {tmp_path}/b/{first}" in error


# --- deleting only what we wrote ------------------------------------------------------------------------


def test_label_refuses_an_output_holding_foreign_files(shards, tmp_path, bystanders, caplog):
    out = tmp_path / "out"
    bystanders.around(out)
    assert _main("label", "--baseline", "box-fill", "--input", shards, "--output", str(out)) == 2
    [error] = _errors(caplog)
    assert "user-archive.tar" in error and "user-table.parquet" in error and "--allow-foreign-files" in error
    assert not (out / "_run.json").exists()


def test_label_refuses_a_foreign_file_it_would_overwrite_even_when_allowed(shards, tmp_path, caplog):
    out = tmp_path / "out"
    name = sorted(os.listdir(shards))[0].removesuffix(".tar")
    os.makedirs(out)
    (out / f"{name}.parquet").write_bytes(b"mine")
    code = _main("label", "--baseline", "box-fill", "--allow-foreign-files", "--input", shards, "--output", str(out))
    assert code == 2 and f"{name}.parquet" in _errors(caplog)[0]
    assert (out / f"{name}.parquet").read_bytes() == b"mine"


def test_cleanup_deletes_only_unmarked_parquet_of_the_run_shards(tmp_path):
    committer = ShardCommitter(str(tmp_path))
    committer.commit("s1", rows_to_table([]))
    for name in ("s2.parquet", "user.parquet", "_image_classes.parquet", f".s3.parquet.tmp-{'a' * 32}"):
        (tmp_path / name).write_bytes(b"x")
    removed = committer.cleanup_temporaries({"s1", "s2"})
    assert sorted(os.path.basename(u) for u in removed) == [f".s3.parquet.tmp-{'a' * 32}", "s2.parquet"]
    assert sorted(os.listdir(tmp_path)) == ["_committed", "_image_classes.parquet", "s1.parquet", "user.parquet"]


def test_overwrite_deletes_the_old_run_and_nothing_else(tmp_path, bystanders):
    out = str(tmp_path / "out")
    check_or_write_run_record(out, RunRecord({"v": 1}))
    ShardCommitter(out).commit("s1", rows_to_table([]))
    bystanders.around(out)
    os.makedirs(os.path.join(out, "user"))
    bystanders.inside(os.path.join(out, "user"))
    state = check_or_write_run_record(out, RunRecord({"v": 2}), overwrite=True, shards={"s1", "s2"})
    assert state == "overwritten"
    assert not os.path.exists(os.path.join(out, "s1.parquet"))
    assert json.load(open(os.path.join(out, "_run.json")))["identity"] == {"v": 2}


def test_label_with_foreign_files_allowed_leaves_them_alone(ray_local, shards, tmp_path, bystanders):
    out = tmp_path / "out"
    bystanders.around(out)
    flags = ("label", "--baseline", "box-fill", "--allow-foreign-files", "--input", shards, "--output", str(out))
    assert _main(*flags) == 0
    assert _main(*flags) == 0  # resumed: nothing to do, nothing deleted
    assert _main(*flags, "--overwrite", "--max-prompts", "7") == 0  # another run over it
    assert len(ShardCommitter(str(out)).committed_shards()) == 1


def test_foreign_files_on_s3_are_refused_and_ours_are_not_foreign(s3_server, s3_bucket):
    import fsspec

    from ovsam_ray.pipeline.ownership import ForeignFilesError, check_output_owned, foreign_files

    fs = fsspec.filesystem("s3", endpoint_url=s3_server)
    out = f"s3://{s3_bucket}/labels/"
    ShardCommitter(f"s3://{s3_bucket}/labels", s3_endpoint=s3_server).commit("s1", rows_to_table([]))
    fs.pipe_file(f"{s3_bucket}/labels/_lease.json", b"{}")
    assert foreign_files(out, s3_endpoint=s3_server) == []
    # ... but without a run record nothing is provably ours: markers are refused whatever the flag
    with pytest.raises(ForeignFilesError, match="_committed/s1.json"):
        check_output_owned(out, {"s1"}, allow_foreign_files=True, s3_endpoint=s3_server)
    fs.rm([f"{s3_bucket}/labels/_committed/s1.json", f"{s3_bucket}/labels/s1.parquet"])
    fs.pipe_file(f"{s3_bucket}/labels/user/notes.parquet", b"mine")
    assert foreign_files(out, s3_endpoint=s3_server) == ["user/notes.parquet"]
    with pytest.raises(ForeignFilesError, match="user/notes.parquet"):
        check_output_owned(out, {"s1"}, allow_foreign_files=False, s3_endpoint=s3_server)
    check_output_owned(out, {"s1"}, allow_foreign_files=True, s3_endpoint=s3_server)
    assert fs.cat_file(f"{s3_bucket}/labels/user/notes.parquet") == b"mine"


def test_shard_names_name_the_colliding_shards():
    from ovsam_ray.data.shards import ShardSpecError, shard_names

    assert shard_names(["a/s.tar", "a/t.tgz"]) == ["s", "t"]
    with pytest.raises(ShardSpecError, match=r"a/s\.tar and b/s\.tar\.gz"):
        shard_names(["a/s.tar", "b/s.tar.gz"])


def test_relabel_takes_the_output_lease(tmp_path):
    import time

    from ovsam_ray.pipeline.lease import LEASE_NAME
    from ovsam_ray.pipeline.relabel import RelabelConfig, run_relabel

    _label_output(tmp_path / "X")
    out = tmp_path / "Y"
    out.mkdir()
    (out / LEASE_NAME).write_text(
        json.dumps(
            {
                "job_id": "a" * 32,
                "host": "elsewhere",
                "pid": 7,
                "heartbeat": time.time(),
                "heartbeat_at": "now",
                "interval_s": 30,
            }
        )
    )
    with pytest.raises(RuntimeError, match="in use by another"):
        run_relabel(RelabelConfig(input=str(tmp_path / "X"), output=str(out), vocab="v.txt"))
    assert sorted(os.listdir(out)) == [LEASE_NAME]
