"""Kill the label job's driver with SIGKILL mid-run, rerun, and find every image exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pyarrow.dataset as pds

from ovsam_ray.data.synthetic import generate_shards
from ovsam_ray.inference import ModelConfig
from ovsam_ray.labels.committer import ShardCommitter
from ovsam_ray.pipeline.label_job import LabelConfig, run_label


def test_sigkilled_driver_then_rerun_finishes_exactly_once(ray_local, shapes_vocab, tmp_path, bystanders):
    src, out = str(tmp_path / "shards"), str(tmp_path / "labels")
    bystanders.beside(out)
    shards = generate_shards(src, num_images=24, images_per_shard=2, seed=11, image_size=(64, 48))
    cmd = [
        sys.executable,
        "-m",
        "ovsam_ray.cli",
        "label",
        "--input",
        src,
        "--output",
        out,
        "--preset",
        "ovsam_tiny",
        "--random-init",
        "--vocab",
        shapes_vocab,
        "--batch-size",
        "1",
        "--ray-address",
        "local",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    committer = ShardCommitter(out)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not committer.committed_shards():
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # the driver, mid-run
        proc.wait(timeout=30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the driver started in its session
        except ProcessLookupError:
            pass
    before = {n: committer.read_marker(n)["committed_at"] for n in committer.committed_shards()}
    assert 1 <= len(before) < len(shards), "the kill must land after >= 1 and before all shards committed"

    summary = run_label(
        LabelConfig(input=src, output=out, model=ModelConfig(preset="ovsam_tiny", random_init=True, vocab=shapes_vocab))
    )
    assert summary.shards_skipped == len(before)
    assert summary.shards_committed == len(shards) - len(before)

    df = pds.dataset(out, format="parquet").to_table().to_pandas()
    assert len(df) == 24 and df.key.is_unique and (df.status == "ok").all()
    assert {n: committer.read_marker(n)["committed_at"] for n in before} == before  # not recomputed
    leftovers = [f for f in os.listdir(out) if f.startswith(".") or ".tmp" in f]
    assert leftovers == []
    assert sorted(f for f in os.listdir(out) if f.endswith(".parquet")) == sorted(
        f"shard-{i:06d}.parquet" for i in range(len(shards))
    )
