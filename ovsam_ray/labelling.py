"""Label shard samples with a predictor in this process: decode -> prompts -> predict -> instances.

The label job does this inside Ray Data actors; :func:`label_samples` is the same chain for one
process (evaluations, benchmarks, notebooks)::

    from ovsam_ray.data.shards import iter_shard_samples
    from ovsam_ray.inference import ModelConfig, build_predictor
    from ovsam_ray.labelling import label_samples

    predictor, vocab, _ = build_predictor(ModelConfig(weights="/models/ovsam"))
    for row in label_samples(predictor, vocab, iter_shard_samples("shards/shard-000000.tar")):
        print(row["key"], row["status"], [i["label"] for i in row["instances"]])
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from itertools import islice
from typing import Any, cast

import numpy as np

from ovsam_ray.data.decode import DecodedSample, decode_sample
from ovsam_ray.errors import ConfigError
from ovsam_ray.labels.records import prediction_to_instances
from ovsam_ray.model.predictor import ImagePrompts, OVSAMPredictor
from ovsam_ray.vocabulary import Vocabulary

__all__ = ["image_prompts", "label_samples"]


def image_prompts(decoded: DecodedSample) -> ImagePrompts:
    """The predictor's prompts of a decoded sample: its JSON's boxes, points and the points'
    CLIP boxes, boxes first (the order of the instances)."""
    p = decoded.prompts
    assert p is not None, "a decoded (ok) sample has prompts"
    return ImagePrompts(boxes=p.boxes, points=p.points, point_boxes=p.point_boxes)


def _no_stage(name: str) -> AbstractContextManager[None]:
    return contextlib.nullcontext()


def label_samples(
    predictor: OVSAMPredictor,
    vocab: Vocabulary,
    samples: Iterable[dict[str, Any]],
    *,
    batch_size: int = 8,
    stage: Callable[[str], AbstractContextManager[Any]] = _no_stage,
) -> Iterator[dict[str, Any]]:
    """Label shard samples (dicts as :func:`~ovsam_ray.data.shards.iter_shard_samples` yields them)
    ``batch_size`` images per model call; yields one row per sample, in order, with the label
    output's fields ``shard``, ``key``, ``status`` ("ok" / "error"), ``error``, ``width``,
    ``height`` and ``instances`` (:func:`~ovsam_ray.labels.records.prediction_to_instances`: one per
    prompt, boxes then points). A sample that does not decode is an error row, never an exception.

    ``stage(name)`` wraps each step in a context manager (for timing): ``"jpeg_decode"``,
    ``"embed"``, ``"predict"``, ``"records"``.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    it = iter(samples)
    while chunk := list(islice(it, batch_size)):
        with stage("jpeg_decode"):
            decoded = [decode_sample(s) for s in chunk]
        ok = [i for i, d in enumerate(decoded) if d.ok]
        instances: dict[int, list[dict[str, Any]]] = {}
        if ok:
            prompts = [image_prompts(decoded[i]) for i in ok]
            with stage("embed"):
                embedded = predictor.embed([cast(np.ndarray, decoded[i].image) for i in ok])  # ok: decoded
            with stage("predict"):
                out = predictor.predict(embedded, prompts)
            with stage("records"):
                for i, p, pred in zip(ok, prompts, out):
                    sources = ["shard"] * (len(p.boxes) + len(p.points))
                    instances[i] = prediction_to_instances(pred, p, vocab, sources=sources)
        for i, d in enumerate(decoded):
            yield {
                "shard": d.shard,
                "key": d.key,
                "status": "ok" if d.ok else "error",
                "error": d.error,
                "width": d.width,
                "height": d.height,
                "instances": instances.get(i, []),
            }
