"""AdamW with the reference's parameter groups, and the learning-rate schedules (warm-up, steps,
cosine) both stages train with."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ovsam_ray.training.config import OptimConfig
from ovsam_ray.training.networks import unwrap

log = logging.getLogger(__name__)


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
            if (
                ("norm" in rules and isinstance(module, _NORMS))
                or ("bias" in rules and name == "bias")
                or ("1d" in rules and p.ndim <= 1)
                or any(r in full for r in rules if r not in ("norm", "bias", "1d"))
            ):
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
    groups = [
        {
            "params": ps,
            "weight_decay": 0.0 if no_decay else cfg.weight_decay,
            **({"lr": special[key] * scale} if key else {}),
        }
        for (key, no_decay), ps in buckets.items()
    ]
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
    """Multiplier of the base lr: linear warm-up from ``warmup_factor`` at step 0 to 1 at step
    ``warmup_steps - 1`` (mmengine's ``LinearLR(begin=0, end=warmup_steps)``, whose ``total_iters``
    is ``end - begin - 1``: the reference's warm-up ends at iteration 499 of 500), times cosine to
    ``min_lr_factor`` / x``lr_gamma`` at each milestone passed / 1 by ``progress`` in [0, 1]
    (step / max_steps)."""
    warm = 1.0
    if step < cfg.warmup_steps - 1:
        warm = cfg.warmup_factor + (1.0 - cfg.warmup_factor) * step / (cfg.warmup_steps - 1)
    elif cfg.warmup_steps == 1 and step == 0:
        warm = cfg.warmup_factor  # one step at the factor
    progress = min(max(progress, 0.0), 1.0)
    if cfg.schedule == "cosine":
        shape = cfg.min_lr_factor + (1 - cfg.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    elif cfg.schedule == "step":
        shape = cfg.lr_gamma ** sum(progress >= m for m in cfg.lr_milestones)
    else:
        shape = 1.0
    return warm * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int, progress: Callable[[int], float] | None = None
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over ``lr_factor``; ``progress(step)`` defaults to step / max_steps."""

    def factor(step: int) -> float:
        return lr_factor(step, progress(step) if progress else step / max_steps, cfg)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --- loss steps ------------------------------------------------------------------------------------
