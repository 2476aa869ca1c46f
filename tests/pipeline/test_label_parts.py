"""The label job's result path: typed instance columns, part files, commit tasks, the box-fill
baseline, a driver that never sees a row, and exactly-once when a worker, a commit task or the
driver is killed midway."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import pytest

from ovsam_ray.data.rle import box_fill_mask, box_fill_rles, decode_rle, encode_masks
from ovsam_ray.data.synthetic import generate_shards
from ovsam_ray.inference import ModelConfig
from ovsam_ray.labels.committer import ShardCommitter
from ovsam_ray.labels.records import InstanceColumns
from ovsam_ray.labels.schema import INSTANCE_TYPE, OUTPUT_SCHEMA
from ovsam_ray.pipeline import parts
from ovsam_ray.pipeline.label_job import LabelConfig, run_label
from ovsam_ray.pipeline.predict_stage import RESULT_SCHEMA


def test_box_fill_rles_equal_the_drawn_masks_byte_for_byte():
    rng = np.random.default_rng(0)
    h, w = 13, 17
    boxes = np.concatenate(
        [
            rng.uniform(-3, 20, (40, 4)),
            [
                [0, 0, w, h],
                [0, 2, w, 5],
                [3, 0, 4, h],
                [5, 5, 5, 9],
                [w, h, w, h],
                [0.6, 0.6, 1.4, 1.4],
                [16.5, 12.5, 17, 13],
            ],
        ]
    ).astype(np.float32)
    boxes[:, [0, 2]] = np.sort(boxes[:, [0, 2]], axis=1)
    boxes[:, [1, 3]] = np.sort(boxes[:, [1, 3]], axis=1)
    rles, mask_boxes, areas = box_fill_rles(boxes, height=h, width=w)
    drawn = np.stack([box_fill_mask(b, h, w) for b in boxes])
    assert rles == encode_masks(drawn)
    assert (areas == drawn.sum(axis=(1, 2))).all()
    for mask, box in zip(drawn, mask_boxes):
        ys, xs = np.nonzero(mask)
        expected = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if len(xs) else [0, 0, 0, 0]
        assert box.tolist() == expected


def test_box_fill_rles_empty_input():
    rles, boxes, areas = box_fill_rles(np.zeros((0, 4)), height=4, width=4)
    assert rles == [] and boxes.shape == (0, 4) and areas.shape == (0,)


def test_instance_columns_empty_images_and_types():
    cols = InstanceColumns()
    cols.add_empty()
    cols.add_box_fill(np.zeros((0, 4)), height=5, width=5)
    arr = cols.to_arrow()
    assert arr.type == pa.list_(INSTANCE_TYPE) and arr.to_pylist() == [[], []]
    assert InstanceColumns().to_arrow().to_pylist() == []


def test_instance_columns_box_fill_labels_and_points():
    from ovsam_ray.vocabulary import Vocabulary

    vocab = Vocabulary(
        name="v",
        class_names=("cat", "dog"),
        synonyms=(("cat",), ("dog",)),
        seen=(True, True),
        excluded=(False, False),
        class_ids=(7, 9),
    )
    cols = InstanceColumns(vocab)
    cols.add_box_fill(
        np.array([[1, 1, 3, 4], [0, 0, 2, 2]], np.float32),
        points=np.array([[2.7, 1.2]]),
        height=6,
        width=5,
        detector_scores=[0.5, None],
        detector_labels=["dog", "zebra"],
    )
    a, b, p = cols.to_arrow().to_pylist()[0]
    assert (a["label"], a["label_id"], a["label_score"], a["detector_score"]) == ("dog", 9, 0.5, 0.5)
    assert (b["label"], b["label_id"], b["label_score"]) == ("zebra", None, None)  # not in the vocabulary
    assert p["prompt_type"] == "point" and p["prompt_box"] is None and p["point"] == pytest.approx([2.7, 1.2])
    assert p["area"] == 1 and decode_rle(p["rle"])[1, 2] and p["bbox"] == [2, 1, 3, 2]
    assert a["topk_labels"] == [] and a["embedding"] is None


def _result_rows(shard: str, indices: list[int], total: int, skipped: str = "") -> pa.Table:
    cols = InstanceColumns()
    for _ in indices:
        cols.add_box_fill(np.array([[0, 0, 2, 2]], np.float32), height=4, width=4)
    n = len(indices)
    return pa.table(
        {
            "key": [f"k{i}" for i in indices],
            "shard": [shard] * n,
            "index": pa.array(indices, pa.int32()),
            "shard_total": pa.array([total] * n, pa.int32()),
            "shard_damage": [""] * n,
            "shard_skipped": [skipped] * n,
            "image_id": pa.array([None] * n, pa.string()),
            "width": pa.array([4] * n, pa.int32()),
            "height": pa.array([4] * n, pa.int32()),
            "status": ["ok"] * n,
            "error": pa.array([None] * n, pa.string()),
            "instances": cols.to_arrow(),
            "warnings": pa.array([None] * n, pa.list_(pa.string())),
            "num_prompts": pa.array([1] * n, pa.int32()),
        },
        schema=RESULT_SCHEMA,
    )


def test_commit_shard_keeps_one_row_per_index_and_refuses_gaps(tmp_path):
    out = str(tmp_path / "out")
    first = parts.write_parts(_result_rows("s", [0, 1, 2], 5), output=out).to_pylist()
    again = parts.write_parts(_result_rows("s", [2, 1], 5), output=out).to_pylist()  # a retried task's rows
    urls = [first[0]["part"], again[0]["part"]]
    assert parts.commit_shard(out, "s", urls, 5, "") == {"shard": "s", "missing": 2}
    assert not ShardCommitter(out).committed_shards()  # nothing written for an incomplete shard
    rest = parts.write_parts(_result_rows("s", [4, 3], 5), output=out).to_pylist()
    orphan = parts.write_parts(_result_rows("s", [0], 5), output=out)  # a dead attempt's part: never named
    assert orphan.num_rows == 1
    res = parts.commit_shard(out, "s", urls + [rest[0]["part"]], 5, "")
    assert (res["ok"], res["error"], res["masks"]) == (5, 0, 5)
    table = pds.dataset(out, format="parquet").to_table()
    assert table.schema.names == OUTPUT_SCHEMA.names and table.column("key").to_pylist() == [f"k{i}" for i in range(5)]
    assert not os.path.exists(parts.parts_url(out, "s"))  # parts deleted, the orphan with them
    assert json.load(open(os.path.join(out, "_stats", "s.json")))["masks"] == 5
    # A retried commit task that finds the marker returns its counts without rewriting the file.
    marker = ShardCommitter(out).read_marker("s")
    assert parts.commit_shard(out, "s", [], 5, "")["ok"] == 5
    assert ShardCommitter(out).read_marker("s") == marker


def test_commit_shard_rides_out_a_storage_blip_on_its_reads(tmp_path, monkeypatch):
    """The commit task's reads (its marker check, the parts) are retried like its writes: Ray does
    not retry a task that raised, so one refused connection would otherwise fail the shard (a CI
    run lost shard 20 of the S3-outage test this way)."""
    out = str(tmp_path / "out")
    urls = [m["part"] for m in parts.write_parts(_result_rows("s", [0, 1, 2], 3), output=out).to_pylist()]
    monkeypatch.setattr(parts, "COMMIT_BACKOFF_S", 0.0)
    failures = {"is_committed": 1, "read_bytes": 1}

    def flaky(name, real):
        def call(*args, **kwargs):
            if failures[name]:
                failures[name] -= 1
                raise ConnectionError("Could not connect to the endpoint URL")
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(ShardCommitter, "is_committed", flaky("is_committed", ShardCommitter.is_committed))
    monkeypatch.setattr(parts.storage, "read_bytes", flaky("read_bytes", parts.storage.read_bytes))
    res = parts.commit_shard(out, "s", urls, 3, "")
    assert failures == {"is_committed": 0, "read_bytes": 0} and res["ok"] == 3
    assert ShardCommitter(out).committed_shards() == {"s"}
    # A part that is gone is not a blip: no retries, the task fails at once (the shard stays uncommitted).
    urls = [m["part"] for m in parts.write_parts(_result_rows("t", [0], 1), output=out).to_pylist()]
    os.remove(urls[0])
    with pytest.raises(FileNotFoundError):
        parts.commit_shard(out, "t", urls, 1, "")


def test_write_parts_groups_by_shard_and_passes_shard_events(tmp_path):
    out = str(tmp_path / "out")
    batch = pa.concat_tables([_result_rows("a", [0, 1], 2), _result_rows("b", [0], 3)])
    marker = _result_rows("c", [0], 0).to_pylist()[0]
    marker.update(status="shard_failed", index=-1, shard_damage="not a tar", instances=[])
    meta = parts.write_parts(
        pa.concat_tables([batch, pa.Table.from_pylist([marker], schema=RESULT_SCHEMA)]), output=out
    ).to_pylist()
    by_shard = {m["shard"]: m for m in meta}
    assert (by_shard["a"]["rows"], by_shard["a"]["total"], by_shard["b"]["rows"]) == (2, 2, 1)
    assert by_shard["c"]["kind"] == "failed" and by_shard["c"]["damage"] == "not a tar"
    assert set(meta[0]) == set(parts.PART_SCHEMA.names)


def _labelled_shards(root: str, shards: int = 3, per_shard: int = 4) -> list[str]:
    return generate_shards(root, num_images=shards * per_shard, images_per_shard=per_shard, seed=5, image_size=(64, 48))


def test_box_fill_baseline_end_to_end(ray_local, shapes_vocab, tmp_path):
    src, out = str(tmp_path / "shards"), str(tmp_path / "labels")
    _labelled_shards(src)
    summary = run_label(
        LabelConfig(
            input=src,
            output=out,
            baseline="box-fill",
            batch_size=5,
            model=ModelConfig(preset="ovsam_tiny", random_init=True, vocab=shapes_vocab),
        )
    )
    assert summary.shards_committed == 3 and summary.images_ok == 12 and not summary.random_init
    df = pds.dataset(out, format="parquet").to_table().to_pandas()
    assert len(df) == 12 and (df.status == "ok").all()
    vocab = open(shapes_vocab).read().split()
    for _, row in df.iterrows():
        assert len(row.instances) >= 1
        for inst in row.instances:
            mask = decode_rle(inst["rle"])
            assert mask.shape == (row.height, row.width)
            assert (mask == box_fill_mask(inst["prompt_box"], row.height, row.width)).all()
            assert inst["label"] in vocab and inst["label_id"] is not None and inst["area"] == mask.sum()
    record = json.load(open(os.path.join(out, "_run.json")))
    assert record["identity"]["model"] == {"baseline": "box-fill"}


def test_driver_sees_part_metadata_never_rows(ray_local, shapes_vocab, tmp_path, monkeypatch):
    import ray.data

    seen = []
    original = ray.data.Dataset.iter_batches

    def spy(self, *args, **kwargs):
        for batch in original(self, *args, **kwargs):
            seen.append((tuple(batch.column_names), batch.num_rows))
            yield batch

    monkeypatch.setattr(ray.data.Dataset, "iter_batches", spy)
    src, out = str(tmp_path / "shards"), str(tmp_path / "labels")
    _labelled_shards(src, shards=2, per_shard=10)
    summary = run_label(
        LabelConfig(
            input=src,
            output=out,
            baseline="box-fill",
            batch_size=10,
            model=ModelConfig(preset="ovsam_tiny", random_init=True, vocab=shapes_vocab),
        )
    )
    assert summary.images_ok == 20
    assert seen and all(cols == tuple(parts.PART_SCHEMA.names) for cols, _ in seen)
    rows = sum(n for _, n in seen)
    assert rows == summary.driver_parts and rows <= 4  # one per part: 2 shards x <= 2 batches


def _cli(src: str, out: str, vocab: str, faults: str, flags_dir: str) -> tuple[int, str]:
    """The label CLI on its own local Ray with crash points armed; returns (exit code, stderr)."""
    env = {**os.environ, "OVSAM_RAY_FAULTS": faults, "OVSAM_RAY_FAULTS_DIR": flags_dir}
    cmd = [
        sys.executable,
        "-m",
        "ovsam_ray.cli",
        "label",
        "--input",
        src,
        "--output",
        out,
        "--baseline",
        "box-fill",
        "--vocab",
        vocab,
        "--batch-size",
        "3",
        "--ray-address",
        "local",
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the driver started in its session
        except ProcessLookupError:
            pass
    return proc.returncode, err


def _assert_exactly_once(out: str, images: int) -> None:
    df = pds.dataset(out, format="parquet").to_table().to_pandas()
    assert len(df) == images and not df.duplicated(["shard", "key"]).any() and (df.status == "ok").all()
    assert not os.path.exists(parts.parts_url(out)) or not os.listdir(parts.parts_url(out))
    assert not [f for f in os.listdir(out) if ".tmp-" in f]


def test_killed_part_writer_and_commit_tasks_are_retried_exactly_once(shapes_vocab, tmp_path):
    src, out, flags = str(tmp_path / "shards"), str(tmp_path / "labels"), tmp_path / "flags"
    flags.mkdir()
    _labelled_shards(src)
    code, err = _cli(src, out, shapes_vocab, "part_written,before_commit,after_commit", str(flags))
    assert code == 0, err[-3000:]
    assert sorted(os.listdir(flags)) == ["fired-after_commit", "fired-before_commit", "fired-part_written"]
    _assert_exactly_once(out, 12)


def test_driver_killed_between_parts_and_marker_then_rerun(ray_local, shapes_vocab, tmp_path):
    src, out, flags = str(tmp_path / "shards"), str(tmp_path / "labels"), tmp_path / "flags"
    flags.mkdir()
    _labelled_shards(src)
    code, err = _cli(src, out, shapes_vocab, "driver_before_commit", str(flags))
    assert code == 137, err[-3000:]
    committer = ShardCommitter(out)
    assert committer.committed_shards() == set() and os.listdir(parts.parts_url(out))  # parts, no marker
    summary = run_label(
        LabelConfig(
            input=src,
            output=out,
            baseline="box-fill",
            model=ModelConfig(preset="ovsam_tiny", random_init=True, vocab=shapes_vocab),
        )
    )
    assert summary.shards_committed == 3 and summary.images_ok == 12
    _assert_exactly_once(out, 12)


def test_model_actor_call_runs_forwards_of_batch_size_and_isolates_a_bad_image(monkeypatch):
    """One actor call (images_per_call rows) = forwards of ``forward_batch`` images; a forward that
    fails is retried image by image, so only the bad image becomes an error row."""
    from ovsam_ray.pipeline.predict_stage import PredictStage
    from ovsam_ray.pipeline.prompting import PromptSources, SelectConfig
    from ovsam_ray.pipeline.stages import DECODED_SCHEMA

    rows = []
    for i in range(7):
        rows.append(
            {
                "key": f"k{i}",
                "shard": "s",
                "index": i,
                "shard_total": 7,
                "shard_damage": "",
                "status": "ok",
                "width": 4,
                "height": 4,
                "in_h": 4,
                "in_w": 4,
                "image": bytes([i]) * 48,
                "boxes": [0, 0, 2, 2],
                "box_scores": [float("nan")],
                "box_labels": [None],
                "points": [],
                "point_boxes": None,
                "prompt_warnings": [],
            }
        )
    batch = pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)
    forwards = []

    def predict(stage, batch, idx, sets):
        forwards.append(list(idx))
        if 5 in idx:
            raise RuntimeError("bad image")
        return {}

    stage = PredictStage.__new__(PredictStage)
    stage.sources, stage.select, stage.forward_batch = PromptSources.parse("shard"), SelectConfig(), 3
    stage.vocab, stage.with_embedding = None, False
    monkeypatch.setattr(PredictStage, "_predict", predict)
    out = stage(batch).to_pylist()
    assert forwards == [[0, 1, 2], [3, 4, 5], [3], [4], [5], [6]]
    assert [r["status"] for r in out] == ["ok"] * 5 + ["error", "ok"]
    assert "bad image" in out[5]["error"]
