"""Exports, ``show`` and ``convert`` never replace a file they did not write: a user's file at a name
they would write is refused (exit 2, nothing written), with or without --overwrite; a rerun over
their own finished output needs --overwrite; files they would not write never block. None of these
tests starts Ray."""

from __future__ import annotations

import hashlib
import json
import logging
import os

import pytest
from coco_fixture import coco_label_output

from ovsam_ray.cli import main
from ovsam_ray.written import MANIFEST_NAME, OutputClashError, writing


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> dict[str, str]:
    return coco_label_output(str(tmp_path_factory.mktemp("overwrite")))


def _export(fmt: str, *extra: str):
    def argv(d: dict[str, str], out: str) -> list[str]:
        return ["export", fmt, "--input", d["labels"], "--shards", d["shards"], "--output", out, *extra]

    return argv


def _show(d: dict[str, str], out: str) -> list[str]:
    return ["show", "--input", d["labels"], "--shards", d["shards"], "--output", out, "-n", "8"]


def _convert(d: dict[str, str], out: str) -> list[str]:
    return ["convert", "coco", "--annotations", d["annotations"], "--images", d["images"], "--output", out]


# (command line, the file name --output gets below the output folder, a name the command writes there)
WRITERS = {
    "coco": (_export("coco"), "coco.json", "coco.json"),
    "coco-images": (_export("coco", "--with-images"), "coco.json", "images/shard-000000/000000000005.png"),
    "yolo": (_export("yolo"), "", "labels/shard-000000/000000000005.txt"),
    "yolo-yaml": (_export("yolo"), "", "data.yaml"),
    "labelstudio": (_export("labelstudio"), "ls.json", "ls.config.xml"),
    "sa1b": (_export("sa1b"), "", "shard-000000/000000000005.json"),
    "wds": (_export("wds"), "", "shard-000000.tar"),
    "show": (_show, "", "shard-000000/000000000005.png"),
    "convert": (_convert, "", "shard-000000.tar"),
    "convert-summary": (_convert, "", "_convert.json"),
}


def _snapshot(root) -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                out[os.path.relpath(os.path.join(folder, name), root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_users_file_where_a_command_would_write_is_refused_and_nothing_is_written(
    writer, labelled, tmp_path, bystanders, caplog
):
    argv, name, clash = WRITERS[writer]
    folder = tmp_path / "out"
    bystanders.around(folder)
    user_file = folder / clash
    user_file.parent.mkdir(parents=True, exist_ok=True)
    user_file.write_bytes(b"the user's own file\n")
    before = _snapshot(folder)
    out = str(folder / name) if name else str(folder)
    for flags in ([], ["--overwrite"]):
        caplog.clear()
        assert main(argv(labelled, out) + flags) == 2
        assert _snapshot(folder) == before, "nothing is written when the command refuses"
        [line] = _errors(caplog)
        assert "--output" in line and clash in line and "no earlier" in line


@pytest.mark.parametrize("writer", ["coco", "labelstudio", "yolo", "sa1b", "wds", "show", "convert"])
def test_a_rerun_over_its_own_output_needs_overwrite_and_files_it_does_not_write_never_block(
    writer, labelled, tmp_path, bystanders, caplog
):
    argv, name, _ = WRITERS[writer]
    folder = tmp_path / "out"
    bystanders.around(folder)  # a user's .parquet, .json and .tar beside and inside: none has a name we write
    out = str(folder / name) if name else str(folder)
    assert main(argv(labelled, out)) == 0
    first = _snapshot(folder)
    caplog.clear()
    assert main(argv(labelled, out)) == 2
    [line] = _errors(caplog)
    assert "--output" in line and "--overwrite" in line and "earlier" in line
    assert _snapshot(folder) == first
    assert main(argv(labelled, out) + ["--overwrite"]) == 0
    assert set(_snapshot(folder)) == set(first)


def test_overwrite_replaces_only_what_the_earlier_run_listed(labelled, tmp_path, bystanders):
    folder = tmp_path / "out"
    out = str(folder / "coco.json")
    assert main(_export("coco")(labelled, out)) == 0  # no images copied
    user_image = folder / "images" / "shard-000000" / "000000000005.png"
    user_image.parent.mkdir(parents=True)
    user_image.write_bytes(b"the user's own picture\n")
    bystanders.files[str(user_image)] = hashlib.sha256(user_image.read_bytes()).hexdigest()
    assert main(_export("coco", "--with-images")(labelled, out) + ["--overwrite"]) == 2


def test_an_interrupted_run_is_completed_by_a_rerun_without_overwrite(tmp_path):
    folder = str(tmp_path / "out")
    with pytest.raises(RuntimeError), writing(folder, "export sa1b", ["a.json"]):
        (tmp_path / "out" / "a.json").write_text("{}")
        raise RuntimeError("killed")
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert manifest["commands"]["export sa1b"] == {"status": "writing", "files": ["a.json"], "patterns": []}
    with writing(folder, "export sa1b", ["a.json", "b.json"]):
        pass
    with pytest.raises(OutputClashError, match="--overwrite"), writing(folder, "export sa1b", ["a.json"]):
        pass
    # another command's files are not this command's proof
    with pytest.raises(OutputClashError, match="no earlier"), writing(folder, "export yolo", ["a.json"]):
        pass


def test_a_manifest_we_did_not_write_is_refused(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text('{"mine": true}')
    with pytest.raises(OutputClashError, match=MANIFEST_NAME), writing(str(tmp_path), "show", ["x.png"]):
        pass
    assert (tmp_path / MANIFEST_NAME).read_text() == '{"mine": true}'


def test_an_interrupted_convert_claims_its_shards_until_it_completes(tmp_path):
    folder = str(tmp_path / "out")
    pattern = r"shard-[0-9]{6}\.tar"
    with pytest.raises(RuntimeError), writing(folder, "convert", [], patterns=[pattern]):
        (tmp_path / "out" / "shard-000003.tar").write_bytes(b"")
        raise RuntimeError("killed")
    with writing(folder, "convert", ["shard-000003.tar"], patterns=[pattern]) as claim:
        claim.add(["shard-000000.tar"])
    entry = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())["commands"]["convert"]
    assert entry["status"] == "complete" and entry["files"] == ["shard-000000.tar", "shard-000003.tar"]


def test_on_s3_a_users_object_is_refused_and_our_own_is_replaced_with_overwrite(labelled, s3_server, s3_bucket):
    from ovsam_ray import storage
    from ovsam_ray.export import export_coco, export_sa1b

    out = f"s3://{s3_bucket}/export"
    users = storage.join(out, "shard-000000", "000000000005.json")
    storage.atomic_write_bytes(users, b"mine", s3_endpoint=s3_server)
    with pytest.raises(OutputClashError, match="000000000005.json"):
        export_sa1b(labelled["labels"], out, overwrite=True, s3_endpoint=s3_server)
    assert storage.read_bytes(users, s3_endpoint=s3_server) == b"mine"
    assert not storage.exists(storage.join(out, "shard-000000", "000000000009.json"), s3_endpoint=s3_server)

    coco = storage.join(out, "coco.json")
    assert export_coco(labelled["labels"], coco, s3_endpoint=s3_server)["images"] == 3
    with pytest.raises(OutputClashError, match="--overwrite"):
        export_coco(labelled["labels"], coco, s3_endpoint=s3_server)
    assert export_coco(labelled["labels"], coco, overwrite=True, s3_endpoint=s3_server)["images"] == 3
