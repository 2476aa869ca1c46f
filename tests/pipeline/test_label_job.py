"""The label job end to end on a local Ray: exactly once, resumable, refuses mixed runs, S3."""

from __future__ import annotations

import json
import os

import pandas as pd
import pyarrow.dataset as pds
import pytest
from bad_inputs import BAD_INPUT_MAX_PIXELS, make_bad_input_shards

from ovsam_ray.data.rle import decode_rle
from ovsam_ray.data.shards import shard_name
from ovsam_ray.data.synthetic import generate_shards
from ovsam_ray.inference import ModelConfig
from ovsam_ray.labels.committer import ShardCommitter
from ovsam_ray.labels.run_record import RunMismatchError
from ovsam_ray.pipeline.label_job import LabelConfig, run_label


def tiny(vocab: str, **kw) -> ModelConfig:
    return ModelConfig(preset="ovsam_tiny", random_init=True, vocab=vocab, **kw)


def read_rows(output: str) -> pd.DataFrame:
    return pds.dataset(output, format="parquet").to_table().to_pandas()


def test_label_job_local_exactly_once_and_rerun_skips(ray_local, tmp_shards, shapes_vocab, tmp_path, bystanders):
    out = str(tmp_path / "labels")
    bystanders.beside(out)
    cfg = LabelConfig(input=os.path.dirname(tmp_shards[0]), output=out, model=tiny(shapes_vocab), batch_size=3)
    summary = run_label(cfg)
    assert summary.shards_committed == 3 and summary.images_ok == 10 and summary.images_error == 0
    assert not summary.failed(0.0)
    text = summary.to_dict()["text_embeddings"]  # computed once, on the driver's CPU (no GPU here)
    assert text["device"] == "cpu" and text["num_classes"] == len(open(shapes_vocab).read().split())
    assert text["seconds"] >= 0 and text["source"].startswith("CLIP text tower")

    df = read_rows(out)
    assert len(df) == 10 and df.key.is_unique
    assert set(df.shard) == {shard_name(u) for u in tmp_shards}
    assert (df.status == "ok").all() and df.error.isna().all()
    for _, row in df.iterrows():
        assert len(row.instances) >= 1
        for inst in row.instances:
            mask = decode_rle(inst["rle"])
            assert mask.shape == (row.height, row.width)
            assert inst["area"] == mask.sum()
            assert inst["label"] in open(shapes_vocab).read().split()
            assert len(inst["topk_labels"]) == 5 and inst["prompt_type"] == "box"
    record = json.load(open(os.path.join(out, "_run.json")))
    assert record["identity"]["model"]["random_init"] is True

    markers = {n: ShardCommitter(out).read_marker(n)["committed_at"] for n in ShardCommitter(out).committed_shards()}
    mtimes = {p: os.path.getmtime(os.path.join(out, p)) for p in os.listdir(out) if p.endswith(".parquet")}
    again = run_label(cfg)
    assert again.shards_skipped == 3 and again.shards_committed == 0 and again.images == 0
    assert {n: ShardCommitter(out).read_marker(n)["committed_at"] for n in markers} == markers
    assert {p: os.path.getmtime(os.path.join(out, p)) for p in mtimes} == mtimes
    assert len(read_rows(out)) == 10


def test_changed_vocabulary_is_refused_unless_overwrite(ray_local, tmp_shards, shapes_vocab, tmp_path, bystanders):
    out = str(tmp_path / "labels")
    bystanders.beside(out)
    src = os.path.dirname(tmp_shards[0])
    run_label(LabelConfig(input=src, output=out, model=tiny(shapes_vocab), limit=1))
    other = tmp_path / "other.txt"
    other.write_text("cat\ndog\n")
    with pytest.raises(RunMismatchError, match="vocabulary"):
        run_label(LabelConfig(input=src, output=out, model=tiny(str(other))))
    summary = run_label(LabelConfig(input=src, output=out, model=tiny(str(other)), overwrite=True))
    assert summary.shards_committed == 3 and summary.shards_skipped == 0
    df = read_rows(out)
    assert len(df) == 10
    assert {i["label"] for insts in df.instances for i in insts} <= {"cat", "dog"}


def test_bad_inputs_become_error_rows(ray_local, shapes_vocab, tmp_path):
    bad = make_bad_input_shards(str(tmp_path / "bad"))
    out = str(tmp_path / "labels")
    cfg = LabelConfig(
        input=str(tmp_path / "bad"),
        output=out,
        model=tiny(shapes_vocab),
        max_pixels=BAD_INPUT_MAX_PIXELS,
        max_error_fraction=1.0,
    )
    summary = run_label(cfg)
    df = read_rows(out)
    for kind, shard in bad.items():
        rows = df[df.shard == kind]
        if shard.expected_rows == 0:  # nothing readable: reported, not committed, retried by a rerun
            assert kind in {f["shard"] for f in summary.shards_failed}
            assert len(rows) == 0
            continue
        assert list(rows.status) == shard.expected_statuses, kind
        assert rows.key.is_unique
        assert rows[rows.status == "error"].error.str.len().min() > 0 if (rows.status == "error").any() else True
    assert {d["shard"] for d in summary.shards_damaged} == {"truncated_tar"}
    ok = df[df.status == "ok"]
    assert (ok.width > 0).all()
    rot = df[df.shard == "exif_rotated"].iloc[0]
    assert (rot.height, rot.width) == (64, 48)
    boxes = df[df.shard == "bad_boxes"].iloc[0].instances
    assert len(boxes) == 4 and all(decode_rle(i["rle"]).shape == (48, 64) for i in boxes)
    assert summary.failed(0.0)


def test_label_job_on_s3(ray_local, s3_server, s3_bucket, shapes_vocab):
    src = f"s3://{s3_bucket}/shards"
    generate_shards(src, num_images=5, images_per_shard=3, seed=3, image_size=(64, 48), s3_endpoint=s3_server)
    out = f"s3://{s3_bucket}/labels"
    summary = run_label(LabelConfig(input=src + "/", output=out, model=tiny(shapes_vocab, s3_endpoint=s3_server)))
    assert summary.shards_committed == 2 and summary.images_ok == 5
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    files = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3_bucket}/labels"))
    assert "shard-000000.parquet" in files and "_run.json" in files
    table = pds.dataset(f"{s3_bucket}/labels", format="parquet", filesystem=fs).to_table()
    assert table.num_rows == 5
