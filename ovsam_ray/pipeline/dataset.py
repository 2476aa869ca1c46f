"""The label job's Ray Data pipeline: read + decode (one CPU task per shard) -> [detector actor
pool] -> model actor pool (OV-SAM or a baseline) -> part files (CPU tasks). What it yields is
PART_SCHEMA metadata only; ``label_job`` drives it and commits the shards."""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

import ray

from ovsam_ray.model.presets import get_preset
from ovsam_ray.pipeline.detectors import DetectorStage
from ovsam_ray.pipeline.parts import write_parts
from ovsam_ray.pipeline.predict_stage import BoxFillStage, PredictStage
from ovsam_ray.pipeline.stages import encode_url, read_and_decode

if TYPE_CHECKING:
    from ovsam_ray.pipeline.label_job import LabelConfig

__all__ = ["DECODE_CHUNK", "DECODE_CHUNK_NO_PIXELS", "PART_ROWS", "build_dataset"]

#: Rows per part file (and per part-writing task), whatever the model's batch.
PART_ROWS = 1000
#: Images per block out of the decode stage where ``LabelConfig.decode_chunk`` is None: with
#: decoded pixels for a model, and without any (the baseline).
DECODE_CHUNK, DECODE_CHUNK_NO_PIXELS = 16, 1000


def _model_stage(cfg: LabelConfig, text: dict) -> tuple[Any, dict[str, Any], float]:
    """The model stage's callable class, its constructor arguments and CPUs per actor."""
    if cfg.baseline == "box-fill":  # nearly free: leave the CPUs to decoding
        return (
            BoxFillStage,
            {"vocabulary": text["vocabulary"], "prompts": cfg.prompts, "grid_size": cfg.select.grid_size},
            0.25,
        )
    # As numpy, the object store hands every actor on a node the same read-only copy.
    shared = ray.put({**text, "embeddings": text["embeddings"].numpy()})
    kwargs = {
        "model_config": dataclasses.asdict(cfg.model),
        "text": shared,
        "with_embedding": cfg.with_embedding,
        "forward_batch": cfg.batch_size,
        "prompts": cfg.prompts,
        "select": dataclasses.asdict(cfg.select),
        "cpu_threads": None if cfg.num_gpus else max(1, (os.cpu_count() or 1) // cfg.actors[1]),
    }
    return PredictStage, kwargs, cfg.num_cpus_per_actor


def _detector_queries(cfg: LabelConfig, text: dict) -> list[str] | None:
    """The open-vocabulary detector's query list: --detector-queries, else for Grounding DINO and
    SAM 3 (which need text) the job's vocabulary; None for the other detectors (OWLv2: objectness
    proposals). SAM 3's list is checked against --detector-max-concepts here, before any actor."""
    from ovsam_ray.pipeline.hf_detectors import check_concept_count, query_names
    from ovsam_ray.vocabulary import Vocabulary, clean_class_name

    name = cfg.sources.detector_name
    queries = None
    if cfg.detector_queries is not None:
        queries = query_names(cfg.detector_queries)
    elif name in ("grounding-dino", "sam3"):
        names = Vocabulary.from_json(text["vocabulary"]).class_names
        queries = list(dict.fromkeys(clean_class_name(n) for n in names))
    if name == "sam3" and queries is not None:
        check_concept_count(len(queries), cfg.detector_max_concepts)
    return queries


def build_dataset(cfg: LabelConfig, shard_urls: list[str], text: dict) -> ray.data.Dataset:
    """The streaming Ray Data pipeline for ``shard_urls``: it yields PART_SCHEMA rows only."""
    image_size = None if cfg.baseline else get_preset(cfg.model.preset).image_size
    chunk = cfg.decode_chunk or (DECODE_CHUNK_NO_PIXELS if image_size is None else DECODE_CHUNK)
    # As bytes: a local file name need not be UTF-8, and Arrow strings must be.
    ds: ray.data.Dataset = ray.data.from_items(
        [{"url": encode_url(u)} for u in shard_urls], override_num_blocks=max(1, len(shard_urls))
    )
    # Reading is I/O and decoding light next to the model: half a CPU each keeps them schedulable
    # beside the actors on small machines (the actors hold their CPUs for the whole job).
    ds = ds.map_batches(
        read_and_decode,  # type: ignore[arg-type]  # keyword-only arguments come from fn_kwargs, unseen by Ray's stubs
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=0.5,
        fn_kwargs={
            "image_size": image_size,
            "max_pixels": cfg.max_pixels,
            "max_prompts": cfg.max_prompts,
            "chunk": chunk,
            "s3_endpoint": cfg.model.s3_endpoint,
            # the model's device resizes, except for a detector, which sees the model's input pixels
            "resize_on_cpu": bool(cfg.sources.detector_name),
        },
    )
    if cfg.sources.detector_name:
        ds = ds.map_batches(
            DetectorStage,
            fn_constructor_kwargs={
                "spec": cfg.sources.detector_name,
                "weights": cfg.detector_weights or cfg.model.weights,
                "random_init": cfg.model.random_init,
                "score_threshold": cfg.detector_score_threshold,
                "nms_iou": cfg.detector_nms_iou,
                "max_per_image": cfg.detector_max_per_image,
                "queries": _detector_queries(cfg, text),
                "objectness_threshold": cfg.detector_objectness_threshold,
                "s3_endpoint": cfg.model.s3_endpoint,
                **(
                    {
                        "concepts": {
                            "concept_batch": cfg.detector_concept_batch,
                            "max_concepts": cfg.detector_max_concepts,
                        },
                        "keep_masks": cfg.keep_source_masks,
                    }
                    if cfg.sources.detector_name == "sam3"
                    else {}
                ),
            },
            batch_size=cfg.detector_batch_size,
            batch_format="pyarrow",
            num_gpus=cfg.detector_num_gpus or None,
            num_cpus=1 if cfg.detector_num_gpus else 0.5,
            compute=ray.data.ActorPoolStrategy(size=cfg.detector_concurrency),
        )
    conc = cfg.actors
    stage, kwargs, num_cpus = _model_stage(cfg, text)
    ds = ds.map_batches(
        stage,
        fn_constructor_kwargs=kwargs,
        batch_size=cfg.images_per_call or max(64, cfg.batch_size),
        batch_format="pyarrow",
        num_gpus=cfg.num_gpus or None,
        num_cpus=num_cpus,
        compute=ray.data.ActorPoolStrategy(min_size=conc[0], max_size=conc[1]),
    )
    # Parts of up to PART_ROWS images, whatever the model's batch: fewer tasks and files per image.
    return ds.map_batches(
        write_parts,  # type: ignore[arg-type]  # keyword-only arguments come from fn_kwargs, unseen by Ray's stubs
        batch_size=max(PART_ROWS, cfg.batch_size),
        batch_format="pyarrow",
        num_cpus=0.25,
        fn_kwargs={"output": cfg.output, "s3_endpoint": cfg.model.s3_endpoint},
    )
