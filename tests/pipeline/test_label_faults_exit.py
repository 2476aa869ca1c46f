"""The label CLI's exit codes under a full disk and SIGTERM: one line, the README's codes, the
lease released, and a rerun that finishes every image exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pyarrow.dataset as pds
import pytest

from ovsam_ray.data.synthetic import generate_shards
from ovsam_ray.inference import ModelConfig
from ovsam_ray.labels.committer import ShardCommitter
from ovsam_ray.pipeline.label_job import LabelConfig, run_label
from ovsam_ray.pipeline.lease import LEASE_NAME


def _cmd(src: str, out: str, vocab: str) -> list[str]:
    return [
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
        "2",
        "--ray-address",
        "local",
    ]


def _run(cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        _kill_group(proc)
    return proc.returncode, err


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever the driver started in its session
    except ProcessLookupError:
        pass


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " ERROR " in line]


@pytest.mark.parametrize("pattern", ["*/_parts/*", "*/shard-000001.parquet", "*/_committed/shard-000000.json"])
def test_full_disk_ends_the_job_with_exit_2_and_one_line_naming_the_path(shapes_vocab, tmp_path, pattern):
    src, out = str(tmp_path / "shards"), str(tmp_path / "labels")
    generate_shards(src, num_images=4, images_per_shard=2, seed=3, image_size=(64, 48))
    code, err = _run(_cmd(src, out, shapes_vocab), {**os.environ, "OVSAM_RAY_FULL_DISK": pattern})
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    errors = _errors(err)
    assert len(errors) == 1, err[-3000:]
    assert "No space left on device" in errors[0] and pattern.strip("*").split("*")[0] in errors[0], errors[0]
    assert not os.path.exists(os.path.join(out, LEASE_NAME))


def test_sigterm_releases_the_lease_exits_143_and_the_rerun_resumes(ray_local, shapes_vocab, tmp_path):
    src, out = str(tmp_path / "shards"), str(tmp_path / "labels")
    shards = generate_shards(src, num_images=12, images_per_shard=2, seed=4, image_size=(64, 48))
    env = {**os.environ, "OVSAM_RAY_FAULTS": "driver_before_commit:sleep=2"}  # a slow job
    proc = subprocess.Popen(
        _cmd(src, out, shapes_vocab),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    committer = ShardCommitter(out)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not committer.committed_shards():
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # what `ray job stop` and Kubernetes send
        _, err = proc.communicate(timeout=120)
    finally:
        _kill_group(proc)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert any("SIGTERM" in line for line in _errors(err)), err[-3000:]
    assert not os.path.exists(os.path.join(out, LEASE_NAME))
    before = committer.committed_shards()
    assert 1 <= len(before) < len(shards)

    summary = run_label(
        LabelConfig(
            input=src,
            output=out,
            baseline="box-fill",
            model=ModelConfig(preset="ovsam_tiny", random_init=True, vocab=shapes_vocab),
        )
    )
    assert summary.shards_skipped == len(before) and summary.shards_committed == len(shards) - len(before)
    df = pds.dataset(out, format="parquet").to_table().to_pandas()
    assert len(df) == 12 and not df.duplicated(["shard", "key"]).any() and (df.status == "ok").all()


def test_a_full_disk_is_not_retried_and_its_line_names_the_file(monkeypatch):
    import errno

    from ovsam_ray.pipeline import parts

    monkeypatch.setattr(parts, "COMMIT_BACKOFF_S", 0.0)
    calls = []

    def full() -> None:
        calls.append(1)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/out/_parts/s/p.parquet")

    with pytest.raises(parts.StorageUnavailableError) as e:
        parts.with_storage_retries("write the part file /out/_parts/s/p.parquet of shard s", full, committed=0)
    assert calls == [1]
    message = str(e.value)
    assert "\n" not in message and "/out/_parts/s/p.parquet" in message and "No space left on device" in message


def test_the_storage_error_inside_ray_datas_error_text_is_the_one_line():
    from ovsam_ray.pipeline.tracker import storage_error

    text = (
        'ray::MapBatches(write_parts)() (pid=1, ip=1.2.3.4)\n  File "parts.py", line 84\n'
        "ovsam_ray.pipeline.parts.StorageUnavailableError: could not write the part file /o/_parts/s/x.parquet "
        "of shard s: OSError: [Errno 28] No space left on device\n\nThe above exception was the direct cause"
    )
    found = storage_error(RuntimeError(text))
    assert found is not None and str(found).startswith("could not write the part file /o/_parts/s/x.parquet")
    assert storage_error(RuntimeError("something else")) is None
