"""CLIP2SAM co-training on Ray Train (DESIGN §5).

Trainable: FPN, RoI conv, label token/MLP and the mask decoder (plus the adapter when
``train_adapter``, which only the tiny recipe uses because it has no SAM teacher); frozen: CLIP,
adapter, prompt encoder. Per image up to 40 instances, half box / half point prompts; losses CE
(x2, background weight 0.1) + point-sampled BCE (x5) and dice (x5); AdamW 1e-4, wd 0.05, x0.1 at
8/12 and 11/12 of ``max_steps``. Image-level datasets (ImageNet-22k style) train the
classification loss only, through one whole-image box.

Run with ``run_cotrain(cfg)``; the same run started again resumes from its latest checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ovsam_ray.model.presets import get_preset
from ovsam_ray.text_cache import embed_vocabulary
from ovsam_ray.training.config import CotrainConfig
from ovsam_ray.training.label_space import LabelSpace, build_label_space
from ovsam_ray.training.loop import CotrainTask, Runtime
from ovsam_ray.training.networks import CotrainNet, build_training_model
from ovsam_ray.training.stream import CotrainSamples, build_ray_dataset, dataset_items
from ovsam_ray.training.trainer import StageSetup, fit, resume_item, worker_loop
from ovsam_ray.weights.files import file_sha256, local_path

log = logging.getLogger(__name__)


def text_embeddings_for(
    space: LabelSpace,
    clip_model: torch.nn.Module,
    cfg: CotrainConfig,
    files: dict[str, str],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(C, S, D) class text embeddings of the training vocabulary from the CLIP text tower
    (cached by CLIP weights + vocabulary when the CLIP came from a file)."""
    sha = file_sha256(local_path(files["clip"], s3_endpoint=cfg.run.s3_endpoint)) if "clip" in files else None
    return embed_vocabulary(
        space.vocab, clip_model, cfg.model.preset, clip_weights_sha256=sha, cache_root=cfg.text_cache, device=device
    )


def cotrain_setup(cfg: CotrainConfig, runtime: Runtime) -> StageSetup:
    """The co-training network (model from ``cfg.model``, text embeddings of the training vocabulary)."""
    model, clip_model, files = build_training_model(
        cfg.model, stage="cotrain", seed=cfg.run.seed, s3_endpoint=cfg.run.s3_endpoint
    )
    space = build_label_space(cfg.datasets, cfg.train_vocab)
    text = text_embeddings_for(space, clip_model, cfg, files, runtime.device)
    net = CotrainNet(
        model,
        text_embeddings=text,
        logit_scale=cfg.logit_scale,
        learn_logit_scale=cfg.learn_logit_scale,
        train_adapter=cfg.train_adapter,
        logit_scale_lr=cfg.logit_scale_lr,
        recognizer_lr=cfg.recognizer_lr,
    )
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    log.info(
        "co-training %s on %d classes (%d seen); %d trainable parameters",
        cfg.model.preset,
        space.vocab.num_classes,
        len(space.seen_classes),
        trainable,
    )

    def make_task(wrapped: torch.nn.Module) -> CotrainTask:
        return CotrainTask(net=wrapped, cfg=cfg, device=runtime.device, rank=runtime.rank)

    return StageSetup(net=net, make_task=make_task, optim=cfg.optim)


def sample_builder(cfg: CotrainConfig, space: LabelSpace | None = None) -> CotrainSamples:
    """The shard -> rows callable of a co-training config."""
    space = space or build_label_space(cfg.datasets, cfg.train_vocab)
    return CotrainSamples(
        image_size=get_preset(cfg.model.preset).image_size,
        labels=space.datasets,
        kinds=[d.kind for d in cfg.datasets],
        num_prompts=cfg.num_prompts,
        lsj_range=cfg.lsj_range,
        flip_prob=cfg.flip_prob,
        min_mask_area=cfg.min_mask_area,
        crop_tries=cfg.crop_tries,
        instance_selection=cfg.instance_selection,
        seed=cfg.run.seed,
        s3_endpoint=cfg.run.s3_endpoint,
        shuffle_buffer=cfg.run.shuffle_buffer,
    )


@dataclass
class CotrainDataset:
    """Dataset factory for ``TorchTrainer(datasets={"train": ...})``, called at every worker-group
    start: the stream starts at the data position of the run's latest checkpoint."""

    config: dict[str, Any]

    def __call__(self):
        cfg = CotrainConfig.from_dict(self.config)
        start = resume_item(cfg.run)
        items = dataset_items(
            cfg.datasets,
            epochs=cfg.epochs,
            seed=cfg.run.seed,
            s3_endpoint=cfg.run.s3_endpoint,
            shards_per_item=cfg.run.shuffle_shards,
        )
        log.info("co-training stream: items %d..%d", start, len(items))
        return build_ray_dataset(items[start:], sample_builder(cfg), num_cpus=cfg.run.data_cpus)


def cotrain_train_fn(loop_config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of co-training."""
    worker_loop("cotrain", loop_config["config"], cotrain_setup)


def run_cotrain(cfg: CotrainConfig, *, worker_env: dict[str, str] | None = None):
    """Run or resume CLIP2SAM co-training; returns the ``ray.train.Result``."""
    from ovsam_ray.training.recipes import resolve_steps

    cfg = resolve_steps(cfg)
    return fit("cotrain", cfg, cotrain_train_fn, CotrainDataset(cfg.to_dict()), worker_env=worker_env)
