"""The training engine shared by both stages, with or without Ray: the trainable networks, their
loss steps, AdamW and the schedules, and one optimisation loop.

The loop knows nothing about Ray: a ``Runtime`` gives it rank/world size and collectives, and a
``report`` callback receives metrics (and is told when to checkpoint). ``training.runner`` plugs
in Ray Train; the tiny recipe runs the same loop in-process.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ovsam_ray.model.ovsam import OVSAM, ImageFeatures, PromptBatch

from .batching import collate_cotrain, collate_distill, unpack_sample
from .config import PRECISIONS, CotrainConfig, OptimConfig, RunSpec
from .losses import class_logits, classification_loss, distillation_loss, sampled_mask_losses

log = logging.getLogger(__name__)

Samples = list[dict[str, np.ndarray]]


# --- networks ----------------------------------------------------------------------------------------


class CotrainNet(nn.Module):
    """CLIP2SAM's training forward: frozen CLIP (and adapter, unless ``train_adapter``), then the
    decoder for every prompt and the recognizer on the ground-truth RoI of each prompt (as the
    reference trains; at inference the RoI comes from the predicted mask).

    text_embeddings: (C, S, D) the training vocabulary; log_scale: the classifier temperature
    (log), a parameter that trains only when ``learn_logit_scale``.
    """

    def __init__(self, model: OVSAM, *, text_embeddings: torch.Tensor, logit_scale: float,
                 learn_logit_scale: bool = False, train_adapter: bool = False,
                 logit_scale_lr: float | None = None, recognizer_lr: float | None = None) -> None:
        super().__init__()
        self.model = model
        model.lock_for_cotraining()
        if train_adapter:
            model.adapter.requires_grad_(True)
        self.train_adapter = train_adapter
        self.register_buffer("text_embeddings", text_embeddings.float(), persistent=False)
        self.log_scale = nn.Parameter(torch.tensor(float(logit_scale)), requires_grad=learn_logit_scale)
        self.param_lrs = {"log_scale": logit_scale_lr} if logit_scale_lr else {}
        if recognizer_lr:
            self.param_lrs["model.recognizer."] = recognizer_lr
        prefixes = ["model.decoder.", "model.recognizer.", "log_scale"]
        self.checkpoint_prefixes = tuple(prefixes + (["model.adapter."] if train_adapter else []))

    def forward(self, images: torch.Tensor, prompts: PromptBatch, roi_boxes: torch.Tensor,
                predicted_roi: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, S, S) normalised -> low-res mask logits (N, 1, S/4, S/4), class logits (N, C + 1).
        The prompts decode through the model's own ``OVSAM.decode`` with the ground-truth RoIs;
        ``predicted_roi`` (N,) bool: prompts whose RoI is their predicted mask's box (see
        ``CotrainConfig.roi_from_prediction``) where it overlaps ``roi_boxes``."""
        m = self.model
        with torch.no_grad():
            clip_feats = m.backbone(images)
        with contextlib.nullcontext() if self.train_adapter else torch.no_grad():
            image_embeddings = m.adapter(clip_feats)
        fpn_feats = m.recognizer.fpn(clip_feats)
        features = ImageFeatures(clip_feats=clip_feats, image_embeddings=image_embeddings, fpn_feats=fpn_feats)
        out = m.decode(features, prompts, roi_boxes=roi_boxes, mask_roi=predicted_roi, clip_branch=False)
        # The FPN levels no RoI picked join the graph with weight 0, so DDP sees a gradient for every
        # parameter each step.
        region = out.region_embeddings + 0 * sum(f.mean() for f in fpn_feats)
        return out.low_res_logits, class_logits(region, self.text_embeddings, self.log_scale)


class DistillNet(nn.Module):
    """SAM2CLIP's student: frozen CLIP, trainable adapter -> (B, C, S/16, S/16) image embedding."""

    def __init__(self, model: OVSAM) -> None:
        super().__init__()
        self.model = model
        model.lock_for_distillation()
        self.checkpoint_prefixes = ("model.adapter.",)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            clip_feats = self.model.backbone(images)
        return self.model.adapter(clip_feats)


def unwrap(net: nn.Module) -> nn.Module:
    return net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net


def trainable_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """The checkpointed part of a Cotrain/DistillNet (its trainable modules, buffers included)."""
    inner = unwrap(net)
    return {k: v.detach().cpu() for k, v in inner.state_dict().items() if k.startswith(inner.checkpoint_prefixes)}


def load_trainable_state_dict(net: nn.Module, state: dict[str, torch.Tensor]) -> None:
    inner = unwrap(net)
    expected = {k for k in inner.state_dict() if k.startswith(inner.checkpoint_prefixes)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    inner.load_state_dict(state, strict=False)


# --- optimiser and schedules ---------------------------------------------------------------------------


_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)


def no_decay_names(net: nn.Module, rules: tuple[str, ...]) -> set[str]:
    """Names of the trainable parameters exempt from weight decay under ``rules``
    (``config.NO_DECAY_RULES``: "norm", "bias", "1d", or a substring of the name); a learned
    classifier temperature (``log_scale``) is never decayed."""
    out = {n for n, p in unwrap(net).named_parameters() if p.requires_grad and n.endswith("log_scale")}
    for module_name, module in unwrap(net).named_modules():
        for name, p in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if not p.requires_grad:
                continue
            if (("norm" in rules and isinstance(module, _NORMS)) or ("bias" in rules and name == "bias")
                    or ("1d" in rules and p.ndim <= 1)
                    or any(r in full for r in rules if r not in ("norm", "bias", "1d"))):
                out.add(full)
    return out


def build_optimizer(net: nn.Module, cfg: OptimConfig, global_batch: int | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; those ``cfg.no_decay`` names get no weight decay;
    parameters named in the network's ``param_lrs`` (a name, or a prefix ending in ".") get their
    own learning rate. Every lr is scaled by ``cfg.lr_scale(global_batch)`` (linear scaling from
    the reference's batch 16) when ``global_batch`` is given."""
    special = getattr(unwrap(net), "param_lrs", {})
    scale = cfg.lr_scale(global_batch) if global_batch else 1.0
    exempt = no_decay_names(net, cfg.no_decay)
    buckets: dict[tuple[str | None, bool], list[nn.Parameter]] = {}
    for name, p in unwrap(net).named_parameters():
        if not p.requires_grad:
            continue
        key = next((k for k in special if name == k or (k.endswith(".") and name.startswith(k))), None)
        buckets.setdefault((key, name in exempt), []).append(p)
    groups = [{"params": ps, "weight_decay": 0.0 if no_decay else cfg.weight_decay,
               **({"lr": special[key] * scale} if key else {})} for (key, no_decay), ps in buckets.items()]
    return adamw(groups, lr=cfg.lr * scale, betas=cfg.betas, eps=cfg.eps)


def adamw(params: list, **kwargs: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with the fused kernel where every parameter allows it (floating
    point, on CPU or CUDA): one kernel for all tensors instead of a dozen ops per tensor. On the
    tiny recipe's CPU steps the update drops from ~26 to ~4 ms (bench/RESULTS.md, "A faster optimiser
    step and a better stage-0 learning rate")."""
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = bool(tensors) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in tensors)
    return torch.optim.AdamW(params, fused=fused, **kwargs)


def lr_factor(step: int, progress: float, cfg: OptimConfig) -> float:
    """Multiplier of the base lr: linear warm-up from ``warmup_factor`` over ``warmup_steps``,
    times cosine to ``min_lr_factor`` / x``lr_gamma`` at each milestone passed / 1 by
    ``progress`` in [0, 1] (step / max_steps)."""
    warm = 1.0
    if step < cfg.warmup_steps:
        warm = cfg.warmup_factor + (1.0 - cfg.warmup_factor) * step / cfg.warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    if cfg.schedule == "cosine":
        shape = cfg.min_lr_factor + (1 - cfg.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    elif cfg.schedule == "step":
        shape = cfg.lr_gamma ** sum(progress >= m for m in cfg.lr_milestones)
    else:
        shape = 1.0
    return warm * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int,
                    progress: Callable[[int], float] | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over ``lr_factor``; ``progress(step)`` defaults to step / max_steps."""
    def factor(step: int) -> float:
        return lr_factor(step, progress(step) if progress else step / max_steps, cfg)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --- loss steps ------------------------------------------------------------------------------------


def _step_generator(seed: int, step: int, rank: int, micro: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, step, rank, micro]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


class Task(Protocol):
    def losses(self, samples: Samples, step: int, micro: int) -> tuple[dict[str, torch.Tensor], int]:
        """Weighted loss terms of one micro-batch and its number of images."""


@dataclass
class CotrainTask:
    net: nn.Module
    cfg: CotrainConfig
    device: torch.device
    rank: int = 0

    def losses(self, samples: Samples, step: int, micro: int) -> tuple[dict[str, torch.Tensor], int]:
        cfg = self.cfg
        batch = collate_cotrain(samples, self.device)
        predicted_roi = None
        if cfg.roi_from_prediction > 0:
            draw = torch.rand(len(batch.labels), generator=_step_generator(cfg.run.seed + 1, step, self.rank, micro))
            predicted_roi = (draw < cfg.roi_from_prediction).to(self.device)
        low_res, logits = self.net(batch.images, batch.prompts, batch.roi_boxes, predicted_roi)
        loss_cls = classification_loss(logits, batch.labels, background_weight=cfg.background_weight)
        sel = torch.nonzero(batch.has_mask).flatten()
        bce, dice = sampled_mask_losses(
            low_res[sel], batch.target_masks, batch.target_index[sel], num_points=cfg.num_points,
            oversample_ratio=cfg.oversample_ratio, importance_sample_ratio=cfg.importance_sample_ratio,
            generator=_step_generator(cfg.run.seed, step, self.rank, micro),
        )
        terms = {"loss_cls": cfg.cls_weight * loss_cls, "loss_mask": cfg.mask_weight * bce,
                 "loss_dice": cfg.dice_weight * dice}
        return terms, batch.num_images


@dataclass
class DistillTask:
    net: nn.Module
    teacher: nn.Module | None
    device: torch.device

    def losses(self, samples: Samples, step: int, micro: int) -> tuple[dict[str, torch.Tensor], int]:
        batch = collate_distill(samples, self.device)
        target = batch.teacher
        if target is None:
            if self.teacher is None:
                raise ValueError("no teacher: these samples carry no precomputed features and no SAM teacher is loaded")
            with torch.no_grad():
                target = self.teacher(batch.images).float()
        student = self.net(batch.images)
        return {"loss_distill": distillation_loss(student, target)}, batch.num_images


# --- the loop -------------------------------------------------------------------------------------------


class BudgetClock:
    """Seconds spent against a budget: on the wall clock, or ``"cpu"``: this process's CPU time
    divided by the cores it may use (so other processes competing for the machine stretch the
    wall time but do not shrink the training a budget buys)."""

    def __init__(self, budget_s: float, kind: str = "wall", cores: int | None = None) -> None:
        if kind not in ("wall", "cpu"):
            raise ValueError(f"clock kind {kind!r}: use 'wall' or 'cpu'")
        self.budget_s, self.kind = float(budget_s), kind
        self.cores = cores or torch.get_num_threads()
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def elapsed(self) -> float:
        if self.kind == "cpu":
            return (time.process_time() - self._cpu) / self.cores
        return time.perf_counter() - self._wall

    def fraction(self) -> float:
        return self.elapsed() / self.budget_s if self.budget_s > 0 else 1.0

    def expired(self) -> bool:
        return self.elapsed() >= self.budget_s


@dataclass
class TrainState:
    """What the loop carries between steps and checkpoints. resume_item: the first work item not
    yet fully consumed by every worker (the data position); images_seen: over all workers."""

    step: int = 0
    resume_item: int = 0
    images_seen: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"step": self.step, "resume_item": self.resume_item, "images_seen": self.images_seen}


@dataclass
class Runtime:
    """Rank, world size and device of this worker; collectives are no-ops for one worker.

    precision: "auto" (bf16 autocast on CUDA, fp32 elsewhere), "bf16" (bf16 autocast on any
    device: the CPU run of the GPU path) or "fp32"."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}: use one of {', '.join(PRECISIONS)}")

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        if self.world_size == 1 or not dist.is_initialized():
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
        return t.tolist()

    def autocast(self) -> contextlib.AbstractContextManager:
        bf16 = self.precision == "bf16" or (self.precision == "auto" and self.device.type == "cuda")
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def row_batches(rows: Iterator[dict[str, Any]], batch_size: int, *, min_item: int = 0
                ) -> Iterator[tuple[list[dict[str, np.ndarray]], int]]:
    """(decoded samples, largest item among them) per ``batch_size`` rows; rows of items before
    ``min_item`` (already consumed before a resume) are dropped."""
    batch, top = [], -1
    for row in rows:
        item = int(row["item"])
        if item < min_item:
            continue
        batch.append(unpack_sample(row["sample"]))
        top = max(top, item)
        if len(batch) == batch_size:
            yield batch, top
            batch, top = [], -1


Report = Callable[[dict[str, float], bool], None]


def train_loop(*, task: Task, net: nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, rows: Iterator[dict[str, Any]], run: RunSpec,
               state: TrainState, runtime: Runtime, report: Report, grad_clip: float | None,
               should_stop: Callable[[], bool] | None = None) -> TrainState:
    """Optimise until ``run.max_steps``, the end of the data or ``should_stop()`` (all workers
    agree on each). ``report(metrics, checkpoint)`` is called on every worker at the same steps."""
    batches = row_batches(rows, run.batch_size, min_item=state.resume_item)
    params = [p for p in net.parameters() if p.requires_grad]
    sums: dict[str, float] = {}
    steps_since, images_since, last_item, t0 = 0, 0, state.resume_item - 1, time.perf_counter()
    last_checkpoint = state.step
    while state.step < run.max_steps:
        micro = [next(batches, None) for _ in range(run.grad_accum)]
        go = all(m is not None for m in micro) and not (should_stop and should_stop())
        if runtime.all_reduce([float(go)], "min")[0] < 1:
            break
        optimizer.zero_grad(set_to_none=True)
        for i, (samples, top) in enumerate(micro):
            last = i == len(micro) - 1
            sync = contextlib.nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync()
            with sync:
                with runtime.autocast():
                    terms, images = task.losses(samples, state.step, i)
                (sum(terms.values()) / len(micro)).backward()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / len(micro)
            images_since += images
            last_item = max(last_item, top)
        if grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(norm)
        optimizer.step()
        scheduler.step()
        state.step += 1
        steps_since += 1
        checkpoint = state.step % run.checkpoint_every == 0 or state.step == run.max_steps
        if checkpoint or state.step % run.log_every == 0:
            metrics = _metrics(sums, steps_since, images_since, time.perf_counter() - t0, optimizer, runtime)
            state.images_seen += int(metrics["images"])
            state.resume_item = int(runtime.all_reduce([float(last_item)], "min")[0])
            metrics.update(step=state.step, resume_item=state.resume_item, images_seen=state.images_seen)
            report(metrics, checkpoint)
            last_checkpoint = state.step if checkpoint else last_checkpoint
            sums, steps_since, images_since, t0 = {}, 0, 0, time.perf_counter()
    if state.step > last_checkpoint:
        metrics = _metrics(sums, max(steps_since, 1), images_since, time.perf_counter() - t0, optimizer, runtime)
        state.images_seen += int(metrics["images"])
        state.resume_item = int(runtime.all_reduce([float(last_item)], "min")[0])
        metrics.update(step=state.step, resume_item=state.resume_item, images_seen=state.images_seen)
        report(metrics, True)
    return state


def _metrics(sums: dict[str, float], steps: int, images: int, seconds: float, optimizer: torch.optim.Optimizer,
             runtime: Runtime) -> dict[str, float]:
    keys = sorted(sums)
    reduced = runtime.all_reduce([sums[k] for k in keys] + [float(images)], "sum")
    out = {k: v / steps / runtime.world_size for k, v in zip(keys, reduced[:-1])}
    loss_keys = [k for k in keys if k.startswith("loss_")]
    out["loss"] = sum(out[k] for k in loss_keys)
    out["images"] = reduced[-1]
    out["images_per_s"] = reduced[-1] / max(seconds, 1e-9)
    out["lr"] = float(optimizer.param_groups[0]["lr"])
    return out
