"""What several subcommands share: the model flags, ``--concurrency``, joining Ray, JSON output."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from ovsam_ray.errors import ConfigError
from ovsam_ray.inference import ModelConfig

__all__ = ["add_model_args", "check_locations", "init_ray", "model_config", "parse_concurrency", "print_json"]


def add_model_args(p: argparse.ArgumentParser, default_preset: str = "ovsam_rn50x16") -> None:
    g = p.add_argument_group("model")
    g.add_argument("--preset", default=default_preset)
    g.add_argument("--weights", help="folder or s3:// prefix holding the standard weight file names")
    g.add_argument("--sam-checkpoint", help="SAM file (only prompt_encoder.* is used for inference)")
    g.add_argument("--clip-checkpoint", help="open_clip state dict or OpenAI's CLIP file")
    g.add_argument("--sam2clip-checkpoint")
    g.add_argument("--clip2sam-checkpoint")
    g.add_argument("--train-vocab", default="coco", help="vocabulary the clip2sam file was trained on (coco|lvis)")
    g.add_argument("--vocab", help="coco_ov, lvis_v1, or a .txt/.json file")
    g.add_argument("--class-embeddings", help="(C, S, D) text-embedding tensor file (reference format)")
    g.add_argument("--random-init", action="store_true", help="untrained weights (smoke tests, benchmarks)")
    g.add_argument("--topk", type=int, default=5)
    g.add_argument("--text-cache", help="text-embedding cache folder (default ~/.cache/ovsam_ray/text)")
    g.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (else AWS_ENDPOINT_URL)")


def model_config(a: argparse.Namespace) -> ModelConfig:
    return ModelConfig(
        preset=a.preset,
        weights=a.weights,
        sam_checkpoint=a.sam_checkpoint,
        clip_checkpoint=a.clip_checkpoint,
        sam2clip_checkpoint=a.sam2clip_checkpoint,
        clip2sam_checkpoint=a.clip2sam_checkpoint,
        train_vocab=a.train_vocab,
        vocab=a.vocab,
        class_embeddings=a.class_embeddings,
        random_init=a.random_init,
        topk=a.topk,
        text_cache=a.text_cache,
        s3_endpoint=a.s3_endpoint,
    )


def parse_concurrency(text: str) -> int | tuple[int, int]:
    """``--concurrency N`` (a fixed pool) or ``MIN,MAX`` (an autoscaling one)."""
    try:
        parts = [int(x) for x in str(text).split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2):
        raise ConfigError(f"--concurrency {text!r}: give N (a fixed pool) or MIN,MAX (an autoscaling one)")
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


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


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=1, default=str))


def check_locations(a: argparse.Namespace, inputs: tuple[str, ...], outputs: tuple[str, ...] = ("output",),
                    *, labels: str | None = None) -> None:
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
