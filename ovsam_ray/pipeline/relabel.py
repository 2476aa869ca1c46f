"""``ovsam-ray relabel``: re-score stored embeddings with a new vocabulary, no images needed.

The input must come from a label job run with ``--with-embedding``: each instance then holds its
float16 region and CLIP embeddings and the CLIP-validity flag, and the job classified from those
same float16 values, so re-scoring with vocabulary V gives exactly what the label job with V
gives. Masks, boxes and prompts are copied unchanged. One Ray task per committed shard; each
output shard is committed atomically as in the label job.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray
import torch

from ovsam_ray import storage
from ovsam_ray.errors import ConfigError, MissingInputError
from ovsam_ray.inference import ModelConfig, load_model, vocabulary_text
from ovsam_ray.labels.committer import ShardCommitter
from ovsam_ray.labels.run_record import RunRecord, check_or_write_run_record, read_run_record
from ovsam_ray.labels.schema import RUN_RECORD_NAME, rows_to_table
from ovsam_ray.locations import check_disjoint
from ovsam_ray.model.classifier import OpenVocabClassifier
from ovsam_ray.model.functional import labels_from_logits
from ovsam_ray.pipeline.lease import OutputLease, check_not_being_written
from ovsam_ray.pipeline.ownership import ALLOW_FOREIGN_FILES_HELP, check_output_owned
from ovsam_ray.pipeline.stats import format_stats, shard_stats, write_run_stats, write_shard_stats
from ovsam_ray.vocabulary import BUILTIN_VOCABULARIES, Vocabulary

log = logging.getLogger(__name__)


@dataclass
class RelabelConfig:
    """Settings of one relabel run; CLI flags map one to one onto fields (help in their metadata)."""

    input: str = field(metadata={"help": "a label output written with --with-embedding"})
    output: str = field(metadata={"help": "output folder or s3:// prefix (one Parquet per shard)"})
    vocab: str = field(
        metadata={"help": f"the new vocabulary: {', '.join(BUILTIN_VOCABULARIES)}, or a .txt/.json file"}
    )
    overwrite: bool = field(default=False, metadata={"help": "delete a different run's outputs and start over"})
    s3_endpoint: str | None = field(
        default=None, metadata={"help": "S3-compatible endpoint URL (else AWS_ENDPOINT_URL)"}
    )
    allow_foreign_files: bool = field(default=False, metadata={"help": ALLOW_FOREIGN_FILES_HELP})

    def __post_init__(self) -> None:
        # relabel writes a new output: never the input, inside it or around it, however spelled
        check_disjoint([("--input", self.input)], [("--output", self.output)])


def _source_model_config(cfg: RelabelConfig) -> tuple[ModelConfig, dict]:
    record = read_run_record(cfg.input, s3_endpoint=cfg.s3_endpoint)
    if record is None:
        raise MissingInputError(
            f"{storage.redact(cfg.input)} has no {RUN_RECORD_NAME}: relabel reads a label job's output "
            "folder (its run record names the model)"
        )
    if not record["identity"].get("with_embedding"):
        raise ConfigError(
            f"{storage.redact(cfg.input)} was labelled without --with-embedding: no embeddings to re-score"
        )
    model = dict(record["details"]["config"]["model"])
    model.update(vocab=cfg.vocab, class_embeddings=None, s3_endpoint=cfg.s3_endpoint or model.get("s3_endpoint"))
    return ModelConfig(**model), record


def rescore_rows(
    rows: list[dict[str, Any]], classifier: OpenVocabClassifier, vocab: Vocabulary, topk: int
) -> list[dict[str, Any]]:
    """New labels for every instance of ``rows`` from its stored embeddings."""
    for row in rows:
        insts = row["instances"] or []
        if not insts:
            continue
        region = torch.tensor(np.asarray([i["embedding"] for i in insts], np.float32))
        clip = torch.tensor(np.asarray([i["clip_embedding"] for i in insts], np.float32))
        valid = torch.tensor([bool(i["clip_valid"]) for i in insts])
        fused = classifier(region, clip, valid).fused_logits
        labels, ids, scores = labels_from_logits(fused, topk)
        for inst, lab, top_ids, top_scores in zip(insts, labels.tolist(), ids.tolist(), scores.tolist()):
            inst.update(
                label=vocab.class_names[lab],
                label_id=int(vocab.class_ids[lab]),
                label_score=top_scores[0],
                topk_labels=[vocab.class_names[k] for k in top_ids],
                topk_scores=top_scores,
            )
    return rows


def _relabel_shard(item: dict[str, Any], *, cfg: RelabelConfig, text_ref: Any, topk: int) -> dict[str, Any]:
    text = ray.get(text_ref) if isinstance(text_ref, ray.ObjectRef) else text_ref
    vocab = Vocabulary.from_json(text["vocabulary"])
    classifier = OpenVocabClassifier(
        text_embeddings=text["embeddings"],
        seen=vocab.seen_tensor(),
        excluded=vocab.excluded_tensor(),
        logit_scale=text["logit_scale"],
    )
    name = item["shard"]
    with storage.open_url(storage.join(cfg.input, f"{name}.parquet"), s3_endpoint=cfg.s3_endpoint) as f:
        rows = pq.read_table(f).to_pylist()
    rows = rescore_rows(rows, classifier, vocab, topk)
    committer = ShardCommitter(cfg.output, s3_endpoint=cfg.s3_endpoint)
    committer.commit(name, rows_to_table(rows), {"relabelled_from": storage.redact(cfg.input)})
    write_shard_stats(cfg.output, name, shard_stats(rows), s3_endpoint=cfg.s3_endpoint)
    return {"shard": name, "rows": len(rows)}


def run_relabel(cfg: RelabelConfig, *, connect: Callable[[], None] | None = None) -> dict[str, Any]:
    """Re-score every committed shard of ``cfg.input``; returns a summary. Holds the output's
    lease (as the label job does) from before the first file is written until the end.
    ``connect``: called once the input and output are checked, before anything runs on Ray (a
    refused run costs no cluster start)."""
    with OutputLease(cfg.output, s3_endpoint=cfg.s3_endpoint) as lease:
        return _run_leased(cfg, lease, connect)


def _run_leased(cfg: RelabelConfig, lease: OutputLease, connect: Callable[[], None] | None) -> dict[str, Any]:
    t0 = time.time()
    # a source still being labelled would be relabelled in part, and the rest silently missing
    check_not_being_written(cfg.input, "--input", s3_endpoint=cfg.s3_endpoint)
    source_shards = ShardCommitter(cfg.input, s3_endpoint=cfg.s3_endpoint)
    missing = source_shards.markers_without_parquet()
    if missing:  # never a shard silently short, never a worker's traceback
        raise source_shards.missing_file_error(missing[0])
    model_cfg, source = _source_model_config(cfg)
    loaded = load_model(model_cfg)
    embeddings, vocab = vocabulary_text(model_cfg, loaded, "cpu")
    identity = {
        **source["identity"],
        "vocabulary": {"name": vocab.name, "sha256": vocab.sha256, "num_classes": vocab.num_classes},
    }
    record = RunRecord(
        identity=identity,
        details={"relabel_of": storage.redact(cfg.input), "config": storage.redact_config(dataclasses.asdict(cfg))},
    )
    shards = ShardCommitter(cfg.input, s3_endpoint=cfg.s3_endpoint).committed_shards()
    check_output_owned(cfg.output, shards, allow_foreign_files=cfg.allow_foreign_files, s3_endpoint=cfg.s3_endpoint)
    check_or_write_run_record(cfg.output, record, overwrite=cfg.overwrite, s3_endpoint=cfg.s3_endpoint, shards=shards)
    done = ShardCommitter(cfg.output, s3_endpoint=cfg.s3_endpoint).committed_shards()
    todo = sorted(shards - done)
    text = {"embeddings": embeddings, "vocabulary": vocab.to_json(), "logit_scale": loaded.logit_scale}
    results = []
    if todo:
        if connect is not None:
            connect()
        ds: ray.data.Dataset = ray.data.from_items([{"shard": n} for n in todo], override_num_blocks=len(todo))
        # keyword-only arguments come from fn_kwargs, unseen by Ray's stubs
        ds = ds.map(_relabel_shard, fn_kwargs={"cfg": cfg, "text_ref": ray.put(text), "topk": model_cfg.topk})  # type: ignore[arg-type]
        results = ds.take_all()
    lease.check()
    stats = write_run_stats(cfg.output, s3_endpoint=cfg.s3_endpoint)
    log.info(format_stats(stats))
    return {
        "shards_relabelled": len(results),
        "shards_skipped": len(done),
        "rows": sum(r["rows"] for r in results),
        "wall_time_s": time.time() - t0,
        "vocabulary": vocab.name,
    }
