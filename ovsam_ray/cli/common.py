"""What several subcommands share: the model flags, joining Ray, JSON output, the locations check."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from typing import Any

from ovsam_ray.cli.flags import add_flags, config_from_args
from ovsam_ray.inference import ModelConfig

__all__ = [
    "RAW_HELP",
    "SUBMITTED_JOB_ENV",
    "add_model_args",
    "check_locations",
    "check_submitted_output",
    "init_ray",
    "model_config",
    "print_json",
    "reading",
    "submitted_job",
]


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The flags of :class:`ModelConfig`'s fields (``--preset``, ``--weights``...) in a "model" section."""
    add_flags(p, ModelConfig, title="model")


def model_config(a: argparse.Namespace) -> ModelConfig:
    return config_from_args(a, ModelConfig)


def init_ray(address: str | None = None) -> None:
    """Join the cluster the job runs in (RAY_ADDRESS / ray job submit) or start a local one."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address == "local":
        ray.init(address="local", include_dashboard=False)
    elif address:
        try:
            ray.init(address=address)
        except (ConnectionError, RuntimeError, ValueError) as e:  # a cluster that is not there
            from ovsam_ray.pipeline.label_job import JobStartError

            raise JobStartError(f"cannot join the Ray cluster at {address}: {type(e).__name__}: {e}") from e
    else:
        ray.init(include_dashboard=False)


#: Set by Ray's job supervisor in the environment of every ``ray job submit`` entry point (the
#: job's runtime env and metadata, as JSON); Ray strips its internal RAY_JOB_ID from that
#: environment, so this is how a command knows it runs as a submitted job.
SUBMITTED_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def submitted_job() -> dict[str, Any] | None:
    """The submitted job's config (``runtime_env``, ``metadata``) when this process is a ``ray job
    submit`` entry point, else None."""
    raw = os.environ.get(SUBMITTED_JOB_ENV)
    if not raw:
        return None
    try:
        job = json.loads(raw)
    except ValueError:
        return {}
    return job if isinstance(job, dict) else {}


def check_submitted_output(flag: str, value: str | None) -> None:
    """In a submitted job, refuse (ConfigError, exit 2) a relative local path for ``flag``: the
    entry point runs in Ray's temporary copy of ``--working-dir`` (or the job server's folder),
    which is deleted when the job ends, and the other nodes do not see it."""
    from ovsam_ray.errors import ConfigError
    from ovsam_ray.storage import is_remote

    job = submitted_job()
    if job is None or not value or is_remote(value) or value.startswith(("/", "~", "file:///")):
        return
    runtime_env = job.get("runtime_env")
    runtime_env = runtime_env if isinstance(runtime_env, dict) else {}
    where = "Ray's temporary copy of --working-dir" if runtime_env.get("working_dir") else "the job server's folder"
    raise ConfigError(
        f"{flag} {value}: a relative path in a job submitted with `ray job submit` would be written in {where} "
        f"({os.getcwd()}), deleted when the job ends: give shared storage every node reaches (s3://bucket/... "
        "or an absolute path on a shared file system)"
    )


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=1, default=str))


def check_locations(
    a: argparse.Namespace, inputs: tuple[str, ...], outputs: tuple[str, ...] = ("output",), *, labels: str | None = None
) -> None:
    """Refuse (one line, exit 2) an output flag of ``a`` that is, holds or lies inside one of its
    input flags (given by their ``dest`` names; absent or unset flags are skipped). ``labels``: a
    label output whose run record's input shards are read too (``--shards`` defaults to them)."""
    from ovsam_ray.labels.run_record import read_run_record
    from ovsam_ray.locations import check_disjoint

    def flags(names: tuple[str, ...]) -> list[tuple[str, str | None]]:
        return [("--" + n.replace("_", "-"), getattr(a, n, None)) for n in names]

    extra: list[tuple[str, str | None]] = []
    if labels is not None and not getattr(a, "shards", None):
        record = read_run_record(labels, s3_endpoint=getattr(a, "s3_endpoint", None)) or {}
        shards = ((record.get("details") or {}).get("config") or {}).get("input")
        extra = [(f"the shards of {labels} (its run record's input)", shards)] if isinstance(shards, str) else []
    check_disjoint(flags(inputs) + extra, flags(outputs))


RAW_HELP = "read the label output as the label job wrote it, without the review corrections (review import)"


def reading(raw: bool) -> contextlib.AbstractContextManager[None]:
    """Readers of label outputs inside it apply the review corrections, or, ``raw``, do not."""
    from ovsam_ray.labels.reader import raw_output

    return raw_output() if raw else contextlib.nullcontext()
