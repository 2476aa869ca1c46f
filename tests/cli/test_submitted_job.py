"""Under ``ray job submit`` the entry point runs in Ray's temporary copy of ``--working-dir``: a
relative local output would be written there and lost, so the label job and ``relabel`` refuse it."""

from __future__ import annotations

import json

import pytest
from cli_helpers import error_lines, run_cli

from ovsam_ray.cli.common import SUBMITTED_JOB_ENV, check_submitted_output, submitted_job
from ovsam_ray.data.synthetic import generate_shards
from ovsam_ray.errors import ConfigError

JOB = {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}, "metadata": {"job_submission_id": "label-1"}}


def test_the_variable_is_the_one_rays_job_supervisor_sets() -> None:
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR
    from ray.dashboard.modules.job import job_supervisor

    assert SUBMITTED_JOB_ENV == RAY_JOB_CONFIG_JSON_ENV_VAR
    assert "RAY_JOB_CONFIG_JSON_ENV_VAR" in open(job_supervisor.__file__).read()  # set for every entry point


def test_outside_a_submitted_job_any_path_is_fine(monkeypatch) -> None:
    monkeypatch.delenv(SUBMITTED_JOB_ENV, raising=False)
    assert submitted_job() is None
    check_submitted_output("--output", "labels/")


@pytest.mark.parametrize("path", ["labels/", "./labels", "labels", "../x"])
def test_a_relative_output_is_refused_in_a_submitted_job(monkeypatch, path) -> None:
    monkeypatch.setenv(SUBMITTED_JOB_ENV, json.dumps(JOB))
    assert submitted_job() == JOB
    with pytest.raises(ConfigError, match="temporary copy of --working-dir.*s3://"):
        check_submitted_output("--output", path)


@pytest.mark.parametrize("path", ["/shared/labels", "s3://bucket/labels/", "~/labels", "file:///shared/x"])
def test_shared_storage_and_absolute_paths_are_fine(monkeypatch, path) -> None:
    monkeypatch.setenv(SUBMITTED_JOB_ENV, json.dumps({"runtime_env": {}}))
    check_submitted_output("--output", path)


def test_label_cli_in_a_submitted_job_exit_2_before_anything(monkeypatch, tmp_path, caplog) -> None:
    shards = str(tmp_path / "shards")
    generate_shards(shards, num_images=1, images_per_shard=1, seed=1, image_size=(16, 16))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(SUBMITTED_JOB_ENV, json.dumps({"runtime_env": {}, "metadata": {}}))
    code = run_cli("label", "--input", shards, "--output", "out", "--random-init", "--preset", "ovsam_tiny")
    assert code == 2
    assert ["job server's folder" in e for e in error_lines(caplog)] == [True]
    assert not (tmp_path / "out").exists()
