"""`ovsam-ray label` exit codes, as a user's shell sees them: 2 with one line for every start-up
failure (never a traceback), 3 for a run that left a shard uncommitted."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from ovsam_ray.data.synthetic import generate_shards
from ovsam_ray.pipeline.lease import LEASE_NAME


def _label(*flags: str, env: dict | None = None, timeout: float = 300) -> tuple[int, str, str]:
    cmd = [sys.executable, "-m", "ovsam_ray.cli", "label", "--baseline", "box-fill", "--ray-address", "local", *flags]
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the command started in its session
        except ProcessLookupError:
            pass
    return proc.returncode, out, err


def _assert_one_line_stop(code: int, err: str, expected: str) -> None:
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and expected in errors[0], err[-3000:]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    src = str(tmp_path_factory.mktemp("cli") / "shards")
    generate_shards(src, num_images=2, images_per_shard=2, seed=2, image_size=(32, 24))
    return src


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_output_not_writable_is_one_line_exit_2(shards, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, _, err = _label("--input", shards, "--output", str(blocker / "labels"))
    _assert_one_line_stop(code, err, "cannot take the lease of the output")


@pytest.mark.parametrize("endpoint", ["not a url", "localhost:9000"])
def test_malformed_s3_endpoint_is_one_line_exit_2(shards, endpoint):
    code, _, err = _label("--input", shards, "--output", "s3://bucket/labels", "--s3-endpoint", endpoint)
    _assert_one_line_stop(code, err, "is not an endpoint URL")


def test_output_equal_to_input_in_another_spelling_is_exit_2(shards):
    code, _, err = _label("--input", shards, "--output", shards + "/./")
    _assert_one_line_stop(code, err, "is the same location as --input")


def test_unreachable_storage_is_one_line_exit_2(shards):
    env = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1"}
    t0 = time.time()
    code, _, err = _label(
        "--input",
        shards,
        "--output",
        "s3://bucket/labels",
        "--s3-endpoint",
        f"http://127.0.0.1:{_free_port()}",
        env=env,
    )
    _assert_one_line_stop(code, err, "Could not connect to the endpoint URL")
    assert time.time() - t0 < 120


def test_output_in_use_by_a_live_job_is_one_line_exit_2(shards, tmp_path):
    out = tmp_path / "labels"
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
    code, _, err = _label("--input", shards, "--output", str(out))
    _assert_one_line_stop(code, err, "in use by another label job")
    assert sorted(os.listdir(out)) == [LEASE_NAME]  # nothing written, nothing cleaned


def test_uncommitted_shard_exits_3_whatever_max_error_fraction(shards, tmp_path, bystanders):
    src = tmp_path / "in"
    src.mkdir()
    for name in os.listdir(shards):
        os.symlink(os.path.join(shards, name), src / name)
    (src / "broken.tar").write_bytes(b"this is not a tar archive" * 40)
    out = str(tmp_path / "labels")
    bystanders.beside(out)
    code, stdout, err = _label("--input", str(src), "--output", out, "--max-error-fraction", "1")
    assert code == 3, err[-3000:]
    summary = json.loads(stdout)
    assert summary["shards_committed"] == 1 and [f["shard"] for f in summary["shards_failed"]] == ["broken"]
    assert "rerun the same command" in err and not os.path.exists(os.path.join(out, LEASE_NAME))
