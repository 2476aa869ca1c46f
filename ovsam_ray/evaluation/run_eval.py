"""``ovsam-ray eval``: the paper's evaluations as Ray jobs on shards that carry ground truth.

interactive (Table 1): every shard is copied with ground-truth prompts (boxes and/or interior
points, one Ray task per shard) into ``<output>/shards_<prompts>/``, the label job labels them
into ``<output>/labels_<prompts>/``, and one Ray task per shard scores its objects (mask IoU,
top-1 accuracy; base/novel from the vocabulary's ``seen`` flags).

detector (Tables 2 and 4): the shards' detector boxes (``convert detections``) are the prompts;
the label job writes ``<output>/labels_detector/``; one Ray task per shard collects ground truth
and predictions; the driver runs COCOeval (mask AP on all, base and novel categories, and on
LVIS's rare/common/frequent when the categories say so) and LVISEval when ``lvis`` is installed.

Both write ``<output>/metrics.json`` and ``<output>/metrics.md``. ``labels`` scores an existing
label output instead of running the label job (interactive: it must come from this command's
prompted shards, given as ``input``). A rerun resumes the label job (committed shards are kept).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from ovsam_ray import storage
from ovsam_ray.data.gt_prompts import PROMPT_MODES, rewrite_shard_prompts
from ovsam_ray.data.shards import list_shards, shard_name, shard_names
from ovsam_ray.errors import ConfigError, MissingInputError
from ovsam_ray.evaluation.coco_ap import (
    ap_markdown,
    coco_dataset,
    instance_results,
    lvis_mask_ap,
    mask_ap,
)
from ovsam_ray.evaluation.table1 import (
    ClassLookup,
    ObjectScore,
    label_shard_pairs,
    score_label_shard,
    shard_metas,
    summarize,
    table1_markdown,
)
from ovsam_ray.inference import ModelConfig
from ovsam_ray.labels.categories import load_categories
from ovsam_ray.labels.reader import read_label_file
from ovsam_ray.labels.run_record import read_run_record
from ovsam_ray.labels.schema import RUN_RECORD_NAME
from ovsam_ray.labels.scores import LABEL_SOURCES, SCORE_MODES
from ovsam_ray.locations import check_disjoint
from ovsam_ray.vocabulary import Vocabulary, clean_class_name
from ovsam_ray.written import OutputClashError

__all__ = ["EVAL_MODES", "EvalConfig", "eval_vocabulary", "run_eval"]

log = logging.getLogger(__name__)

EVAL_MODES = ("interactive", "detector")
_IMAGE_FIELDS = ("neg_category_ids", "not_exhaustive_category_ids")


@dataclass
class EvalConfig:
    """One evaluation; CLI flags map one to one onto fields, each field's ``metadata`` holding its
    flag's help text (``cli/flags.py``). model: None only with labels (the label output's run record
    then names the model and vocabulary); its flags are :class:`ModelConfig`'s.
    """

    input: str = field(metadata={"help": "shards with ground-truth annotations (detector: and boxes)"})
    output: str = field(metadata={"help": "folder or s3:// prefix: prompted shards, labels, metrics"})
    mode: str = field(
        default="interactive",
        metadata={"choices": EVAL_MODES, "help": "interactive (ground-truth prompts) or detector-box mask AP"},
    )
    prompts: str = field(default="both", metadata={"choices": ("box", "point", "both"), "help": "interactive prompts"})
    label_source: str = field(default="ovsam", metadata={"choices": LABEL_SOURCES, "help": "detector mode labels"})
    score: str = field(default="auto", metadata={"choices": SCORE_MODES, "help": "detector mode scores"})
    categories: str | None = field(
        default=None,
        metadata={
            "help": (
                "COCO/LVIS json (or _categories.json) with the full category list (default: the categories seen in "
                "the ground truth)"
            )
        },
    )
    max_dets: int = field(default=100, metadata={"help": "detections per image for AP (LVIS: 300)"})
    labels: str | None = field(
        default=None, metadata={"help": "score this existing label output instead of running the label job"}
    )
    model: ModelConfig | None = field(default=None, metadata={"cli": False})
    batch_size: int = field(default=4, metadata={"help": "images per model forward"})
    concurrency: int | tuple[int, int] = field(
        default=1, metadata={"help": "model actors: N (a fixed pool) or MIN,MAX (an autoscaling one)"}
    )
    num_gpus: float = field(default=0.0, metadata={"help": "GPUs per model actor (0: run on CPUs)"})
    overwrite: bool = field(default=False, metadata={"help": "redo prompted shards and labels"})

    def __post_init__(self) -> None:
        if self.mode not in EVAL_MODES:
            raise ConfigError(f"mode={self.mode!r}: choose one of {EVAL_MODES}")
        if self.prompts not in PROMPT_MODES or self.prompts == "none":
            raise ConfigError(f"prompts={self.prompts!r}: choose box, point or both")
        if self.label_source not in LABEL_SOURCES or self.score not in SCORE_MODES:
            raise ConfigError(f"label_source must be one of {LABEL_SOURCES} and score one of {SCORE_MODES}")
        if self.max_dets < 1:
            raise ConfigError(f"max_dets={self.max_dets}: must be >= 1")
        if self.model is None and self.labels is None:
            raise ConfigError("no model: give the model (weights or random_init) or an existing label output")
        check_disjoint(
            [("--input", self.input), ("--labels", self.labels), ("--categories", self.categories)],
            [("--output", storage.join(self.output, name)) for name in self.written()],
        )

    def written(self) -> list[str]:
        """What the evaluation writes below ``output``: the metrics, and without ``labels`` the
        label job's output (and, interactive, the prompted shards it labels)."""
        names = ["metrics.json", "metrics.md"]
        if self.labels is None:
            names += (
                [f"shards_{self.prompts}", f"labels_{self.prompts}"]
                if self.mode == "interactive"
                else ["labels_detector"]
            )
        return names


def _model_from_run_record(labels: str, s3_endpoint: str | None) -> ModelConfig:
    record = read_run_record(labels, s3_endpoint=s3_endpoint)
    if record is None:
        raise MissingInputError(
            f"{storage.redact(labels)} has no {RUN_RECORD_NAME}: give the model (--weights or "
            "--random-init) to score a label output that has no run record"
        )
    model = dict((record.get("details", {}).get("config") or {}).get("model") or {})
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in model.items() if k in names})


def eval_vocabulary(model: ModelConfig) -> Vocabulary:
    """The vocabulary (with its seen/excluded flags) that the label job labels with for ``model``.
    Loads the model on the driver once: the seen flags may come from the checkpoint's metadata."""
    from ovsam_ray.inference import load_model, resolve_vocabulary
    from ovsam_ray.vocabulary import load_vocabulary

    if model.class_embeddings:
        if not model.vocab:
            raise ConfigError("evaluation with class_embeddings needs the vocabulary (vocab) to name the classes")
        return load_vocabulary(model.vocab)
    return resolve_vocabulary(model, load_model(model))


# --- Ray tasks (one per shard) -------------------------------------------------------------------


def _score_interactive_shard(
    label_url: str, shard_url: str, lookup: ClassLookup, s3_endpoint: str | None
) -> dict[str, Any]:
    records, counts = score_label_shard(label_url, shard_url, lookup, s3_endpoint)
    return {"records": [dataclasses.astuple(r) for r in records], **counts}


def _detector_shard(label_url: str, shard_url: str, s3_endpoint: str | None) -> list[dict[str, Any]]:
    metas = shard_metas(shard_url, s3_endpoint)
    keep = ("label", "detector_label", "shard_label", "label_score", "detector_score", "rle")
    out = []
    for row in read_label_file(label_url, s3_endpoint=s3_endpoint):
        meta = metas.get(row["key"], {})
        out.append(
            {
                "shard": row["shard"],
                "key": row["key"],
                "status": row["status"],
                "width": row["width"] or meta.get("width"),
                "height": row["height"] or meta.get("height"),
                "annotations": meta.get("annotations") or [],
                "image_fields": {k: meta[k] for k in _IMAGE_FIELDS if k in meta},
                "instances": [{k: inst.get(k) for k in keep} for inst in row["instances"] or []],
            }
        )
    return out


def _map_shards(fn: Any, pairs: list[tuple[str, str]], *args: Any) -> list[Any]:
    """Run ``fn(label_url, shard_url, *args)`` as one Ray task per shard."""
    import ray

    task = ray.remote(num_cpus=1)(fn)
    return ray.get([task.remote(label_url, shard_url, *args) for label_url, shard_url in pairs])


# --- the two modes -------------------------------------------------------------------------------


def _label(cfg: EvalConfig, input_url: str, labels_url: str) -> dict[str, Any]:
    from ovsam_ray.pipeline.label_job import LabelConfig, run_label

    assert cfg.model is not None, "run_eval fills it in from the run record"
    summary = run_label(
        LabelConfig(
            input=input_url,
            output=labels_url,
            model=cfg.model,
            batch_size=cfg.batch_size,
            concurrency=cfg.concurrency,
            num_gpus=cfg.num_gpus,
            overwrite=cfg.overwrite,
            max_error_fraction=1.0,
        )
    )
    return summary.to_dict()


def _prompted_shards(cfg: EvalConfig, shards: list[str], lookup: ClassLookup, s3: str | None) -> str:
    import ray

    work = storage.join(cfg.output, f"shards_{cfg.prompts}")
    task = ray.remote(num_cpus=1)(rewrite_shard_prompts)
    todo = [
        u
        for u in shards
        if cfg.overwrite or not storage.exists(storage.join(work, f"{shard_name(u)}.tar"), s3_endpoint=s3)
    ]
    counts = ray.get(
        [
            task.remote(  # type: ignore[call-arg]  # Ray's stubs type .remote() with the positional arguments only
                u, storage.join(work, f"{shard_name(u)}.tar"), mode=cfg.prompts, keep=lookup.keep, s3_endpoint=s3
            )
            for u in todo
        ]
    )
    log.info(
        "eval: %d shards with ground-truth %s prompts (%d prompts) -> %s",
        len(todo),
        cfg.prompts,
        sum(c["prompts"] for c in counts),
        storage.redact(work),
    )
    return work


def _interactive(cfg: EvalConfig, shards: list[str], lookup: ClassLookup, s3: str | None) -> dict[str, Any]:
    if cfg.labels is None:
        work = _prompted_shards(cfg, shards, lookup, s3)
        labels = storage.join(cfg.output, f"labels_{cfg.prompts}")  # EvalConfig.written() names it
        label_summary = _label(cfg, work, labels)
        shards = list_shards(work, s3_endpoint=s3)
    else:
        labels, label_summary = cfg.labels, None
    parts = _map_shards(_score_interactive_shard, label_shard_pairs(labels, shards, s3), lookup, s3)
    records = [ObjectScore(*r) for p in parts for r in p["records"]]
    counts = {k: sum(p[k] for p in parts) for k in ("images", "images_error", "prompts_without_instance")}
    metrics = summarize(records)
    return {
        "metrics": metrics,
        "counts": counts,
        "labels": labels,
        "label_job": label_summary,
        "markdown": table1_markdown(metrics),
    }


def _categories(cfg: EvalConfig, images: list[dict[str, Any]], s3: str | None) -> list[dict[str, Any]]:
    """The given category list, else every (category_id, category_name) in the ground truth."""
    if cfg.categories:
        return load_categories(cfg.categories, s3_endpoint=s3)
    cats: dict[int, str] = {}
    for image in images:
        for ann in image["annotations"]:
            if ann.get("category_id") is not None:
                cats.setdefault(int(ann["category_id"]), str(ann.get("category_name", ann["category_id"])))
    return [{"id": c, "name": n} for c, n in sorted(cats.items())]


def _subsets(categories: list[dict[str, Any]], lookup: ClassLookup) -> dict[str, list[int]]:
    kept: list[int] = []
    base: list[int] = []
    novel: list[int] = []
    for c in categories:
        i = lookup.index({"category_name": c["name"]})
        if i >= 0 and lookup.excluded[i]:
            continue  # the protocol does not evaluate it (COCO-OV's 15 classes)
        kept.append(int(c["id"]))
        (base if i >= 0 and lookup.seen[i] else novel).append(int(c["id"]))
    subsets = {"all": kept, "base": base, "novel": novel}
    for freq in ("r", "c", "f"):
        ids = [int(c["id"]) for c in categories if c.get("frequency") == freq and int(c["id"]) in kept]
        if ids:
            subsets[f"frequency_{freq}"] = ids
    return subsets


def _detector(cfg: EvalConfig, shards: list[str], lookup: ClassLookup, s3: str | None) -> dict[str, Any]:
    if cfg.labels is None:
        labels = storage.join(cfg.output, "labels_detector")
        label_summary = _label(cfg, cfg.input, labels)
    else:
        labels, label_summary = cfg.labels, None
    images = [img for part in _map_shards(_detector_shard, label_shard_pairs(labels, shards, s3), s3) for img in part]
    categories = _categories(cfg, images, s3)
    cat_ids = {clean_class_name(str(c["name"])): int(c["id"]) for c in categories}
    gt_images, gt_anns, results, dropped = [], [], [], 0
    for image_id, image in enumerate(images, start=1):
        gt_images.append(
            {
                "id": image_id,
                "width": image["width"],
                "height": image["height"],
                "file_name": f"{image['shard']}/{image['key']}",
                **image["image_fields"],
            }
        )
        gt_anns += [{**a, "image_id": image_id} for a in image["annotations"] if a.get("category_id") is not None]
        res, n = instance_results(image["instances"], image_id, cat_ids, label_source=cfg.label_source, score=cfg.score)
        results += res
        dropped += n
    gt = coco_dataset(gt_images, gt_anns, categories)
    metrics: dict[str, dict[str, float | None]] = {
        name: mask_ap(gt, results, cat_ids=ids, max_dets=cfg.max_dets)
        for name, ids in _subsets(categories, lookup).items()
    }
    lvis = lvis_mask_ap(gt, results)
    if lvis is not None:
        metrics["lvis"] = {**lvis}
    counts = {
        "images": len(gt_images),
        "images_error": sum(i["status"] != "ok" for i in images),
        "ground_truth": len(gt_anns),
        "detections": len(results),
        "dropped_unknown_label": dropped,
    }
    return {
        "metrics": metrics,
        "counts": counts,
        "labels": labels,
        "label_job": label_summary,
        "markdown": ap_markdown(metrics),
    }


def _check_metrics_ours(output: str, s3: str | None) -> None:
    """Refuse (one line naming the file) an output whose ``metrics.json``/``metrics.md`` an
    evaluation of ours did not write: a rerun rewrites its own metrics, never a user's file."""
    json_url, md_url = storage.join(output, "metrics.json"), storage.join(output, "metrics.md")
    for url in (json_url, md_url):
        if not storage.exists(url, s3_endpoint=s3):
            continue
        data = storage.read_bytes(url, s3_endpoint=s3)
        if url == md_url:
            ours = data.startswith(b"# ovsam-ray eval")
        else:
            try:
                obj = json.loads(data)
            except ValueError:
                obj = None
            ours = isinstance(obj, dict) and {"mode", "config", "metrics"} <= obj.keys()
        if not ours:
            raise OutputClashError(
                f"{storage.redact(url)} was not written by ovsam-ray eval and the evaluation would "
                "overwrite it: move it away or choose another --output"
            )


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Run the evaluation; returns what ``metrics.json`` holds (``metrics``, ``counts``, ...)."""
    _check_metrics_ours(cfg.output, cfg.model.s3_endpoint if cfg.model else None)
    if cfg.model is None:
        cfg = dataclasses.replace(cfg, model=_model_from_run_record(cfg.labels or "", None))
    model = cfg.model
    assert model is not None
    s3 = model.s3_endpoint
    lookup = ClassLookup(eval_vocabulary(model))
    shards = list_shards(cfg.input, s3_endpoint=s3)
    shard_names(shards)  # the prompted shards and label files are named after them: refuse a clash
    result = (_interactive if cfg.mode == "interactive" else _detector)(cfg, shards, lookup, s3)
    markdown = result.pop("markdown")
    title = f"# ovsam-ray eval: {cfg.mode}" + (
        f" ({cfg.prompts} prompts)" if cfg.mode == "interactive" else f" (labels from {cfg.label_source})"
    )
    warning = "\n**random weights: these numbers measure nothing**\n" if model.random_init else ""
    counts = ", ".join(f"{k}={v}" for k, v in result["counts"].items())
    report = f"{title}\n{warning}\n{markdown}\n{counts}\n"
    record = {"mode": cfg.mode, "config": storage.redact_config(dataclasses.asdict(cfg)), **result}
    storage.atomic_write_bytes(
        storage.join(cfg.output, "metrics.json"), json.dumps(record, indent=1).encode(), s3_endpoint=s3
    )
    storage.atomic_write_bytes(storage.join(cfg.output, "metrics.md"), report.encode(), s3_endpoint=s3)
    log.info("eval results -> %s (metrics.json, metrics.md)", storage.redact(cfg.output))
    return {**record, "markdown": report}
