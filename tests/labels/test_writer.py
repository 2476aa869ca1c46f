"""Output side: schema, atomic per-shard commits (local and S3), run record checks."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ovsam_ray import storage
from ovsam_ray.data.rle import decode_rle, encode_masks
from ovsam_ray.labels.committer import MissingShardFileError, ShardCommitter
from ovsam_ray.labels.run_record import RunMismatchError, RunRecord, check_or_write_run_record
from ovsam_ray.labels.schema import INSTANCE_TYPE, OUTPUT_SCHEMA, V3_INSTANCE_FIELDS, rows_to_table


def _instance(prompt_type: str, mask: np.ndarray, **extra) -> dict:
    (rle,) = encode_masks(mask[None])
    return {
        "prompt_type": prompt_type,
        "prompt_box": np.array([1, 1, 4, 3], np.float32) if prompt_type == "box" else None,
        "point": np.array([2, 2], np.float32) if prompt_type == "point" else None,
        "bbox": np.array([1, 1, 4, 3], np.float32),
        "area": int(mask.sum()),
        "rle": rle,
        "label": "circle",
        "label_id": 0,
        "label_score": np.float32(0.75),
        "topk_labels": ["circle", "square"],
        "topk_scores": np.array([0.75, 0.2], np.float32),
        **extra,
    }


def _rows(shard: str = "shard-000000") -> list[dict]:
    mask = np.zeros((5, 6), bool)
    mask[1:3, 1:4] = True
    return [
        {
            "key": "a",
            "shard": shard,
            "image_id": 7,
            "width": 6,
            "height": 5,
            "status": "ok",
            "error": None,
            "instances": [
                _instance(
                    "box",
                    mask,
                    detector_score=np.float32(0.9),
                    detector_label="ball",
                    embedding=np.arange(8, dtype=np.float16),
                ),
                _instance("point", mask, detector_score=float("nan")),
            ],
        },
        {"key": "b", "shard": shard, "status": "error", "error": "truncated or corrupt image"},
        {"key": "c", "shard": shard, "width": 6, "height": 5, "status": "ok", "instances": []},
    ]


def test_schema_matches_design():
    assert OUTPUT_SCHEMA.names == [
        "key",
        "shard",
        "image_id",
        "width",
        "height",
        "status",
        "error",
        "instances",
        "warnings",
    ]
    assert OUTPUT_SCHEMA.field("warnings").type == pa.list_(pa.string()) and OUTPUT_SCHEMA.field("warnings").nullable
    assert OUTPUT_SCHEMA.metadata[b"ovsam_ray.schema_version"] == b"3"
    inst = OUTPUT_SCHEMA.field("instances").type.value_type
    assert [inst.field(i).name for i in range(inst.num_fields)] == [
        "prompt_type",
        "prompt_box",
        "point",
        "detector_score",
        "detector_label",
        "bbox",
        "area",
        "rle",
        "label",
        "label_id",
        "label_score",
        "topk_labels",
        "topk_scores",
        "embedding",
        "clip_embedding",
        "clip_valid",
        "label_margin",
        "stability_score",
        "box_iou",
        "label_agrees",
        "review",
        "detector_rle",
        "source",
        "shard_label",
    ]
    for name in V3_INSTANCE_FIELDS:  # version 3's additions: nullable, so older files read them as null
        assert inst.field(name).nullable
    assert inst.field("detector_rle").type == inst.field("rle").type and inst.field("detector_rle").nullable
    assert inst.field("prompt_box").type == pa.list_(pa.float32(), 4)
    assert inst.field("point").type == pa.list_(pa.float32(), 2)
    assert inst.field("embedding").type == pa.list_(pa.float16()) and inst.field("embedding").nullable
    assert inst.field("rle").type == pa.struct([("size", pa.list_(pa.int32(), 2)), ("counts", pa.string())])
    assert OUTPUT_SCHEMA.field("image_id").type == pa.string()


def test_rows_to_table_normalises():
    table = rows_to_table(_rows())
    assert table.schema.equals(OUTPUT_SCHEMA) and table.num_rows == 3
    rows = table.to_pylist()
    assert rows[0]["image_id"] == "7" and rows[1]["instances"] == [] and rows[1]["width"] is None
    box, point = rows[0]["instances"]
    assert box["detector_score"] == pytest.approx(0.9) and point["detector_score"] is None  # NaN -> null
    assert box["embedding"] == list(range(8)) and point["embedding"] is None
    assert point["prompt_box"] is None and point["point"] == [2.0, 2.0]
    assert rows_to_table([]).num_rows == 0


@pytest.mark.parametrize(
    "row, message",
    [
        ({"key": "a", "shard": "s", "status": "fine"}, "status must be one of"),
        ({"key": "a", "shard": "s", "status": "error"}, "needs an 'error' message"),
        ({"key": "", "shard": "s", "status": "ok"}, "required"),
        ({"key": "a", "shard": "s", "status": "ok", "colour": 1}, "unknown fields"),
    ],
)
def test_rows_to_table_rejects_bad_rows(row, message):
    with pytest.raises(ValueError, match=message):
        rows_to_table([row])


def test_commit_local_and_read_back(tmp_path):
    out = str(tmp_path / "out")
    committer = ShardCommitter(out)
    assert not committer.is_committed("shard-000000") and committer.committed_shards() == set()
    marker = committer.commit("shard-000000", rows_to_table(_rows()), {"seconds": 1.5, "damage": None})
    assert {k: marker[k] for k in ("shard", "parquet", "num_rows", "num_ok", "num_error", "num_instances")} == {
        "shard": "shard-000000",
        "parquet": "shard-000000.parquet",
        "num_rows": 3,
        "num_ok": 2,
        "num_error": 1,
        "num_instances": 2,
    }
    assert marker["stats"] == {"seconds": 1.5, "damage": None} and len(marker["sha256"]) == 64
    assert committer.read_marker("shard-000000") == marker
    assert sorted(os.listdir(out)) == ["_committed", "shard-000000.parquet"]
    assert committer.is_committed("shard-000000") and committer.committed_shards() == {"shard-000000"}
    table = pq.read_table(committer.parquet_url("shard-000000"))
    assert table.schema.equals(OUTPUT_SCHEMA)
    df = pd.read_parquet(out)  # the folder: markers and temporaries are invisible to readers
    assert df["key"].tolist() == ["a", "b", "c"] and df["status"].tolist() == ["ok", "error", "ok"]
    rle = df["instances"][0][0]["rle"]
    mask = decode_rle({"size": list(rle["size"]), "counts": rle["counts"]})
    assert mask.shape == (5, 6) and mask.sum() == 6 == df["instances"][0][0]["area"]


def test_marker_is_written_last_and_failures_leave_nothing_visible(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    committer = ShardCommitter(out)
    written = []
    real_write = storage.atomic_write_bytes

    def recording_write(url, data, **kw):
        written.append(url.rsplit("/", 2)[-2:])
        if "fail" in url and url.endswith(".parquet"):
            raise OSError("connection reset")
        real_write(url, data, **kw)

    monkeypatch.setattr(storage, "atomic_write_bytes", recording_write)
    committer.commit("s1", rows_to_table(_rows("s1")))
    assert written == [["out", "s1.parquet"], ["_committed", "s1.json"]]
    with pytest.raises(OSError):
        committer.commit("fail", rows_to_table(_rows("fail")))
    assert not committer.is_committed("fail") and sorted(os.listdir(out)) == ["_committed", "s1.parquet"]


def test_uncommitted_parquet_is_ignored_overwritten_and_cleaned(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    committer = ShardCommitter(out)
    committer.commit("s1", rows_to_table(_rows("s1")))
    # a crash between the Parquet file and its marker
    real_write = storage.atomic_write_bytes

    def killed_before_marker(url, data, **kw):
        if url.endswith("s2.json"):
            raise OSError("killed")
        real_write(url, data, **kw)

    monkeypatch.setattr(storage, "atomic_write_bytes", killed_before_marker)
    with pytest.raises(OSError):
        committer.commit("s2", rows_to_table(_rows("s2")))
    monkeypatch.undo()
    assert os.path.exists(os.path.join(out, "s2.parquet")) and not committer.is_committed("s2")
    assert committer.committed_shards() == {"s1"}
    assert committer.committed_parquet_urls() == [os.path.join(out, "s1.parquet")]
    # stray temporaries from a killed writer
    (tmp_path / "out" / f".s3.parquet.tmp-{'0' * 32}").write_bytes(b"partial")
    (tmp_path / "out" / "notes.txt").write_text("user file")
    removed = committer.cleanup_temporaries({"s1", "s2", "s3"})
    assert sorted(r.rsplit("/", 1)[-1] for r in removed) == [f".s3.parquet.tmp-{'0' * 32}", "s2.parquet"]
    assert sorted(os.listdir(out)) == ["_committed", "notes.txt", "s1.parquet"]
    # a rerun commits s2 normally
    committer.commit("s2", rows_to_table(_rows("s2")))
    assert committer.committed_shards() == {"s1", "s2"}


def test_commit_rejects_foreign_tables_and_names(tmp_path):
    committer = ShardCommitter(str(tmp_path))
    with pytest.raises(ValueError, match="OUTPUT_SCHEMA"):
        committer.commit("s", pa.table({"key": ["a"]}))
    with pytest.raises(ValueError, match="invalid shard name"):
        committer.commit("a/b", rows_to_table([]))
    # nullability/metadata lost on the way (e.g. through Ray Data) is fine
    loose = pa.schema([pa.field(f.name, f.type) for f in OUTPUT_SCHEMA])
    committer.commit("s", rows_to_table(_rows("s")).cast(loose))
    assert pq.read_schema(committer.parquet_url("s")).equals(OUTPUT_SCHEMA)


def _version_1(table: pa.Table) -> pa.Table:
    """``table`` as schema version 1 wrote it (no ``warnings`` column)."""
    old = pa.schema([f for f in OUTPUT_SCHEMA if f.name != "warnings"], metadata={"ovsam_ray.schema_version": "1"})
    return table.select(old.names).cast(old)


def test_version_1_files_still_read_and_recommit(tmp_path):
    from ovsam_ray.labels.reader import iter_label_rows

    out = str(tmp_path / "old")
    committer = ShardCommitter(out)
    committer.commit("s", rows_to_table(_rows("s")))
    pq.write_table(_version_1(rows_to_table(_rows("s"))), committer.parquet_url("s"))  # as an old run left it
    rows = list(iter_label_rows(out))
    assert [r["key"] for r in rows] == ["a", "b", "c"] and "warnings" not in rows[0]
    assert [r["status"] for r in iter_label_rows(out, columns=["key", "status"])] == ["ok", "error", "ok"]
    # a version-1 table (relabel of an old output) commits as version 2 with null warnings
    committer.commit("t", _version_1(rows_to_table(_rows("t"))))
    table = pq.read_table(committer.parquet_url("t"))
    assert table.schema.equals(OUTPUT_SCHEMA) and table.column("warnings").to_pylist() == [None] * 3
    with_warnings = rows_to_table([{**_rows("u")[0], "warnings": ["box 3 dropped: NaN"]}])
    assert with_warnings.column("warnings").to_pylist() == [["box 3 dropped: NaN"]]


def _version_2(table: pa.Table) -> pa.Table:
    """``table`` as schema version 2 wrote it (instances without the version-3 fields)."""
    old_inst = pa.struct([f for f in INSTANCE_TYPE if f.name not in V3_INSTANCE_FIELDS])
    fields = [pa.field("instances", pa.list_(old_inst)) if f.name == "instances" else f for f in OUTPUT_SCHEMA]
    old = pa.schema(fields, metadata={"ovsam_ray.schema_version": "2"})
    rows = table.to_pylist()
    for row in rows:
        for inst in row["instances"] or []:
            for name in V3_INSTANCE_FIELDS:
                del inst[name]
    return pa.Table.from_pylist(rows, schema=old)


def test_version_2_files_read_as_they_are_and_recommit_as_version_3(tmp_path):
    from ovsam_ray.labels.reader import iter_label_rows

    out = str(tmp_path / "v2")
    committer = ShardCommitter(out)
    committer.commit("s", rows_to_table(_rows("s")))
    pq.write_table(_version_2(rows_to_table(_rows("s"))), committer.parquet_url("s"))
    rows = list(iter_label_rows(out))
    assert rows[0]["instances"] and "label_margin" not in rows[0]["instances"][0]  # read as written
    committer.commit("t", _version_2(rows_to_table(_rows("t"))))  # a relabel of a version-2 output
    table = pq.read_table(committer.parquet_url("t"))
    assert table.schema.equals(OUTPUT_SCHEMA)
    inst = table.column("instances").to_pylist()[0][0]
    assert all(inst[name] is None for name in V3_INSTANCE_FIELDS)
    assert inst["label"] == _rows("t")[0]["instances"][0]["label"]


def _without_detector_rle(table: pa.Table) -> pa.Table:
    """``table`` as written before instances had ``detector_rle``."""
    inst = OUTPUT_SCHEMA.field("instances").type.value_type
    old = pa.struct([inst.field(i) for i in range(inst.num_fields) if inst.field(i).name != "detector_rle"])
    col = table.column("instances").combine_chunks()
    values = pa.StructArray.from_arrays([col.values.field(f.name) for f in old], fields=list(old))
    return table.set_column(
        table.column_names.index("instances"), "instances", pa.ListArray.from_arrays(col.offsets, values)
    )


def test_files_without_detector_rle_still_read_and_recommit(tmp_path):
    from ovsam_ray.labels.reader import iter_label_rows

    out = str(tmp_path / "old")
    committer = ShardCommitter(out)
    old = _without_detector_rle(rows_to_table(_rows("s")))
    assert "detector_rle" not in str(old.schema.field("instances").type)
    committer.commit("s", rows_to_table(_rows("s")))
    pq.write_table(old, committer.parquet_url("s"))  # as a run before the field left it
    rows = list(iter_label_rows(out))
    assert [len(r["instances"] or []) for r in rows] == [len(x.get("instances") or []) for x in _rows("s")]
    # recommitted (a resumed job's parts, a relabel) with the field null
    committer.commit("t", old)
    table = pq.read_table(committer.parquet_url("t"))
    assert table.schema.equals(OUTPUT_SCHEMA)
    insts = [i for r in table.to_pylist() for i in r["instances"] or []]
    assert insts and all(i["detector_rle"] is None for i in insts)
    assert [i["rle"] for i in insts] == [i["rle"] for r in old.to_pylist() for i in r["instances"] or []]
    # and a row dict written without the key gets it null
    assert all(i["detector_rle"] is None for r in rows_to_table(rows).to_pylist() for i in r["instances"] or [])


def test_marker_without_parquet_is_a_clear_error(tmp_path):
    from ovsam_ray.labels.reader import iter_label_rows

    out = str(tmp_path / "out")
    committer = ShardCommitter(out)
    for name in ("s1", "s2"):
        committer.commit(name, rows_to_table(_rows(name)))
    os.remove(committer.parquet_url("s2"))
    assert committer.markers_without_parquet() == ["s2"]
    with pytest.raises(MissingShardFileError) as err:
        list(iter_label_rows(out))
    message = str(err.value)
    assert "shard s2" in message and "_committed/s2.json" in message and "s2.parquet is missing" in message
    assert "Rerun the label job" in message and "\n" not in message


def test_commit_s3(s3_server, s3_bucket):
    out = f"s3://{s3_bucket}/labels/"
    committer = ShardCommitter(out, s3_endpoint=s3_server)
    committer.commit("shard-000001", rows_to_table(_rows("shard-000001")), {"aws_secret_access_key": "oops"})
    assert committer.committed_shards() == {"shard-000001"} and committer.is_committed("shard-000001")
    assert committer.read_marker("shard-000001")["stats"] == {"aws_secret_access_key": "***"}
    fs, path = storage.get_filesystem(committer.parquet_url("shard-000001"), s3_endpoint=s3_server)
    table = pq.read_table(path, filesystem=fs)
    assert table.num_rows == 3 and table.schema.equals(OUTPUT_SCHEMA)
    assert storage.list_files(out, s3_endpoint=s3_server) == [f"s3://{s3_bucket}/labels/shard-000001.parquet"]


IDENTITY = {
    "model": "ovsam_rn50x16",
    "weights_sha256": {"sam": "aa", "clip": "bb"},
    "vocab_sha256": "cc",
    "thresholds": {"mask": 0.0},
    "random_init": False,
}


def test_run_record_create_resume_mismatch_overwrite(tmp_path):
    out = str(tmp_path / "out")
    details = {"config": {"output": out, "aws_secret_access_key": "hidden"}, "code_version": "0.1.0"}
    assert check_or_write_run_record(out, RunRecord(IDENTITY, details)) == "created"
    stored = json.loads(storage.read_bytes(os.path.join(out, "_run.json")))
    assert stored["identity"] == IDENTITY and stored["details"]["config"]["aws_secret_access_key"] == "***"
    assert "hidden" not in json.dumps(stored)
    # same identity, other details: continue
    assert check_or_write_run_record(out, RunRecord(dict(IDENTITY), {"code_version": "0.1.1"})) == "resumed"
    committer = ShardCommitter(out)
    committer.commit("s1", rows_to_table(_rows("s1")))
    (tmp_path / "out" / "keep.txt").write_text("not ours")
    changed = {**IDENTITY, "vocab_sha256": "dd", "weights_sha256": {"sam": "aa", "clip": "ee"}}
    with pytest.raises(RunMismatchError) as err:
        check_or_write_run_record(out, RunRecord(changed))
    assert "vocab_sha256: 'cc' -> 'dd'" in str(err.value) and "weights_sha256.clip" in str(err.value)
    assert "weights_sha256.sam" not in str(err.value) and "overwrite" in str(err.value)
    assert committer.committed_shards() == {"s1"}  # refused: nothing touched
    assert check_or_write_run_record(out, RunRecord(changed), overwrite=True) == "overwritten"
    assert committer.committed_shards() == set()
    assert sorted(os.listdir(out)) == ["_committed", "_run.json", "keep.txt"]
    assert json.loads(storage.read_bytes(os.path.join(out, "_run.json")))["identity"] == changed


def test_outputs_without_run_record_are_refused(tmp_path):
    out = str(tmp_path / "out")
    ShardCommitter(out).commit("s1", rows_to_table(_rows("s1")))
    with pytest.raises(RunMismatchError, match="no run record"):
        check_or_write_run_record(out, RunRecord(IDENTITY))
    assert check_or_write_run_record(out, RunRecord(IDENTITY), overwrite=True) == "overwritten"
    assert not ShardCommitter(out).committed_shards()


def test_run_record_on_s3(s3_server, s3_bucket):
    out = f"s3://{s3_bucket}/run"
    kw = {"s3_endpoint": s3_server}
    assert check_or_write_run_record(out, RunRecord(IDENTITY), **kw) == "created"
    ShardCommitter(out, **kw).commit("s1", rows_to_table(_rows("s1")))
    assert check_or_write_run_record(out, RunRecord(IDENTITY), **kw) == "resumed"
    with pytest.raises(RunMismatchError, match="random_init"):
        check_or_write_run_record(out, RunRecord({**IDENTITY, "random_init": True}), **kw)
    assert (
        check_or_write_run_record(out, RunRecord({**IDENTITY, "random_init": True}), overwrite=True, **kw)
        == "overwritten"
    )
    assert storage.list_files(out, recursive=True, **kw) == [f"{out}/_run.json"]
