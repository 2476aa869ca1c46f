"""OV-SAM's mask decoder: SAM's two-way transformer with one mask token, no IoU head, and a
learned label token in front (token order [label, mask, prompts]) — DESIGN §2.4.

Parameter names follow the released ``clip2sam_*.pth`` (``mask_decoder.mask_decoder.*`` for the
SAM parts, ``mask_decoder.label_token`` / ``mask_decoder.label_mlp`` for the label path); the
conversion lives in ``ovsam_ray.weights.files``.
"""

from __future__ import annotations

import torch
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.mask_decoder import MLP
from segment_anything.modeling.transformer import TwoWayTransformer
from torch import nn


class MaskDecoder(nn.Module):
    """Prompts + image embedding -> one low-res mask and a label embedding per prompt.

    Args:
        transformer_dim: token width C (256 for SAM).
        transformer_depth, transformer_mlp_dim, transformer_heads: the two-way transformer.
        label_dim: D, the CLIP embedding dimension the label MLP projects to.
    """

    def __init__(
        self,
        *,
        transformer_dim: int = 256,
        transformer_depth: int = 2,
        transformer_mlp_dim: int = 2048,
        transformer_heads: int = 8,
        label_dim: int = 768,
    ) -> None:
        super().__init__()
        c = transformer_dim
        self.transformer = TwoWayTransformer(
            depth=transformer_depth, embedding_dim=c, mlp_dim=transformer_mlp_dim, num_heads=transformer_heads
        )
        self.mask_tokens = nn.Embedding(1, c)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(c, c // 4, kernel_size=2, stride=2),
            LayerNorm2d(c // 4),
            nn.GELU(),
            nn.ConvTranspose2d(c // 4, c // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList([MLP(c, c, c // 8, 3)])
        self.label_token = nn.Embedding(1, c)
        self.label_mlp = MLP(c, c, label_dim, 3)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        image_index: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode N prompts over B images.

        image_embeddings: (B, C, h, w); image_pe: (1, C, h, w); sparse_prompt_embeddings:
        (N, T, C); dense_prompt_embeddings: (N or 1, C, h, w); image_index: (N,) image of each
        prompt. Returns low-res mask logits (N, 1, 4h, 4w) and label embeddings (N, D).
        """
        n = sparse_prompt_embeddings.shape[0]
        tokens = torch.cat([self.label_token.weight, self.mask_tokens.weight], dim=0)
        tokens = tokens.unsqueeze(0).expand(n, -1, -1).to(sparse_prompt_embeddings.dtype)
        queries = torch.cat([tokens, sparse_prompt_embeddings], dim=1)

        src = image_embeddings[image_index] + dense_prompt_embeddings
        pos = image_pe.expand(n, -1, -1, -1)
        _, c, h, w = src.shape
        hs, src = self.transformer(src, pos, queries)
        label_query = hs[:, 0, :]
        mask_query = hs[:, 1, :]

        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(n, c, h, w))
        hyper = self.output_hypernetworks_mlps[0](mask_query)  # (N, C/8)
        _, c8, uh, uw = upscaled.shape
        masks = (hyper[:, None, :] @ upscaled.reshape(n, c8, uh * uw)).reshape(n, 1, uh, uw)
        return masks, self.label_mlp(label_query)
