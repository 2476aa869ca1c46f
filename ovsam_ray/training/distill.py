"""SAM2CLIP distillation on Ray Train (DESIGN §5), and the ``dump-teacher`` mode.

Student: frozen CLIP + trainable adapter; teacher: SAM's image encoder, frozen, run online under
no_grad in the run's precision (fp32, as the reference, unless ``--precision`` says otherwise) or
replaced by precomputed features; loss: per-pixel MSE on the
image embedding; AdamW 1e-4, wd 0.05, cosine schedule. SAM's ``image_encoder.pos_embed`` is
copied into ``adapter.pos_embed`` when the shapes match, as the reference does.

``dump_teacher(...)`` runs the teacher once over image shards (a Ray Data actor pool, one GPU
each when asked) and writes one teacher-feature shard ``<out>/<shard>.tar`` of ``<key>.npy``
(``--feature-dtype``, float32 as the reference's cache, (C, S/16, S/16)) per input
shard, atomically; existing outputs are skipped on rerun.
"""

from __future__ import annotations

import io as _io
import logging
import os
import shutil
import tarfile
import tempfile
import types
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ovsam_ray import storage
from ovsam_ray.data.shards import list_shards, shard_name
from ovsam_ray.errors import ConfigError
from ovsam_ray.model.ovsam import OVSAM
from ovsam_ray.model.presets import get_preset
from ovsam_ray.training.batching import collate_distill, unpack_sample
from ovsam_ray.training.config import FEATURE_DTYPES, TEACHERS, DistillConfig
from ovsam_ray.training.loop import DistillTask, Runtime
from ovsam_ray.training.networks import DistillNet, build_sam_teacher, build_training_model, copy_teacher_pos_embed
from ovsam_ray.training.stream import DistillSamples, build_ray_dataset, dataset_items
from ovsam_ray.training.trainer import StageSetup, fit, resume_item, worker_loop
from ovsam_ray.weights.files import read_weights

log = logging.getLogger(__name__)


def _needs_online_teacher(cfg: DistillConfig) -> bool:
    return not all(d.teacher_features for d in cfg.datasets)


POS_EMBED_KEYS = ("image_encoder.pos_embed", "pos_embed", "adapter.pos_embed")


def _copy_pos_embed_from_file(model: OVSAM, checkpoint: str, s3_endpoint: str | None) -> None:
    """SAM's position embedding from a SAM checkpoint or any state dict holding one of
    ``POS_EMBED_KEYS``; an error naming the file when it has none or of another shape."""
    state = read_weights(checkpoint, s3_endpoint=s3_endpoint, what="sam").state_dict
    key = next((k for k in POS_EMBED_KEYS if k in state), None)
    holder = types.SimpleNamespace(pos_embed=state[key] if key else None)
    if not copy_teacher_pos_embed(model, holder):
        found = None if key is None else tuple(state[key].shape)
        raise ConfigError(
            f"{checkpoint}: no position embedding of shape {tuple(model.adapter.pos_embed.shape)} "
            f"under {POS_EMBED_KEYS} (found {found}); give the SAM checkpoint of the teacher"
        )


def distill_setup(cfg: DistillConfig, runtime: Runtime) -> StageSetup:
    """Student network and (unless every dataset has precomputed features) the online teacher."""
    model, _, files = build_training_model(
        cfg.model, stage="distill", seed=cfg.run.seed, s3_endpoint=cfg.run.s3_endpoint
    )
    teacher = None
    if _needs_online_teacher(cfg):
        teacher = build_sam_teacher(
            cfg.teacher,
            cfg.teacher_checkpoint,
            image_size=model.image_size,
            out_chans=model.prompt_encoder.embed_dim,
            embed_dim=model.adapter.pos_embed.shape[-1],
            s3_endpoint=cfg.run.s3_endpoint,
            seed=cfg.run.seed,
        ).to(runtime.device)
        if not copy_teacher_pos_embed(model, teacher) and cfg.teacher != "random_tiny":
            raise ConfigError(
                f"the {cfg.teacher} teacher's pos_embed does not fit the {cfg.model.preset} adapter "
                f"{tuple(model.adapter.pos_embed.shape)}: distil with the teacher of the preset"
            )
    elif source := cfg.teacher_pos_embed or cfg.teacher_checkpoint:
        _copy_pos_embed_from_file(model, source, cfg.run.s3_endpoint)
    elif "sam2clip" not in files and cfg.teacher != "random_tiny":
        raise ConfigError(
            "precomputed teacher features without --teacher-checkpoint, --teacher-pos-embed or a "
            "sam2clip file would train with a zero position embedding; pass one of them"
        )
    net = DistillNet(model)

    def make_task(wrapped: torch.nn.Module) -> DistillTask:
        return DistillTask(
            net=wrapped, teacher=teacher, device=runtime.device, feature_dtype=getattr(torch, cfg.teacher_feature_dtype)
        )

    return StageSetup(net=net, make_task=make_task, optim=cfg.optim)


@dataclass
class DistillDataset:
    """Dataset factory for ``TorchTrainer``: the stream starts at the latest checkpoint's data position."""

    config: dict[str, Any]

    def __call__(self):
        cfg = DistillConfig.from_dict(self.config)
        start = resume_item(cfg.run)
        items = dataset_items(
            cfg.datasets,
            epochs=cfg.epochs,
            seed=cfg.run.seed,
            s3_endpoint=cfg.run.s3_endpoint,
            shards_per_item=cfg.run.shuffle_shards,
        )
        builder = DistillSamples(
            image_size=get_preset(cfg.model.preset).image_size,
            flip_prob=cfg.flip_prob,
            teacher_dtype=cfg.teacher_feature_dtype,
            seed=cfg.run.seed,
            s3_endpoint=cfg.run.s3_endpoint,
            shuffle_buffer=cfg.run.shuffle_buffer,
        )
        return build_ray_dataset(items[start:], builder, num_cpus=cfg.run.data_cpus)


def distill_train_fn(loop_config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of distillation."""
    worker_loop("distill", loop_config["config"], distill_setup)


def run_distill(cfg: DistillConfig, *, worker_env: dict[str, str] | None = None):
    """Run or resume SAM2CLIP distillation; returns the ``ray.train.Result``."""
    from ovsam_ray.training.recipes import resolve_steps

    cfg = resolve_steps(cfg)
    return fit("distill", cfg, distill_train_fn, DistillDataset(cfg.to_dict()), worker_env=worker_env)


# --- dump-teacher --------------------------------------------------------------------------------------


@dataclass
class DumpTeacherConfig:
    """Precompute teacher features: shards -> ``output``/<shard>.tar of ``<key>.npy`` in
    ``feature_dtype`` (float32: the reference's cache), the teacher run in ``precision``."""

    shards: str | list[str] = field(metadata={"parse": str, "help": "input shards (a spec as for --dataset)"})
    output: str = field(metadata={"help": "folder or s3:// prefix for <shard>.tar of <key>.npy"})
    teacher: str = field(default="vit_h", metadata={"help": "SAM image encoder: " + ", ".join(TEACHERS)})
    teacher_checkpoint: str | None = field(default=None, metadata={"help": "its sam_<teacher>_*.pth"})
    preset: str = field(
        default="ovsam_rn50x16", metadata={"help": "the student's preset (it gives the image size and feature width)"}
    )
    use_gpu: bool = field(default=False, metadata={"help": "run the teacher on a GPU"})
    concurrency: int = field(default=1, metadata={"help": "teacher actors"})
    batch_size: int = field(default=4, metadata={"help": "images per teacher forward"})
    precision: str = field(
        default="fp32",
        metadata={"help": "the teacher's precision: fp32 (the reference's) or bf16 (autocast; not yet measured)"},
    )
    feature_dtype: str = field(
        default="float32",
        metadata={
            "help": "stored feature dtype: float32 (the reference's) or float16 (half the size); "
            "distil with the same --teacher-feature-dtype"
        },
    )
    s3_endpoint: str | None = field(
        default=None, metadata={"help": "S3-compatible endpoint URL (else AWS_ENDPOINT_URL)"}
    )

    def __post_init__(self) -> None:
        get_preset(self.preset)  # an unknown name: a ValueError listing the known ones
        if self.teacher != "random_tiny" and not self.teacher_checkpoint:
            raise ConfigError(f"dump-teacher with {self.teacher} needs teacher_checkpoint=<sam_{self.teacher}_*.pth>")
        if self.concurrency < 1 or self.batch_size < 1:
            raise ConfigError("concurrency and batch_size must be >= 1")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision={self.precision!r}: use fp32 (the reference's) or bf16")
        if self.feature_dtype not in FEATURE_DTYPES:
            raise ConfigError(f"feature_dtype={self.feature_dtype!r}: use one of {FEATURE_DTYPES}")


class TeacherShardWriter:
    """Ray Data actor: the teacher loaded once, then one whole shard per call."""

    def __init__(self, cfg: DumpTeacherConfig) -> None:
        self.cfg = cfg
        self.device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
        preset = get_preset(cfg.preset)
        self.size = preset.image_size
        self.teacher = build_sam_teacher(
            cfg.teacher,
            cfg.teacher_checkpoint,
            image_size=self.size,
            out_chans=preset.prompt_dim,
            s3_endpoint=cfg.s3_endpoint,
        ).to(self.device)
        self.builder = DistillSamples(image_size=self.size, s3_endpoint=cfg.s3_endpoint)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        target = storage.join(self.cfg.output, shard_name(row["shard"]) + ".tar")
        if storage.exists(target, s3_endpoint=self.cfg.s3_endpoint):
            return {"shard": row["shard"], "written": 0, "skipped": True}
        item = {"item": 0, "dataset": 0, "shard": row["shard"]}
        rows = list(self.builder(item))
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "features.tar")
            with tarfile.open(local, "w") as tf:
                for start in range(0, len(rows), self.cfg.batch_size):
                    chunk = rows[start : start + self.cfg.batch_size]
                    feats = self._features([unpack_sample(r["sample"]) for r in chunk])
                    for r, f in zip(chunk, feats):
                        _add_npy(tf, f"{r['key']}.npy", f)
            _upload(local, target, self.cfg.s3_endpoint)
        return {"shard": row["shard"], "written": len(rows), "skipped": False}

    @torch.no_grad()
    def _features(self, samples: list[dict[str, np.ndarray]]) -> np.ndarray:
        images = collate_distill(samples, self.device).images
        bf16 = self.cfg.precision == "bf16"
        with torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
            out = self.teacher(images)
        return out.float().cpu().numpy().astype(self.cfg.feature_dtype)


def _add_npy(tf: tarfile.TarFile, name: str, array: np.ndarray) -> None:
    buf = _io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = buf.tell(), 0, 0o644
    buf.seek(0)
    tf.addfile(info, buf)


def _upload(local: str, target: str, s3_endpoint: str | None) -> None:
    fs, path = storage.get_filesystem(target, s3_endpoint=s3_endpoint)
    if storage.is_remote(target):
        fs.put_file(local, path)  # an object PUT is atomic
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    shutil.copyfile(local, tmp)
    os.replace(tmp, path)  # readers never see a partial shard


def dump_teacher(cfg: DumpTeacherConfig) -> dict[str, int]:
    """Write teacher-feature shards for every input shard; returns counts."""
    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init()
    shards = list_shards(cfg.shards, s3_endpoint=cfg.s3_endpoint)
    ds: ray.data.Dataset = ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=len(shards))
    ds = ds.map(
        TeacherShardWriter,  # type: ignore[arg-type]  # a callable class, its arguments from fn_constructor_args
        fn_constructor_args=(cfg,),
        concurrency=cfg.concurrency,
        num_gpus=1 if cfg.use_gpu else 0,
    )
    results = ds.take_all()
    written = sum(r["written"] for r in results)
    skipped = sum(1 for r in results if r["skipped"])
    log.info("dump-teacher: %d shards (%d skipped as already written), %d images", len(results), skipped, written)
    return {"shards": len(results), "skipped": skipped, "images": written}
