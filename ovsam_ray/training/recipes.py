"""The paper's training runs as named recipes, value for value from the reference configs.

``ovsam-ray train distill --recipe sam2clip_vith_rn50x16`` and ``ovsam-ray train cotrain --recipe
clip2sam_coco_rn50x16 | clip2sam_lvis_rn50x16`` start from a recipe; every flag still overrides
one field. A recipe holds the reference's numbers (``tests/training/test_training_recipes.py`` checks each
against the reference file and line); what it cannot hold is the data: the user's shards of SA-1B
1%, COCO train2017 or LVIS v1 train.

Epochs become optimizer steps: ``epochs x ceil(epoch_images / global batch)``. ``epoch_images`` is
given, or counted over the shards listed: from the converter's ``_image_classes.parquet``, the
images that keep a trained class (the sample builder drops the others: the paper's COCO-OV base
split trains on 107,761 of train2017's 118,287 images), else from its ``_convert.json``. The
global batch is workers x per-worker batch x accumulation, and the lr scales linearly with
global batch / 16 as the reference's ``auto_scale_lr`` (``OptimConfig.base_batch_size``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc

from ovsam_ray.data.shards import IMAGE_CLASSES_FILE
from ovsam_ray.errors import ConfigError
from ovsam_ray.model.classifier import RELEASED_LOGIT_SCALE
from ovsam_ray.training.config import (
    CotrainConfig,
    DatasetSpec,
    DistillConfig,
    ModelSpec,
    OptimConfig,
    RunSpec,
    distill_optim,
)
from ovsam_ray.training.label_space import DatasetLabels, build_label_space

log = logging.getLogger(__name__)

STAGES = ("distill", "cotrain")
# The reference trains on 8 GPUs x 2 images (schedule_*.py: "base_batch_size = (8 GPUs) x (2 samples per GPU)").
# It trains in fp32 (no AmpOptimWrapper in schedule_*.py's optim_wrapper).
_REFERENCE_RUN = {"num_workers": 8, "use_gpu": True, "batch_size": 2, "grad_accum": 1, "precision": "fp32"}


@dataclass(frozen=True)
class Recipe:
    """A named training run: its stage, what it reproduces, and the config fields it sets
    (``run``/``model``/``optim`` sub-dicts and the stage's own fields)."""

    name: str
    stage: str
    reproduces: str
    run: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    optim: dict[str, Any] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)


def sam2clip_vith_rn50x16() -> Recipe:
    """SAM2CLIP distillation of SAM ViT-H into the RN50x16 adapter (configs/sam2clip/sam2clip_vith_rn50x16.py)."""
    return Recipe(
        name="sam2clip_vith_rn50x16",
        stage="distill",
        reproduces="the released sam2clip_vith_rn50x16.pth: 24 epochs of SA-1B 1% (the adapter of every table)",
        run=dict(_REFERENCE_RUN),
        model={"preset": "ovsam_rn50x16"},
        optim=dataclasses.asdict(distill_optim()),
        fields={"teacher": "vit_h", "epochs": 24, "flip_prob": 0.0, "teacher_feature_dtype": "float32"},
    )


def _clip2sam(name: str, reproduces: str, train_vocab: str, lsj_range: tuple[float, float]) -> Recipe:
    return Recipe(
        name=name,
        stage="cotrain",
        reproduces=reproduces,
        run=dict(_REFERENCE_RUN),
        model={"preset": "ovsam_rn50x16"},
        optim=dataclasses.asdict(OptimConfig()),
        fields={
            "train_vocab": train_vocab,
            "epochs": 12,
            "num_prompts": 40,
            "lsj_range": lsj_range,
            "flip_prob": 0.5,
            "min_mask_area": 32,
            "num_points": 12544,
            "oversample_ratio": 3.0,
            "importance_sample_ratio": 0.75,
            "cls_weight": 2.0,
            "mask_weight": 5.0,
            "dice_weight": 5.0,
            "background_weight": 0.1,
            "logit_scale": RELEASED_LOGIT_SCALE,
            "learn_logit_scale": False,
            "train_adapter": False,
            "roi_from_prediction": 0.0,
            "instance_selection": "first",
            "crop_tries": 1,
        },
    )


def clip2sam_coco_rn50x16() -> Recipe:
    """CLIP2SAM on COCO's 48 base classes (configs/clip2sam/clip2sam_coco_rn50x16.py)."""
    return _clip2sam(
        "clip2sam_coco_rn50x16",
        "the released clip2sam_coco_rn50x16.pth: the COCO open-vocabulary rows (base/novel) of the paper's Table 1",
        "coco_ov",
        (0.9, 2.0),
    )


def clip2sam_lvis_rn50x16() -> Recipe:
    """CLIP2SAM on LVIS v1 without the rare classes (configs/clip2sam/clip2sam_lvis_rn50x16.py)."""
    return _clip2sam(
        "clip2sam_lvis_rn50x16",
        "the released clip2sam_lvis_rn50x16.pth: the LVIS rows (all/rare) of the paper's Table 1",
        "lvis_v1",
        (0.1, 2.0),
    )


RECIPES = {
    "sam2clip_vith_rn50x16": sam2clip_vith_rn50x16,
    "clip2sam_coco_rn50x16": clip2sam_coco_rn50x16,
    "clip2sam_lvis_rn50x16": clip2sam_lvis_rn50x16,
}


def get_recipe(name: str, stage: str | None = None) -> Recipe:
    """The recipe ``name``; an error listing the known ones (of ``stage``) otherwise."""
    known = sorted(n for n, f in RECIPES.items() if stage is None or f().stage == stage)
    if name not in RECIPES or (stage is not None and RECIPES[name]().stage != stage):
        raise ConfigError(f"unknown {stage or 'training'} recipe {name!r}; known: {known}")
    return RECIPES[name]()


def build_config(
    stage: str,
    *,
    datasets: list[DatasetSpec],
    recipe: str | None = None,
    run: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    optim: dict[str, Any] | None = None,
    **fields: Any,
) -> CotrainConfig | DistillConfig:
    """The stage's defaults, overridden by the recipe, overridden by the given fields (the flags)."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; known: {STAGES}")
    r = get_recipe(recipe, stage) if recipe else Recipe(name="", stage=stage, reproduces="")
    base_optim = dataclasses.asdict(distill_optim() if stage == "distill" else OptimConfig())
    cls = DistillConfig if stage == "distill" else CotrainConfig
    return cls(
        run=RunSpec(**{**r.run, **(run or {})}),
        datasets=datasets,
        model=ModelSpec(**{**r.model, **(model or {})}),
        optim=OptimConfig(**{**base_optim, **r.optim, **(optim or {})}),
        **{**r.fields, **fields},
    )


# --- epochs -> steps ---------------------------------------------------------------------------------


def dataset_images(spec: DatasetSpec, labels: DatasetLabels | None = None, *, s3_endpoint: str | None = None) -> int:
    """Images in one pass over ``spec``'s shards. With ``labels`` (its training label map) and the
    converter's ``_image_classes.parquet`` beside the shards: the listed shards' images with a
    non-crowd annotation of a trained class (the others give no sample). Else the converter's
    ``_convert.json`` (``images`` x listed shards / ``shards``); an error naming the fix when there is none."""
    from ovsam_ray import storage
    from ovsam_ray.data.shards import list_shards

    if spec.corrections:  # a label output: its reviewed (or ok) images
        from ovsam_ray.training.label_source import label_dataset_images

        return label_dataset_images(spec, s3_endpoint=s3_endpoint)
    shards = list_shards(spec.shards, s3_endpoint=s3_endpoint)
    folder = shards[0].rstrip("/").rsplit("/", 1)[0]
    if labels is not None and spec.kind != "image":
        kept = _images_with_trained_classes(storage.join(folder, IMAGE_CLASSES_FILE), shards, labels, s3_endpoint)
        if kept is not None:
            return max(1, kept)
        log.warning(
            "dataset %r: no %s beside its shards (converted before it was written?): an epoch counts every "
            "converted image, including those without a trained class; reconvert or pass --epoch-images N",
            spec.name,
            IMAGE_CLASSES_FILE,
        )
    summary_url = storage.join(folder, "_convert.json")
    try:
        summary = json.loads(storage.read_bytes(summary_url, s3_endpoint=s3_endpoint))
        images, total_shards = int(summary["images"]), max(int(summary["shards"]), 1)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"cannot tell how many images one epoch of dataset {spec.name!r} holds ({type(e).__name__} "
            f"reading {storage.redact(summary_url)}): pass --epoch-images N or --max-steps N"
        ) from e
    return max(1, round(images * min(len(shards), total_shards) / total_shards))


def _images_with_trained_classes(
    url: str, shards: list[str], labels: DatasetLabels, s3_endpoint: str | None
) -> int | None:
    """Images of ``shards`` in the ``_image_classes.parquet`` at ``url`` with a trained class; None without the file."""
    import pyarrow.parquet as pq

    from ovsam_ray import storage

    try:
        data = storage.read_bytes(url, s3_endpoint=s3_endpoint)
    except FileNotFoundError:
        return None
    table = pq.read_table(pa.BufferReader(data), columns=["shard", "category_names", "category_ids"])
    listed = pa.array(sorted({u.rstrip("/").rsplit("/", 1)[-1] for u in shards}))
    table = table.filter(pc.is_in(table.column("shard"), listed))
    trained: dict[tuple, bool] = {}
    kept = 0
    for names, ids in zip(table.column("category_names").to_pylist(), table.column("category_ids").to_pylist()):
        for pair in zip(names, ids):
            if pair not in trained:
                ann = {k: v for k, v in zip(("category_name", "category_id"), pair) if v is not None}
                trained[pair] = labels.annotation_label(ann) >= 0
            if trained[pair]:
                kept += 1
                break
    return kept


_Stage = TypeVar("_Stage", bound=CotrainConfig | DistillConfig)


def resolve_steps(cfg: _Stage) -> _Stage:
    """``cfg`` with ``run.max_steps`` set: as given, else ``epochs x ceil(epoch_images / global
    batch)`` (``epoch_images`` given, else counted by ``dataset_images`` over the datasets, after
    co-training's class filter)."""
    if cfg.run.max_steps is not None:
        return cfg
    lookups: list[DatasetLabels | None] = [None] * len(cfg.datasets)
    if (
        isinstance(cfg, CotrainConfig)
        and not cfg.epoch_images
        and (cfg.train_vocab or any(d.vocab for d in cfg.datasets))
    ):
        lookups = list(build_label_space(cfg.datasets, cfg.train_vocab).datasets)
    images = cfg.epoch_images or sum(
        dataset_images(d, lab, s3_endpoint=cfg.run.s3_endpoint) for d, lab in zip(cfg.datasets, lookups)
    )
    steps = cfg.epochs * math.ceil(images / cfg.run.global_batch)
    log.info(
        "%d epochs of %d images at a global batch of %d: %d steps", cfg.epochs, images, cfg.run.global_batch, steps
    )
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, max_steps=steps), epoch_images=images)


def _precision_text(run: RunSpec) -> str:
    if run.precision == "fp32":
        return "fp32 (the reference's)"
    if run.precision == "bf16":
        return "bf16 autocast (not the reference's fp32; its effect is yet to be measured on a GPU)"
    return "auto: " + ("bf16 autocast (on the GPU)" if run.use_gpu else "fp32 (on a CPU)")


def behaviour(cfg: CotrainConfig | DistillConfig) -> dict[str, str]:
    """The facts of a run that no single field holds: how prompts, crops, precision, resizing,
    initialisation and warm-up behave under ``cfg`` (``--print-config``'s ``behaviour``)."""
    from ovsam_ray.model.clip2sam_recognizer import INIT_RULE
    from ovsam_ray.training.augment import RESIZE_FILTER
    from ovsam_ray.training.prompt_sampling import PROMPT_KINDS_RULE

    warm = cfg.optim.warmup_steps
    out = {
        "precision": _precision_text(cfg.run),
        "resize_filter": RESIZE_FILTER,
        "warmup": (
            f"linear from {cfg.optim.warmup_factor}x at step 0 to the full lr at step {warm - 1} "
            f"(mmengine LinearLR end={warm})"
            if warm > 1
            else ("none" if warm == 0 else "one step at the warm-up factor")
        ),
    }
    if isinstance(cfg, CotrainConfig):
        out["prompt_kinds"] = PROMPT_KINDS_RULE
        out["instance_selection"] = (
            f"the first {cfg.num_prompts} instances in annotation order (the reference's)"
            if cfg.instance_selection == "first"
            else f"a random {cfg.num_prompts} of the instances (a deviation: the reference trains the first)"
        )
        out["empty_crop"] = (
            "the image is dropped and the stream's next image is drawn (the reference's)"
            if cfg.crop_tries == 1
            else f"the same image is re-jittered up to {cfg.crop_tries} times, then dropped (a deviation)"
        )
        out["recognizer_init"] = INIT_RULE
    else:
        out["teacher_features"] = (
            f"{cfg.teacher_feature_dtype} (precomputed features must be stored so; an online teacher's "
            "output is rounded to it)"
            + (" (the reference's)" if cfg.teacher_feature_dtype == "float32" else " (the reference caches float32)")
        )
    return out


def describe(cfg: CotrainConfig | DistillConfig) -> dict[str, Any]:
    """What ``--print-config`` prints: the resolved config, the numbers derived from it and the
    behaviour it implies (``behaviour``)."""
    run = cfg.run
    return {
        "config": cfg.to_dict(),
        "behaviour": behaviour(cfg),
        "derived": {
            "global_batch": run.global_batch,
            "lr": cfg.optim.scaled_lr(run.global_batch),
            "steps_per_epoch": None if cfg.epoch_images is None else math.ceil(cfg.epoch_images / run.global_batch),
            "max_steps": run.max_steps,
        },
    }
