"""One writer per output folder: the label job's lease (local and S3), and what it protects."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import pytest

from ovsam_ray import storage
from ovsam_ray.data.synthetic import generate_shards
from ovsam_ray.inference import ModelConfig
from ovsam_ray.pipeline import lease as lease_mod
from ovsam_ray.pipeline import parts
from ovsam_ray.pipeline.label_job import LabelConfig, run_label
from ovsam_ray.pipeline.lease import LEASE_NAME, LeaseHeldError, LeaseLostError, OutputLease


def _foreign_lease(
    out: str, *, age_s: float = 0.0, host: str = "other-host", pid: int = 1, interval_s: float = 30.0
) -> dict:
    record = {
        "job_id": "f" * 32,
        "host": host,
        "pid": pid,
        "pid_ns": lease_mod._pid_namespace(),
        "heartbeat": time.time() - age_s,
        "heartbeat_at": "then",
        "interval_s": interval_s,
    }
    storage.atomic_write_bytes(storage.join(out, LEASE_NAME), json.dumps(record).encode())
    return record


def test_lease_acquire_refuse_renew_release(tmp_path):
    out = str(tmp_path / "out")
    first = OutputLease(out)
    with first:
        with pytest.raises(LeaseHeldError, match="in use by another label job") as err:
            OutputLease(out).acquire()
        assert first.job_id in str(err.value) and "\n" not in str(err.value)
        first.check()
    assert not os.path.exists(os.path.join(out, LEASE_NAME))  # released
    with OutputLease(out, interval_s=0.05):  # the heartbeat thread renews it
        before = json.load(open(os.path.join(out, LEASE_NAME)))["heartbeat"]
        deadline = time.time() + 20
        while time.time() < deadline and json.load(open(os.path.join(out, LEASE_NAME)))["heartbeat"] == before:
            time.sleep(0.05)
        assert json.load(open(os.path.join(out, LEASE_NAME)))["heartbeat"] > before
    with OutputLease(out):  # free again
        pass
    assert [f for f in os.listdir(out) if f.startswith(".")] == []


def test_stale_or_dead_leases_are_taken_over(tmp_path):
    out = str(tmp_path / "out")
    _foreign_lease(out, age_s=100.0, interval_s=30.0)  # no heartbeat for > 3 intervals
    with OutputLease(out) as mine:
        assert json.load(open(os.path.join(out, LEASE_NAME)))["job_id"] == mine.job_id
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _foreign_lease(out, host=lease_mod.socket.gethostname(), pid=dead.pid)  # fresh, but its process is gone
    with OutputLease(out):
        pass
    _foreign_lease(out, host=lease_mod.socket.gethostname(), pid=os.getppid())  # fresh and alive: refused
    with pytest.raises(LeaseHeldError):
        OutputLease(out).acquire()


def test_a_lost_lease_stops_the_job(tmp_path):
    out = str(tmp_path / "out")
    mine = OutputLease(out, interval_s=30.0)
    mine.acquire()
    _foreign_lease(out)  # another job took it over (this one looked dead to it)
    mine.renew()
    with pytest.raises(LeaseLostError, match="taken over"):
        mine.check()
    mine.release()  # not ours: left alone
    assert json.load(open(os.path.join(out, LEASE_NAME)))["job_id"] == "f" * 32


def test_lease_on_s3(s3_server, s3_bucket, monkeypatch):
    monkeypatch.setattr(lease_mod, "S3_SETTLE_S", 0.05)
    out = f"s3://{s3_bucket}/labels"
    with OutputLease(out, s3_endpoint=s3_server) as held:
        assert json.loads(storage.read_bytes(f"{out}/{LEASE_NAME}", s3_endpoint=s3_server))["job_id"] == held.job_id
        with pytest.raises(LeaseHeldError):
            OutputLease(out, s3_endpoint=s3_server).acquire()
    assert not storage.exists(f"{out}/{LEASE_NAME}", s3_endpoint=s3_server)


def _config(src: str, out: str, vocab: str) -> LabelConfig:
    return LabelConfig(
        input=src,
        output=out,
        baseline="box-fill",
        model=ModelConfig(preset="ovsam_tiny", random_init=True, vocab=vocab),
    )


def test_second_job_is_refused_before_any_cleanup(shapes_vocab, tmp_path):
    src, out = str(tmp_path / "shards"), str(tmp_path / "labels")
    generate_shards(src, num_images=2, images_per_shard=2, seed=1, image_size=(32, 24))
    live = OutputLease(out)
    live.acquire()  # a live job that is about to commit shard-000000
    os.makedirs(parts.parts_url(out, "shard-000000"))
    stray = [os.path.join(out, "shard-000000.parquet"), os.path.join(parts.parts_url(out, "shard-000000"), "p.parquet")]
    for path in stray:
        open(path, "wb").write(b"a live job's file")
    with pytest.raises(LeaseHeldError, match="in use"):
        run_label(_config(src, out, shapes_vocab))
    assert all(os.path.exists(p) for p in stray)  # nothing of the live job's was deleted
    assert not os.path.exists(os.path.join(out, "_run.json"))
    live.release()


def test_stale_lease_is_taken_over_and_released(ray_local, shapes_vocab, tmp_path, caplog):
    src, out = str(tmp_path / "shards"), str(tmp_path / "labels")
    generate_shards(src, num_images=2, images_per_shard=2, seed=1, image_size=(32, 24))
    _foreign_lease(out, age_s=1000.0)
    summary = run_label(_config(src, out, shapes_vocab))
    assert summary.shards_committed == 1
    assert not os.path.exists(os.path.join(out, LEASE_NAME))
    # a committed shard whose Parquet file was deleted is named and relabelled by the next run
    os.remove(os.path.join(out, "shard-000000.parquet"))
    with caplog.at_level(logging.ERROR):
        again = run_label(_config(src, out, shapes_vocab))
    assert again.shards_committed == 1 and os.path.exists(os.path.join(out, "shard-000000.parquet"))
    assert any("shard-000000.parquet is missing" in r.getMessage() for r in caplog.records)
