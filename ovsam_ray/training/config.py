"""Training job configs: small dataclasses that validate themselves and say how to fix a bad value.

CLI flags map one to one onto fields (see ``cli/train.py``); ``to_dict`` is the resolved
config written into every checkpoint, ``from_dict`` reads it back. Lengths are in optimizer
steps because the data streams (DESIGN §5: "12 epochs, steps at 8 and 11" becomes
``max_steps`` with ``lr_milestones=(8/12, 11/12)``); ``max_steps=None`` derives them from the
epochs, the epoch's images and the global batch (``recipes.resolve_steps``). The named recipes
of the paper (``recipes``) set these fields to the reference's values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, cast

from ovsam_ray.errors import ConfigError
from ovsam_ray.model.classifier import RELEASED_LOGIT_SCALE
from ovsam_ray.model.presets import get_preset

SCHEDULES = ("cosine", "step", "constant")
DATASET_KINDS = ("segmentation", "box", "image")
SPLITS = ("base", "all")
TEACHERS = ("vit_h", "vit_l", "vit_b", "random_tiny")
#: ``DatasetSpec.corrections``: which instances of a label output train.
CORRECTIONS_MODES = ("only", "all")


@dataclass
class DatasetSpec:
    """One training dataset of a mixture.

    shards: a shard spec (file, brace range, glob, directory or s3:// prefix; see ``list_shards``).
    kind: ``segmentation`` (COCO-style ``annotations`` with masks in the JSON), ``box``
        (COCO-style annotations with boxes and no masks, e.g. V3Det or Objects365: box prompts,
        classification loss only) or ``image`` (ImageNet-22k style: a class name or id; one
        whole-image box, classification loss only).
    ratio: relative sampling weight of this dataset's shards in the mixture.
    vocab: its vocabulary (built-in name or .txt/.json file); category ids are looked up in it.
        Optional when the JSON carries class names.
    split: the open-vocabulary protocol: ``base`` trains only the classes its vocabulary marks
        seen (coco_ov: the 48 base classes; lvis_v1: frequent + common, no rare), removing the
        other annotations and dropping images left without any, as the paper; ``all`` trains
        every class. Vocabularies without such flags (plain .txt files) are all seen.
    teacher_features: distillation only: folder of precomputed teacher-feature shards
        (``dump-teacher`` output), one ``<shard>.tar`` per input shard.
    corrections: ``shards`` is a label output (``ovsam-ray label``), not shards: its images come
        from the shards its run record names (or ``images``) and its instances (RLE masks and
        class names, review corrections applied) are the targets (``training.label_source``);
        ``only``: the instances a reviewer accepted, relabelled, edited or added (images without
        one give no sample); ``all``: every instance of the output as reviewed. Every class of the
        training vocabulary trains (``split`` does not apply: a reviewer's label is ground truth).
    images: with ``corrections``: the label output's input shards, where its run record does not
        name them (or they moved).
    """

    shards: str | list[str]
    kind: str = "segmentation"
    ratio: float = 1.0
    vocab: str | None = None
    name: str = ""
    split: str = "base"
    teacher_features: str | None = None
    corrections: str | None = None
    images: str | None = None

    def __post_init__(self) -> None:
        if self.corrections is not None and self.corrections not in CORRECTIONS_MODES:
            raise ConfigError(
                f"DatasetSpec.corrections={self.corrections!r}: use 'only' (the reviewed instances) or 'all' "
                "(the whole label output, corrections applied)"
            )
        if self.images is not None and self.corrections is None:
            raise ConfigError("DatasetSpec.images is the input shards of a label output: set corrections=only|all")
        if self.corrections is not None and self.kind != "segmentation":
            raise ConfigError("a label-output dataset (corrections=...) is kind=segmentation: its instances are masks")
        if not self.shards:
            raise ConfigError("DatasetSpec.shards is empty: give a shard file, glob, brace range or folder")
        if self.kind not in DATASET_KINDS:
            raise ConfigError(f"DatasetSpec.kind={self.kind!r}: use one of {DATASET_KINDS}")
        if self.split not in SPLITS:
            raise ConfigError(
                f"DatasetSpec.split={self.split!r}: use 'base' (the paper's protocol: seen classes only) or 'all'"
            )
        if not self.ratio > 0:
            raise ConfigError(f"DatasetSpec.ratio={self.ratio}: sampling ratios must be > 0")
        if not self.name:
            first = self.shards if isinstance(self.shards, str) else self.shards[0]
            self.name = first.rstrip("/").rsplit("/", 1)[-1] or "dataset"


# Weight-decay exemptions (``OptimConfig.no_decay``): "norm" = parameters of torch's normalisation
# layers (BatchNorm, InstanceNorm, GroupNorm, LayerNorm; mmengine's ``norm_decay_mult=0``, which
# does not cover SAM's own LayerNorm2d), "bias" = every ``*.bias``, "1d" = every parameter with
# ndim <= 1; any other word is a substring of the parameter name (mmengine's ``custom_keys``
# with ``decay_mult=0``).
NO_DECAY_RULES = ("norm", "bias", "1d")


@dataclass
class OptimConfig:
    """AdamW + schedule. Defaults: the reference co-training optimiser (``schedule_12e.py``):
    lr 1e-4, wd 0.05, betas (0.9, 0.999), eps 1e-8, no decay on norm layers, 500 linear warm-up
    steps from 0.001x, gradient norm clipped to 0.01, x0.1 at 8/12 and 11/12, the lr scaled
    linearly by global batch / 16 (``base_batch_size``; None: no scaling). Distillation's defaults
    (``distill_optim``) differ: clip 5.0 and a cosine to 0.01x (``schedule_distillation.py``).

    min_lr_factor: the cosine's floor as a fraction of the lr (mmengine's ``eta_min_ratio``).
    """

    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    no_decay: tuple[str, ...] = ("norm", "query_embed", "query_feat", "level_embed")
    schedule: str = "step"
    lr_milestones: tuple[float, ...] = (8 / 12, 11 / 12)
    lr_gamma: float = 0.1
    warmup_steps: int = 500
    warmup_factor: float = 0.001
    min_lr_factor: float = 0.0
    grad_clip: float | None = 0.01
    base_batch_size: int | None = 16

    def __post_init__(self) -> None:
        self.betas = cast(tuple[float, float], tuple(self.betas))
        self.no_decay = tuple(str(r) for r in self.no_decay)
        self.lr_milestones = tuple(float(m) for m in self.lr_milestones)
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr} must be > 0")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay={self.weight_decay} must be >= 0")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule={self.schedule!r}: use one of {SCHEDULES}")
        if any(not 0 < m <= 1 for m in self.lr_milestones):
            raise ConfigError(f"lr_milestones={self.lr_milestones}: give fractions of max_steps in (0, 1]")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps={self.warmup_steps} must be >= 0")
        if not 0 <= self.min_lr_factor <= 1:
            raise ConfigError(f"min_lr_factor={self.min_lr_factor} must be in [0, 1] (the cosine's floor / lr)")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"grad_clip={self.grad_clip}: use a positive max norm or None to disable")
        if self.base_batch_size is not None and self.base_batch_size < 1:
            raise ConfigError(
                f"base_batch_size={self.base_batch_size}: the batch the lr is given for "
                "(reference: 16), or None for no lr scaling"
            )

    def scaled_lr(self, global_batch: int) -> float:
        """The lr for ``global_batch`` images per step: linear scaling from ``base_batch_size``
        (mmengine's ``auto_scale_lr``), or the lr unchanged without a base batch."""
        return self.lr * self.lr_scale(global_batch)

    def lr_scale(self, global_batch: int) -> float:
        return global_batch / self.base_batch_size if self.base_batch_size else 1.0


def distill_optim() -> OptimConfig:
    """The reference distillation optimiser (``schedule_distillation.py``): clip 5.0, no decay on
    norm layers only, cosine to 0.01 x lr after a 500-step warm-up from 0.001x, lr for batch 16."""
    return OptimConfig(schedule="cosine", min_lr_factor=0.01, grad_clip=5.0, no_decay=("norm",))


#: ``RunSpec.precision`` / ``loop.Runtime.precision`` values: "fp32" (the reference trains in
#: fp32, and so do the named recipes), "bf16" (bf16 autocast on any device; its effect on training
#: is yet to be measured on a GPU: ``bench/train_precision.py``), "auto" (bf16 autocast on CUDA,
#: fp32 on a CPU).
PRECISIONS = ("fp32", "bf16", "auto")
#: ``DistillConfig.teacher_feature_dtype`` / ``DumpTeacherConfig.feature_dtype``: how precomputed
#: teacher features are stored (the reference caches float32).
FEATURE_DTYPES = ("float32", "float16")
#: ``CotrainConfig.instance_selection`` (``prompt_sampling.INSTANCE_SELECTIONS``).
INSTANCE_SELECTIONS = ("first", "random")


@dataclass
class RunSpec:
    """Where and how a training run executes on Ray Train.

    storage_path/name: the run's storage (local folder or s3:// URL); starting the same
        storage_path + name again resumes from its latest checkpoint.
    num_workers/use_gpu/cpus_per_worker: ``ScalingConfig``; max_failures: ``FailureConfig``.
    batch_size: images per worker per micro-step; grad_accum: micro-steps per optimizer step;
        the global batch (``global_batch``) is num_workers x batch_size x grad_accum.
    max_steps: optimizer steps; None: the stage's ``epochs`` over its ``epoch_images`` at the
        global batch (``recipes.resolve_steps``, done before a run starts).
    shuffle_shards/shuffle_buffer: the data order (``training.stream``): shards read concurrently
        per work item, and the samples held in its shuffle buffer (encoded images, so ~0.2 MB each
        for COCO-sized JPEGs).
    precision: ``loop.Runtime.precision``: "fp32" (default; the reference's precision), "bf16"
        (bf16 autocast, on a CPU too, where it tests the GPU's branches; not yet measured against
        fp32 on a GPU), "auto" (bf16 autocast on a GPU, fp32 on a CPU).
    """

    storage_path: str
    name: str
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    batch_size: int = 2
    grad_accum: int = 1
    max_steps: int | None = None
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 20
    max_failures: int = 3
    seed: int = 0
    data_cpus: float = 1.0
    shuffle_shards: int = 8
    shuffle_buffer: int = 256
    s3_endpoint: str | None = None
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"precision={self.precision!r}: use one of {', '.join(PRECISIONS)} (fp32: the reference; bf16: "
                "bf16 autocast, on a CPU too; auto: bf16 autocast on a GPU, fp32 on a CPU)"
            )
        if not self.storage_path:
            raise ConfigError("storage_path is required: a local folder or s3://bucket/prefix for checkpoints")
        if not self.name or "/" in self.name:
            raise ConfigError(f"name={self.name!r}: give a run name without '/' (the folder under storage_path)")
        for attr in (
            "num_workers",
            "batch_size",
            "grad_accum",
            "max_steps",
            "checkpoint_every",
            "log_every",
            "shuffle_shards",
            "shuffle_buffer",
        ):
            if getattr(self, attr) is not None and getattr(self, attr) < 1:
                raise ConfigError(f"{attr}={getattr(self, attr)} must be >= 1")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints={self.keep_checkpoints} must be >= 1 (resume needs one)")
        if self.max_failures < -1:
            raise ConfigError(f"max_failures={self.max_failures}: use -1 (retry forever), 0 or a positive count")
        if not self.cpus_per_worker > 0 or not self.data_cpus > 0:
            raise ConfigError("cpus_per_worker and data_cpus must be > 0 (fractions are fine on small machines)")

    @property
    def global_batch(self) -> int:
        """Images per optimizer step over all workers."""
        return self.num_workers * self.batch_size * self.grad_accum

    @property
    def run_url(self) -> str:
        return self.storage_path.rstrip("/") + "/" + self.name


@dataclass
class ModelSpec:
    """The model to train and the weights it starts from (released layout, DESIGN §3).

    weights: a folder/prefix with the standard file names; sam/clip/sam2clip/clip2sam: explicit
    files. random_init: start from random weights (tests, smoke runs; logged loudly).
    """

    preset: str = "ovsam_rn50x16"
    weights: str | None = None
    sam: str | None = None
    clip: str | None = None
    sam2clip: str | None = None
    clip2sam: str | None = None
    random_init: bool = False

    def __post_init__(self) -> None:
        get_preset(self.preset)  # an unknown name: a ValueError listing the known ones


def _common_post_init(cfg: Any) -> None:
    if not cfg.datasets:
        raise ConfigError("give at least one dataset (DatasetSpec)")
    cfg.datasets = [d if isinstance(d, DatasetSpec) else DatasetSpec(**d) for d in cfg.datasets]
    for name, typ in (("run", RunSpec), ("model", ModelSpec), ("optim", OptimConfig)):
        value = getattr(cfg, name)
        if isinstance(value, dict):
            setattr(cfg, name, typ(**value))
    if cfg.epochs < 1:
        raise ConfigError(f"epochs={cfg.epochs} must be >= 1 (passes over the shards the stream holds)")
    if cfg.epoch_images is not None and cfg.epoch_images < 1:
        raise ConfigError(f"epoch_images={cfg.epoch_images} must be >= 1 (images in one pass over the data)")


@dataclass
class DistillConfig:
    """SAM2CLIP distillation (DESIGN §5): frozen CLIP + trainable adapter, per-pixel MSE to the
    SAM image encoder's 256x64x64 embedding (online teacher, or precomputed features).

    The adapter's absolute position embedding is SAM's ``image_encoder.pos_embed`` (a buffer, as
    the reference's ``embedding_path='sam_vit_h'``): from ``teacher_checkpoint``, or, with
    precomputed features and no SAM file at hand, from ``teacher_pos_embed`` (a file holding
    ``image_encoder.pos_embed`` or ``pos_embed``) or the ``model.sam2clip`` the run starts from.

    teacher_feature_dtype: the dtype of the teacher's features: precomputed ones must be stored in
        it (``dump-teacher --feature-dtype``; another dtype stops the run), an online teacher's
        output is rounded to it. "float32": the reference (its cached features are fp32).
    """

    run: RunSpec
    datasets: list[DatasetSpec]
    model: ModelSpec = field(default_factory=ModelSpec)
    optim: OptimConfig = field(default_factory=distill_optim)
    teacher: str = "vit_h"
    teacher_checkpoint: str | None = None
    teacher_pos_embed: str | None = None
    epochs: int = 24
    epoch_images: int | None = None
    flip_prob: float = 0.0
    teacher_feature_dtype: str = "float32"

    def __post_init__(self) -> None:
        _common_post_init(self)
        if self.teacher not in TEACHERS:
            raise ConfigError(f"teacher={self.teacher!r}: use one of {TEACHERS}")
        if self.teacher_feature_dtype not in FEATURE_DTYPES:
            raise ConfigError(
                f"teacher_feature_dtype={self.teacher_feature_dtype!r}: use one of {FEATURE_DTYPES} "
                "(float32: the reference)"
            )
        precomputed = all(d.teacher_features for d in self.datasets)
        if self.teacher != "random_tiny" and not precomputed and not self.teacher_checkpoint:
            raise ConfigError(
                "distillation needs a teacher: teacher_checkpoint=<sam_vit_*.pth> (online teacher) or "
                "teacher_features on every dataset (from `ovsam-ray train dump-teacher`)"
            )
        if (
            self.teacher != "random_tiny"
            and precomputed
            and not self.teacher_checkpoint
            and not self.teacher_pos_embed
            and not self.model.sam2clip
        ):
            raise ConfigError(
                "distilling from precomputed teacher features leaves the adapter's position embedding "
                "(SAM's image_encoder.pos_embed) unset: pass --teacher-checkpoint sam_vit_h_4b8939.pth (only its "
                "pos_embed is read) or --teacher-pos-embed FILE (a .pth with image_encoder.pos_embed or pos_embed)"
            )

    def to_dict(self) -> dict:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DistillConfig:
        return cls(**_known_fields(cls, data))


@dataclass
class CotrainConfig:
    """CLIP2SAM co-training (DESIGN §5).

    train_vocab: the training vocabulary (built-in or file); default: the union of the datasets'
        vocabularies in order. num_prompts: instances per image (repeated when fewer), ``n // 2 + 1``
        box prompts and the rest point prompts (``prompt_sampling.prompt_kinds``).
        lsj_range: large-scale-jitter ratio range of the long side.
    logit_scale / learn_logit_scale: classifier temperature (log); the released presets keep
        ``RELEASED_LOGIT_SCALE`` (4.6052) fixed, the tiny recipe learns it (exported as
        ``meta["logit_scale"]``), with its own learning rate ``logit_scale_lr`` (default: the model's).
    recognizer_lr: the CLIP2SAM recognizer's (FPN + RoI conv) own learning rate (default: the
        model's).
    train_adapter: also train the SAM2CLIP adapter (the tiny recipe, which has no SAM teacher).
    instance_selection: an image with more than ``num_prompts`` instances trains the first
        ``num_prompts`` in annotation order ("first", the reference) or a random subset ("random",
        a deviation).
    crop_tries: LSJ draws per image until the crop keeps an instance; an image whose crops keep
        none is dropped and the stream's next image is drawn. 1: the reference (its dataset draws
        another image at once); the tiny recipe re-jitters up to 3 times.
    roi_from_prediction: the fraction of prompts whose recognizer RoI is the box of the mask the
        decoder just predicted (detached; as at inference, DESIGN §2.5) instead of the ground-truth
        box (the reference, 0), wherever that box overlaps the ground truth (IoU > 0.1).
    """

    run: RunSpec
    datasets: list[DatasetSpec]
    model: ModelSpec = field(default_factory=ModelSpec)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train_vocab: str | None = None
    epochs: int = 12
    epoch_images: int | None = None
    num_prompts: int = 40
    lsj_range: tuple[float, float] = (0.9, 2.0)
    flip_prob: float = 0.5
    min_mask_area: int = 32
    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    cls_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    background_weight: float = 0.1
    logit_scale: float = RELEASED_LOGIT_SCALE
    learn_logit_scale: bool = False
    logit_scale_lr: float | None = None
    recognizer_lr: float | None = None
    train_adapter: bool = False
    roi_from_prediction: float = 0.0
    text_cache: str | None = None
    instance_selection: str = "first"
    crop_tries: int = 1

    def __post_init__(self) -> None:
        _common_post_init(self)
        if self.instance_selection not in INSTANCE_SELECTIONS:
            raise ConfigError(
                f"instance_selection={self.instance_selection!r}: use 'first' (the reference: the first "
                "num_prompts instances in annotation order) or 'random' (a random subset)"
            )
        if self.crop_tries < 1:
            raise ConfigError(f"crop_tries={self.crop_tries} must be >= 1 (1: the reference)")
        self.lsj_range = cast(tuple[float, float], tuple(float(r) for r in self.lsj_range))
        if len(self.lsj_range) != 2 or not 0 < self.lsj_range[0] <= self.lsj_range[1]:
            raise ConfigError(f"lsj_range={self.lsj_range}: give (low, high) with 0 < low <= high, e.g. (0.9, 2.0)")
        if self.num_prompts < 1:
            raise ConfigError(f"num_prompts={self.num_prompts} must be >= 1 (the paper uses 40)")
        if not 0 <= self.roi_from_prediction <= 1:
            raise ConfigError(
                f"roi_from_prediction={self.roi_from_prediction} must be in [0, 1] (0: ground-truth RoIs)"
            )
        if self.num_points < 1 or self.oversample_ratio < 1 or not 0 <= self.importance_sample_ratio <= 1:
            raise ConfigError("need num_points >= 1, oversample_ratio >= 1 and importance_sample_ratio in [0, 1]")
        if not any(d.kind == "segmentation" for d in self.datasets):
            raise ConfigError(
                "co-training needs at least one segmentation dataset (image-level data only trains classification)"
            )

    def to_dict(self) -> dict:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CotrainConfig:
        return cls(**_known_fields(cls, data))


def _to_dict(cfg: Any) -> dict:
    def convert(value: Any) -> Any:
        if isinstance(value, tuple):
            return [convert(v) for v in value]
        if isinstance(value, list):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return convert(dataclasses.asdict(cfg))


def _known_fields(cls: type, data: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(names)}")
    return dict(data)
