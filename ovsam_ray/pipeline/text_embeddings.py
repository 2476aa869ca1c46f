"""The label job's text embeddings (DESIGN §4): the vocabulary's class embeddings computed once
per run, on a GPU when the cluster has one, and handed to every model actor through the object
store (the actors never embed text themselves)."""

from __future__ import annotations

import logging
import time
from typing import Any

import ray

from ovsam_ray.inference import ModelConfig, load_model, vocabulary_text

log = logging.getLogger(__name__)

__all__ = ["prepare_text", "text_task"]


def _text_source(model_cfg: ModelConfig, random_init: bool) -> str:
    if model_cfg.class_embeddings:
        return "class-embeddings file"
    return "CLIP text tower, no cache (random init)" if random_init else "text-embedding cache or CLIP text tower"


def text_task(model_cfg: ModelConfig, device: str) -> tuple[dict, Any, dict, dict]:
    """(text payload, vocabulary, model identity, how the embeddings were made)."""
    loaded = load_model(model_cfg)
    t0 = time.perf_counter()
    text, vocab = vocabulary_text(model_cfg, loaded, device)
    info = {
        "device": device,
        "seconds": round(time.perf_counter() - t0, 3),
        "num_classes": vocab.num_classes,
        "max_synonyms": vocab.max_synonyms,
        "synonyms": sum(len(s) for s in vocab.synonyms),
        "source": _text_source(model_cfg, loaded.random_init),
    }
    return {"embeddings": text, "vocabulary": vocab.to_json()}, vocab, loaded.identity(), info


def prepare_text(model: ModelConfig, baseline: str | None = None) -> tuple[dict, Any, dict, dict]:
    """The model's identity and the vocabulary's text embeddings, computed once per run (then
    cached on disk): in a one-GPU Ray task when the cluster has GPUs (tens of thousands of
    classes x 14 templates go through the CLIP text tower), else on the driver's CPU. The
    actors get the result through the object store and never embed text themselves. A baseline
    needs no model: only its vocabulary (to give shard labels their vocabulary ids)."""
    if baseline is not None:
        from ovsam_ray.inference import TRAIN_VOCABS
        from ovsam_ray.vocabulary import load_vocabulary

        vocab = load_vocabulary(model.vocab or TRAIN_VOCABS.get(model.train_vocab, "coco_ov"))
        return {"embeddings": None, "vocabulary": vocab.to_json()}, vocab, {"baseline": baseline}, {}
    if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1:
        task = ray.remote(num_gpus=1, num_cpus=1)(text_task)  # GPU tasks end their worker: memory freed
        out = ray.get(task.remote(model, "cuda"))
    else:
        out = text_task(model, "cpu")
    info = out[3]
    log.info(
        "text embeddings of %s: %d classes, %d names, on %s in %.1fs (%s), once for the whole run",
        out[1].name,
        info["num_classes"],
        info["synonyms"],
        info["device"],
        info["seconds"],
        info["source"],
    )
    return out
