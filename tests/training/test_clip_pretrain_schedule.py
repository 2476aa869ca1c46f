"""Stage 0 of the tiny recipe trains on the engine's one schedule (``optim.lr_factor``)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ovsam_ray.training.clip_pretrain import _train_steps


def test_stage0_lr_is_warmup_then_cosine_of_the_engine() -> None:
    torch.manual_seed(0)
    net = nn.Linear(3, 1)
    lrs: list[float] = []
    opt_holder: list[torch.optim.Optimizer] = []

    def loss_fn(rng) -> torch.Tensor:
        return net(torch.ones(1, 3)).pow(2).sum()

    original_step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        lrs.append(self.param_groups[0]["lr"])
        opt_holder.append(self)
        return original_step(self, *args, **kwargs)

    torch.optim.AdamW.step = spy
    try:
        steps, warmup, lr = 12, 4, 1e-2
        run, _, _ = _train_steps(
            net, loss_fn, stage="t", steps=steps, lr=lr, weight_decay=0.0, warmup=warmup, seed=0,
            time_budget_s=None, clock="wall", log_every=100,
        )  # fmt: skip
    finally:
        torch.optim.AdamW.step = original_step
    assert run == steps
    # The schedule stage 0 always had: (step + 1) / warmup during warm-up, times cosine over the steps.
    expected = [lr * min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)) for s in range(steps)]
    assert lrs == [pytest_approx(e) for e in expected]


def pytest_approx(value: float):
    import pytest

    return pytest.approx(value, rel=1e-12, abs=1e-18)
