"""The optimisation loop shared by both stages, with or without Ray, and each stage's loss step
(its ``Task``). The networks live in ``training.networks``, AdamW and the schedules in
``training.optim``.

The loop knows nothing about Ray: a ``Runtime`` gives it rank/world size and collectives, and a
``report`` callback receives metrics (and is told when to checkpoint). ``training.trainer`` plugs
in Ray Train; the tiny recipe runs the same loop in-process.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ovsam_ray.errors import ConfigError
from ovsam_ray.training.batching import collate_cotrain, collate_distill, unpack_sample
from ovsam_ray.training.config import PRECISIONS, CotrainConfig, RunSpec
from ovsam_ray.training.losses import classification_loss, distillation_loss, sampled_mask_losses

log = logging.getLogger(__name__)

Samples = list[dict[str, np.ndarray]]


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
            low_res[sel],
            batch.target_masks,
            batch.target_index[sel],
            num_points=cfg.num_points,
            oversample_ratio=cfg.oversample_ratio,
            importance_sample_ratio=cfg.importance_sample_ratio,
            generator=_step_generator(cfg.run.seed, step, self.rank, micro),
        )
        terms = {
            "loss_cls": cfg.cls_weight * loss_cls,
            "loss_mask": cfg.mask_weight * bce,
            "loss_dice": cfg.dice_weight * dice,
        }
        return terms, batch.num_images


@dataclass
class DistillTask:
    net: nn.Module
    teacher: nn.Module | None
    device: torch.device
    feature_dtype: torch.dtype = torch.float32  # an online teacher's output is rounded to it, as if stored

    def losses(self, samples: Samples, step: int, micro: int) -> tuple[dict[str, torch.Tensor], int]:
        batch = collate_distill(samples, self.device)
        target = batch.teacher
        if target is None:
            if self.teacher is None:
                raise ConfigError(
                    "no teacher: these samples carry no precomputed features and no SAM teacher is loaded"
                )
            with torch.no_grad():
                target = self.teacher(batch.images).to(self.feature_dtype).float()
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

    precision: "fp32" (the reference's), "bf16" (bf16 autocast on any device: the CPU run of the
    GPU path) or "auto" (bf16 autocast on CUDA, fp32 elsewhere)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r}: use one of {', '.join(PRECISIONS)}")

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        if self.world_size == 1 or not dist.is_initialized():
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
        return t.tolist()

    def autocast(self) -> contextlib.AbstractContextManager:
        bf16 = self.precision == "bf16" or (self.precision == "auto" and self.device.type == "cuda")
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def row_batches(
    rows: Iterator[dict[str, Any]], batch_size: int, *, min_item: int = 0
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


def train_loop(
    *,
    task: Task,
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rows: Iterator[dict[str, Any]],
    run: RunSpec,
    state: TrainState,
    runtime: Runtime,
    report: Report,
    grad_clip: float | None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainState:
    """Optimise until ``run.max_steps``, the end of the data or ``should_stop()`` (all workers
    agree on each). ``report(metrics, checkpoint)`` is called on every worker at the same steps."""
    max_steps = run.max_steps
    assert max_steps is not None, "max_steps is resolved before a run starts (recipes.resolve_steps)"
    batches = row_batches(rows, run.batch_size, min_item=state.resume_item)
    params = [p for p in net.parameters() if p.requires_grad]
    sums: dict[str, float] = {}
    steps_since, images_since, last_item, t0 = 0, 0, state.resume_item - 1, time.perf_counter()
    last_checkpoint = state.step
    while state.step < max_steps:
        micro = [next(batches, None) for _ in range(run.grad_accum)]
        go = all(m is not None for m in micro) and not (should_stop and should_stop())
        if runtime.all_reduce([float(go)], "min")[0] < 1:
            break
        optimizer.zero_grad(set_to_none=True)
        for i, (samples, top) in enumerate(m for m in micro if m is not None):
            last = i == len(micro) - 1
            no_sync = getattr(net, "no_sync", None)  # DistributedDataParallel's
            sync = contextlib.nullcontext() if last or no_sync is None else no_sync()
            with sync:
                with runtime.autocast():
                    terms, images = task.losses(samples, state.step, i)
                (cast(torch.Tensor, sum(terms.values())) / len(micro)).backward()
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
        checkpoint = state.step % run.checkpoint_every == 0 or state.step == max_steps
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


def _metrics(
    sums: dict[str, float], steps: int, images: int, seconds: float, optimizer: torch.optim.Optimizer, runtime: Runtime
) -> dict[str, float]:
    keys = sorted(sums)
    reduced = runtime.all_reduce([sums[k] for k in keys] + [float(images)], "sum")
    out = {k: v / steps / runtime.world_size for k, v in zip(keys, reduced[:-1])}
    loss_keys = [k for k in keys if k.startswith("loss_")]
    out["loss"] = sum(out[k] for k in loss_keys)
    out["images"] = reduced[-1]
    out["images_per_s"] = reduced[-1] / max(seconds, 1e-9)
    out["lr"] = float(optimizer.param_groups[0]["lr"])
    return out
