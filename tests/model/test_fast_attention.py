"""FastAttention (SDPA + rel-pos bias as attn_mask) equals segment_anything's Attention: single
blocks (windowed, global, interpolated tables), the tiny adapter, chunking, gradients, the state
dict, bf16 autocast, and the predictor's masks and labels."""

from __future__ import annotations

import copy
from functools import partial

import numpy as np
import pytest
import torch
from segment_anything.modeling.image_encoder import Attention as SamAttention
from segment_anything.modeling.image_encoder import Block
from test_predictor import IMAGES, PROMPTS, predictor  # noqa: F401  (``predictor`` is a fixture)
from torch import nn

from ovsam_ray.model.attention import FastAttention, use_fast_attention, use_sam_attention
from ovsam_ray.model.predictor import OVSAMPredictor
from ovsam_ray.model.presets import build_ovsam

DIM, HEADS = 64, 4


def _randomize_rel_pos(module: nn.Module, seed: int) -> None:
    """rel_pos_zero_init leaves the tables at zero, which would hide any bias bug."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, SamAttention | FastAttention):
                m.rel_pos_h.copy_(torch.randn(m.rel_pos_h.shape, generator=gen) * 0.5)
                m.rel_pos_w.copy_(torch.randn(m.rel_pos_w.shape, generator=gen) * 0.5)


def _block(window_size: int, input_size: tuple[int, int]) -> Block:
    torch.manual_seed(0)
    block = Block(
        dim=DIM,
        num_heads=HEADS,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=window_size,
        input_size=input_size,
    )
    _randomize_rel_pos(block, seed=1)
    return block


def _fast_copy(module: nn.Module, query_chunk: int | None = None) -> nn.Module:
    fast = copy.deepcopy(module)
    assert use_fast_attention(fast, query_chunk=query_chunk) > 0
    return fast


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=rel * expected.abs().max().item())


# window size, table size the block was built for, token grid it runs on
BLOCKS = {
    "windowed_padded": (14, (20, 20), (20, 20)),  # 20x20 -> padded to 28x28, four 14x14 windows
    "global_non_square": (0, (12, 20), (12, 20)),
    "global_interpolated": (0, (16, 16), (12, 12)),  # tables resized as segment_anything does
}


@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_matches_sam_with_gradients(name: str) -> None:
    window_size, input_size, grid = BLOCKS[name]
    sam = _block(window_size, input_size)
    fast = _fast_copy(sam)
    assert isinstance(fast.attn, FastAttention)
    x = torch.randn(2, *grid, DIM, generator=torch.Generator().manual_seed(2), requires_grad=True)
    ref, out = sam(x), fast(x)
    _assert_close(out, ref)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *sam.parameters()])
    grads = torch.autograd.grad(out.square().sum(), [x, *fast.parameters()])
    for g, r in zip(grads, ref_grads):
        _assert_close(g, r)


@pytest.mark.parametrize("query_chunk", [1, 7, 64, 240, 1000])
def test_chunked_equals_unchunked(query_chunk: int) -> None:
    sam = _block(0, (12, 20))
    x = torch.randn(2, 12, 20, DIM, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = _fast_copy(sam)(x)
        _assert_close(_fast_copy(sam, query_chunk=query_chunk)(x), whole, rel=1e-6)


def test_swap_keeps_state_dict_and_tensors_and_is_reversible() -> None:
    model = build_ovsam("ovsam_tiny").adapter
    _randomize_rel_pos(model, seed=4)
    before = model.state_dict(keep_vars=True)
    feats = _adapter_inputs(model)
    with torch.no_grad():
        ref = model(feats)
    assert use_fast_attention(model, query_chunk=100) == 2
    assert use_fast_attention(model) == 0  # already swapped: only the chunk changes
    assert all(isinstance(b.attn, FastAttention) and b.attn.query_chunk is None for b in model.blocks)
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before)
    assert all(after[k] is before[k] for k in before)  # the very same tensors, not copies
    model.load_state_dict({k: v.detach() for k, v in before.items()}, strict=True)
    assert use_sam_attention(model) == 2
    assert all(type(b.attn) is SamAttention for b in model.blocks)
    assert all(v is before[k] for k, v in model.state_dict(keep_vars=True).items())
    with torch.no_grad():
        torch.testing.assert_close(model(feats), ref, rtol=0.0, atol=0.0)


def test_attention_without_rel_pos() -> None:
    torch.manual_seed(5)
    sam = SamAttention(DIM, num_heads=HEADS, use_rel_pos=False)
    fast = FastAttention.from_sam(sam, query_chunk=10)
    x = torch.randn(3, 6, 7, DIM)
    with torch.no_grad():
        _assert_close(fast(x), sam(x))
    assert list(fast.state_dict()) == list(sam.state_dict())


def _adapter_inputs(adapter: nn.Module, batch: int = 2, image_size: int = 256) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(6)
    shapes = []
    for embed, stride in zip(adapter.patch_embeds, (4, 8, 16, 32)):
        shapes.append((batch, embed.projection.in_channels, image_size // stride, image_size // stride))
    return [torch.randn(s, generator=gen) for s in shapes]


@pytest.mark.parametrize("query_chunk", [None, 50])
def test_tiny_adapter_matches_sam(query_chunk: int | None) -> None:
    torch.manual_seed(0)
    adapter = build_ovsam("ovsam_tiny").adapter.eval()
    _randomize_rel_pos(adapter, seed=7)
    fast = _fast_copy(adapter, query_chunk=query_chunk)
    feats = _adapter_inputs(adapter)
    with torch.no_grad():
        _assert_close(fast(feats), adapter(feats))


def test_bf16_autocast_on_cpu() -> None:
    sam = _block(0, (12, 20)).eval()
    fast = _fast_copy(sam, query_chunk=64)
    x = torch.randn(2, 12, 20, DIM, generator=torch.Generator().manual_seed(8))
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            sam_bf16, out = sam(x), fast(x)
    except RuntimeError as e:  # an old torch without CPU bf16 autocast for these ops
        pytest.skip(f"bf16 autocast on CPU unsupported: {e}")
    with torch.no_grad():
        ref = sam(x)
    assert torch.isfinite(out).all()
    # bf16 has 8 bits of mantissa: compare with segment_anything's own bf16 error.
    err, sam_err = (out.float() - ref).abs().max(), (sam_bf16.float() - ref).abs().max()
    assert err <= max(2 * sam_err, 0.02 * ref.abs().max())


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def test_predictor_masks_and_labels_unchanged(predictor: OVSAMPredictor) -> None:  # noqa: F811  (the fixture)
    model = copy.deepcopy(predictor.model)
    use_sam_attention(model)  # the predictor swaps the fast attention in by default
    _randomize_rel_pos(model.adapter, seed=9)
    sam_pred = OVSAMPredictor(model, predictor.classifier, fast=False, fast_attention=False)
    fast_pred = OVSAMPredictor(copy.deepcopy(model), predictor.classifier, fast=False)  # default: fast attention
    assert all(isinstance(b.attn, SamAttention) for b in sam_pred.model.adapter.blocks)
    assert all(isinstance(b.attn, FastAttention) for b in fast_pred.model.adapter.blocks)
    refs, outs = sam_pred(IMAGES, PROMPTS), fast_pred(IMAGES, PROMPTS)
    assert sum(len(r.labels) for r in refs) > 0  # not a check on empties only
    for ref, out in zip(refs, outs):
        np.testing.assert_array_equal(out.labels, ref.labels)
        assert out.masks.shape == ref.masks.shape
        assert all(_mask_iou(m, r) >= 0.99 for m, r in zip(out.masks, ref.masks))
