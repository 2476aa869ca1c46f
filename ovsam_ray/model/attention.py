"""SAM ViT attention through ``scaled_dot_product_attention``.

segment_anything's ``Attention`` materialises the fp32 (B*heads, N, N) score matrix and adds
the decomposed relative-position bias to it in place of a fused kernel: for the adapter's global
block at 64x64 tokens that is 4096x4096 per head, several copies at once. ``FastAttention``
computes the same function with SDPA, the bias passed as an additive ``attn_mask`` in the query
dtype, optionally for blocks of query rows so that only one block's bias (and scores) exists at
a time. It owns the very same ``qkv``/``proj``/``rel_pos_h``/``rel_pos_w`` tensors, so state
dict keys and released checkpoints are unchanged; ``use_fast_attention`` swaps it into every
segment_anything ``Block`` of a model and ``use_sam_attention`` swaps back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention as SamAttention
from segment_anything.modeling.image_encoder import Block, get_rel_pos
from torch import nn


class FastAttention(nn.Module):
    """Multi-head attention with decomposed relative positions, equal to segment_anything's
    ``Attention`` (same parameters, same math; rel-pos terms from the unscaled query).

    Args:
        qkv, proj: the input and output projections (dim -> 3*dim, dim -> dim).
        num_heads: heads; head_dim = dim // num_heads, scale = head_dim ** -0.5.
        rel_pos_h, rel_pos_w: (2*H-1, head_dim), (2*W-1, head_dim) tables, or None for no
            relative positions. Other sizes are interpolated as segment_anything does.
        query_chunk: query rows per SDPA call (None: all at once). Bounds the bias and score
            memory at inference; under autograd every chunk's bias is kept for backward anyway.
    """

    def __init__(
        self,
        *,
        qkv: nn.Linear,
        proj: nn.Linear,
        num_heads: int,
        rel_pos_h: nn.Parameter | None = None,
        rel_pos_w: nn.Parameter | None = None,
        query_chunk: int | None = None,
    ) -> None:
        super().__init__()
        if (rel_pos_h is None) != (rel_pos_w is None):
            raise ValueError("give both rel_pos_h and rel_pos_w, or neither")
        if query_chunk is not None and query_chunk < 1:
            raise ValueError(f"query_chunk must be a positive number of rows or None, got {query_chunk}")
        self.num_heads = num_heads
        self.scale = (qkv.in_features // num_heads) ** -0.5
        self.qkv = qkv
        self.proj = proj
        self.use_rel_pos = rel_pos_h is not None
        if self.use_rel_pos:
            self.rel_pos_h = rel_pos_h
            self.rel_pos_w = rel_pos_w
        self.query_chunk = query_chunk

    @classmethod
    def from_sam(cls, attn: SamAttention, *, query_chunk: int | None = None) -> FastAttention:
        """Wrap the tensors of a segment_anything ``Attention`` (shared, not copied)."""
        fast = cls(
            qkv=attn.qkv,
            proj=attn.proj,
            num_heads=attn.num_heads,
            rel_pos_h=attn.rel_pos_h if attn.use_rel_pos else None,
            rel_pos_w=attn.rel_pos_w if attn.use_rel_pos else None,
            query_chunk=query_chunk,
        )
        return fast.train(attn.training)

    def to_sam(self) -> SamAttention:
        """A segment_anything ``Attention`` sharing this module's tensors."""
        input_size = None
        if self.use_rel_pos:
            assert self.rel_pos_h is not None and self.rel_pos_w is not None
            input_size = ((self.rel_pos_h.shape[0] + 1) // 2, (self.rel_pos_w.shape[0] + 1) // 2)
        attn = SamAttention(
            self.qkv.in_features,
            num_heads=self.num_heads,
            qkv_bias=self.qkv.bias is not None,
            use_rel_pos=self.use_rel_pos,
            input_size=input_size,
        )
        attn.qkv, attn.proj = self.qkv, self.proj
        if self.use_rel_pos:
            attn.rel_pos_h, attn.rel_pos_w = self.rel_pos_h, self.rel_pos_w
        return attn.train(self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, dim) tokens (a window or the whole grid) -> (B, H, W, dim)."""
        b, h, w, _ = x.shape
        n = h * w
        # (3, B, heads, N, head_dim)
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        rel_h, rel_w = self._rel_pos_terms(q, (h, w)) if self.use_rel_pos else (None, None)
        step = self.query_chunk or n
        out = torch.cat([self._attend(q, k, v, rel_h, rel_w, i, min(i + step, n)) for i in range(0, n, step)], dim=2)
        return self.proj(out.transpose(1, 2).reshape(b, h, w, -1))

    def _rel_pos_terms(self, q: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per query, its bias towards each key row and each key column: (B, heads, N, H) and
        (B, heads, N, W), from the unscaled query (as segment_anything's add_decomposed_rel_pos)."""
        h, w = size
        r_q = q.reshape(*q.shape[:2], h, w, q.shape[-1])
        table_h = get_rel_pos(h, h, self.rel_pos_h).to(q.dtype)
        table_w = get_rel_pos(w, w, self.rel_pos_w).to(q.dtype)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, table_h).flatten(2, 3)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, table_w).flatten(2, 3)
        return rel_h, rel_w

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rel_h: torch.Tensor | None,
        rel_w: torch.Tensor | None,
        start: int,
        stop: int,
    ) -> torch.Tensor:
        """Attention of query rows [start, stop) over all keys: (B, heads, stop - start, head_dim)."""
        mask = None
        if rel_h is not None:
            assert rel_w is not None
            # Key index = key_row * W + key_col, as segment_anything's view(B, qh, qw, kh, kw).
            bias = rel_h[:, :, start:stop, :, None] + rel_w[:, :, start:stop, None, :]
            mask = bias.flatten(3).to(q.dtype)
        return F.scaled_dot_product_attention(q[:, :, start:stop], k, v, attn_mask=mask, scale=self.scale)


def _sam_blocks(module: nn.Module) -> list[Block]:
    return [m for m in module.modules() if isinstance(m, Block)]


def use_fast_attention(module: nn.Module, *, query_chunk: int | None = None) -> int:
    """Swap ``FastAttention`` into every segment_anything ``Block`` inside ``module``, in place,
    sharing the parameters (state dict keys unchanged). Blocks already swapped get the new
    ``query_chunk`` but are not counted. Returns the number of blocks swapped."""
    swapped = 0
    for block in _sam_blocks(module):
        if isinstance(block.attn, FastAttention):
            block.attn.query_chunk = query_chunk
        elif isinstance(block.attn, SamAttention):
            block.attn = FastAttention.from_sam(block.attn, query_chunk=query_chunk)
            swapped += 1
    return swapped


def use_sam_attention(module: nn.Module) -> int:
    """The inverse of ``use_fast_attention``: segment_anything's ``Attention`` back in every
    ``Block``, sharing the parameters. Returns the number of blocks swapped back."""
    swapped = 0
    for block in _sam_blocks(module):
        if isinstance(block.attn, FastAttention):
            block.attn = block.attn.to_sam()
            swapped += 1
    return swapped
