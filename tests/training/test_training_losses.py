"""Training losses: golden values, empty targets, point sampling."""

from __future__ import annotations

import math

import pytest
import torch

from ovsam_ray.model.functional import classify_embeddings
from ovsam_ray.training.losses import (
    class_logits,
    classification_loss,
    dice_loss,
    distillation_loss,
    mask_bce_loss,
    point_sample,
    point_sample_indexed,
    sampled_mask_losses,
    uncertain_point_coords,
)


def test_classification_loss_golden_weighted_mean():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # 2 classes + background
    labels = torch.tensor([0, 2])  # a class, then background (weight 0.1)
    ce0 = -math.log(math.exp(2) / (math.exp(2) + 2))
    ce1 = -math.log(1 / (2 + math.e))
    expected = (1.0 * ce0 + 0.1 * ce1) / 1.1
    assert classification_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    assert classification_loss(logits, labels, background_weight=1.0).item() == pytest.approx((ce0 + ce1) / 2)


def test_classification_loss_empty_has_gradient_path():
    logits = torch.zeros((0, 5), requires_grad=True)
    loss = classification_loss(logits, torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and logits.grad.shape == (0, 5)


def test_class_logits_matches_inference_classifier():
    torch.manual_seed(0)
    emb = torch.randn(4, 8)
    text = torch.nn.functional.normalize(torch.randn(3, 2, 8), dim=-1)
    ours = class_logits(emb, text, 4.6052)
    assert torch.allclose(ours, classify_embeddings(emb, text, 4.6052), atol=1e-4)
    assert (ours[:, -1] == 0).all()
    scale = torch.tensor(1.0, requires_grad=True)
    class_logits(emb, text, scale).sum().backward()
    assert scale.grad is not None and scale.grad.abs() > 0
    assert class_logits(torch.zeros(0, 8), text, 1.0).shape == (0, 4)


def test_point_sample_golden_bilinear():
    grid = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])  # (1, 1, 2, 2); pixel centres at 0.25 / 0.75
    coords = torch.tensor([[[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.5, 0.5], [0.5, 0.25]]])
    out = point_sample(grid, coords)
    assert out.shape == (1, 1, 5)
    assert torch.allclose(out[0, 0], torch.tensor([0.0, 1.0, 2.0, 1.5, 0.5]))


def test_point_sample_indexed_equals_gathered_point_sample():
    torch.manual_seed(1)
    maps = (torch.rand(3, 1, 16, 16) > 0.5).to(torch.uint8)
    index = torch.tensor([2, 0, 2, 1])
    coords = torch.rand(4, 50, 2)
    expected = point_sample(maps[index].float(), coords)
    assert torch.allclose(point_sample_indexed(maps, index, coords), expected)


def test_uncertain_points_prefer_the_boundary():
    # logits = x - 0.5 (scaled): |logit| is smallest around x = 0.5
    xs = torch.linspace(0, 1, 64)
    logits = (xs[None, :].expand(64, 64) - 0.5)[None, None] * 20
    g = torch.Generator().manual_seed(0)
    pts = uncertain_point_coords(logits, num_points=100, oversample_ratio=3.0, importance_sample_ratio=1.0, generator=g)
    rnd = torch.rand(1, 100, 2, generator=g)
    assert pts.shape == (1, 100, 2) and pts.min() >= 0 and pts.max() <= 1
    assert (pts[..., 0] - 0.5).abs().mean() < (rnd[..., 0] - 0.5).abs().mean() / 2
    mixed = uncertain_point_coords(logits, num_points=12544, oversample_ratio=3.0, importance_sample_ratio=0.75)
    assert mixed.shape == (1, 12544, 2)
    assert uncertain_point_coords(logits[:0], 10, 3.0, 0.75).shape == (0, 10, 2)


def test_mask_bce_and_dice_golden():
    logits = torch.zeros(1, 4)
    targets = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert mask_bce_loss(logits, targets).item() == pytest.approx(math.log(2))
    # p = 0.5 everywhere: 1 - (2 * 1 + 1) / (2 + 2 + 1)
    assert dice_loss(logits, targets).item() == pytest.approx(0.4)
    perfect = torch.tensor([[50.0, 50.0, -50.0, -50.0]])
    assert dice_loss(perfect, targets).item() == pytest.approx(0.0, abs=1e-6)


def test_sampled_mask_losses_empty_and_perfect():
    empty = torch.zeros((0, 1, 8, 8), requires_grad=True)
    bce, dice = sampled_mask_losses(empty, torch.zeros((0, 1, 32, 32)), num_points=64)
    assert bce.item() == 0.0 and dice.item() == 0.0
    (bce + dice).backward()
    assert empty.grad is not None

    target = torch.zeros(1, 1, 32, 32)
    target[..., 8:24, 8:24] = 1
    perfect = (target * 2 - 1) * 30  # same frame, confident logits
    # uniform points (importance 0): only the few points on the 1-pixel boundary band are unsure
    kwargs = {"num_points": 512, "importance_sample_ratio": 0.0}
    bce, dice = sampled_mask_losses(perfect, target, generator=torch.Generator().manual_seed(0), **kwargs)
    assert bce.item() < 0.5 and dice.item() < 0.05
    bce_w, dice_w = sampled_mask_losses(-perfect, target, generator=torch.Generator().manual_seed(0), **kwargs)
    assert bce_w.item() > 10 * bce.item() and dice_w.item() > 0.9
    # importance sampling concentrates on that boundary band, where a perfect mask is least sure
    bce_b, _ = sampled_mask_losses(perfect, target, num_points=512, generator=torch.Generator().manual_seed(0))
    assert bce_b.item() > bce.item()


def test_sampled_mask_losses_target_index_shares_masks():
    torch.manual_seed(0)
    logits = torch.randn(3, 1, 16, 16)
    targets = (torch.rand(2, 1, 64, 64) > 0.5).to(torch.uint8)
    index = torch.tensor([1, 1, 0])
    a = sampled_mask_losses(logits, targets, index, num_points=128, generator=torch.Generator().manual_seed(3))
    b = sampled_mask_losses(logits, targets[index].float(), num_points=128, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])


def test_distillation_loss_golden_and_shape_check():
    assert distillation_loss(torch.ones(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)).item() == pytest.approx(1.0)
    student = torch.zeros(0, 4, 3, 3, requires_grad=True)
    loss = distillation_loss(student, torch.zeros(0, 4, 3, 3))
    loss.backward()
    assert loss.item() == 0.0
    with pytest.raises(ValueError, match="differ"):
        distillation_loss(torch.ones(1, 4, 3, 3), torch.ones(1, 4, 4, 4))
