"""dev/wheelhouse.sh, offline: the pip commands it would run (``--dry-run``) and how it refuses bad
arguments. Nothing is downloaded or installed."""

from __future__ import annotations

import os
import shlex
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "dev", "wheelhouse.sh")
PINS = os.path.join(REPO, "bench", "gpu_kit.txt")


def _run(*args: str, cwd: str = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": "python3"}
    return subprocess.run(["bash", SCRIPT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=30)


def test_download_dry_run_prints_pip_download_of_the_pins(tmp_path):
    proc = _run("download", str(tmp_path / "wheels"), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(proc.stdout) == ["python3", "-m", "pip", "download", "-r", PINS, "-d", str(tmp_path / "wheels")]
    assert not (tmp_path / "wheels").exists()


def test_install_dry_run_is_offline_and_passes_pip_options_through(tmp_path):
    proc = _run("install", "wheels", "--no-deps", "--dry-run", "--", "--target", "a b", cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout)
    assert argv[:4] == ["python3", "-m", "pip", "install"]
    assert argv[argv.index("--find-links") + 1] == str(tmp_path / "wheels")  # relative to the caller
    assert "--no-index" in argv and argv[argv.index("-r") + 1] == PINS
    assert argv[-3:] == ["--no-deps", "--target", "a b"]


def test_pins_are_exact_versions():
    with open(PINS) as f:
        pins = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert pins and all(line.count("==") == 1 for line in pins)
    assert any(line.startswith("ray==") for line in pins)


def test_bad_arguments_exit_2_with_the_usage(tmp_path):
    for args in (
        ["download"],
        ["fetch", str(tmp_path)],
        ["download", "--dry-run"],
        ["download", str(tmp_path), "--bogus"],
    ):
        proc = _run(*args)
        assert proc.returncode == 2 and "usage: dev/wheelhouse.sh" in proc.stderr, args
    proc = _run("install", str(tmp_path / "missing"))
    assert proc.returncode == 2 and "no wheelhouse folder" in proc.stderr
