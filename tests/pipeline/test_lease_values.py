"""The lease refuses heartbeat intervals no job should use, from every source, and names a clock
that runs ahead."""

from __future__ import annotations

import json
import os
import time

import pytest

from ovsam_ray.cli import main
from ovsam_ray.inference import ModelConfig
from ovsam_ray.pipeline.label_job import LabelConfig
from ovsam_ray.pipeline.lease import LEASE_NAME, LeaseHeldError, OutputLease

BAD = [float("nan"), float("inf"), -1.0, 0.0, 1e300]


@pytest.mark.parametrize("value", BAD)
def test_constructor_refuses_a_bad_interval(tmp_path, value):
    with pytest.raises(ValueError, match="interval"):
        OutputLease(str(tmp_path / "out"), interval_s=value)


@pytest.mark.parametrize("value", BAD)
def test_config_refuses_a_bad_interval_naming_the_flag(tmp_path, value):
    with pytest.raises(ValueError, match="--lease-heartbeat-s"):
        LabelConfig(
            input=str(tmp_path / "in.tar"),
            output=str(tmp_path / "out"),
            baseline="box-fill",
            model=ModelConfig(random_init=True),
            lease_heartbeat_s=value,
        )


@pytest.mark.parametrize("text", ["nan", "inf", "-1", "0"])
def test_cli_flag_refuses_a_bad_interval_with_exit_2(tmp_path, caplog, text):
    code = main(
        [
            "label",
            "--input",
            str(tmp_path / "in.tar"),
            "--output",
            str(tmp_path / "out"),
            "--baseline",
            "box-fill",
            "--lease-heartbeat-s",
            text,
        ]
    )
    assert code == 2
    assert any("--lease-heartbeat-s" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "out").exists()


def _write_lease(out: str, **fields) -> str:
    os.makedirs(out, exist_ok=True)
    lease = {
        "job_id": "other",
        "host": "elsewhere",
        "pid": 1,
        "pid_ns": "",
        "heartbeat": time.time(),
        "heartbeat_at": "now",
        "interval_s": 30.0,
        **fields,
    }
    path = os.path.join(out, LEASE_NAME)
    with open(path, "w") as f:
        f.write(json.dumps(lease))  # json writes NaN / Infinity as Python reads them back
    return path


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1, 0, "abc", 1e300, 10**400, True])
def test_a_lease_file_with_a_bad_interval_is_refused_and_left_alone(tmp_path, value):
    out = str(tmp_path / "out")
    path = _write_lease(out, interval_s=value, heartbeat=time.time() - 10_000)  # stale, were the interval sane
    before = open(path).read()
    with pytest.raises(ValueError, match=LEASE_NAME):
        OutputLease(out).acquire()
    assert open(path).read() == before


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_lease_file_with_a_non_finite_heartbeat_is_refused(tmp_path, value):
    out = str(tmp_path / "out")
    path = _write_lease(out, heartbeat=value)
    with pytest.raises(ValueError, match=LEASE_NAME):
        OutputLease(out).acquire()
    assert os.path.exists(path)


def test_a_heartbeat_in_the_future_names_the_clock_that_is_ahead(tmp_path):
    out = str(tmp_path / "out")
    _write_lease(out, heartbeat=time.time() + 3600, host="fast-clock")
    with pytest.raises(LeaseHeldError) as e:
        OutputLease(out).acquire()
    message = str(e.value)
    assert "fast-clock" in message and "ahead" in message and ("3600s" in message or "3599s" in message)


def test_a_lease_file_that_is_not_an_object_is_refused_and_left_alone(tmp_path):
    """Our leases are written whole (a link of a complete file, one PUT): a file under the
    lease's name that is not one is someone else's, and taking it over would delete it."""
    out = str(tmp_path / "out")
    os.makedirs(out)
    with open(os.path.join(out, LEASE_NAME), "w") as f:
        f.write("[1, 2]")
    with pytest.raises(ValueError, match="is not a lease of ovsam-ray"):
        OutputLease(out).acquire()
    assert open(os.path.join(out, LEASE_NAME)).read() == "[1, 2]"
