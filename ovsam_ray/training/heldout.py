"""The tiny recipe's check: exported weights, loaded as the label job loads them, scored on
held-out shards with the one scorer (:func:`ovsam_ray.evaluation.table1.evaluate_predictor`:
each object's box and interior point as prompts; mIoU, accuracy over seen and unseen classes,
box-fill baseline)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ovsam_ray.data.shards import list_shards

__all__ = ["evaluate_weights"]


def evaluate_weights(
    weights: str,
    shards: str | Sequence[str],
    *,
    preset: str = "ovsam_tiny",
    train_vocab: str = "shapes",
    device: str = "cpu",
    s3_endpoint: str | None = None,
) -> dict[str, Any]:
    """Load exported weights as the label job does (``inference.build_predictor``) and score them
    on ``shards`` (a folder, a prefix or a list); returns ``metrics`` and ``counts``."""
    from ovsam_ray.evaluation.table1 import evaluate_predictor
    from ovsam_ray.inference import ModelConfig, build_predictor

    predictor, vocab, _ = build_predictor(
        ModelConfig(preset=preset, weights=weights, train_vocab=train_vocab, s3_endpoint=s3_endpoint), device
    )
    return evaluate_predictor(predictor, vocab, list_shards(shards, s3_endpoint=s3_endpoint), s3_endpoint=s3_endpoint)
