"""SAM2CLIP: the adapter distilled from SAM's image encoder (DESIGN §2.2).

Maps the 4 CLIP stages to stride 16, adds a learned per-level encoding and an absolute position
embedding, runs SAM ViT blocks (windowed, then global) and SAM's neck. Output: (B, out, S/16,
S/16), the same contract as SAM's image encoder. Parameter names follow the released
``sam2clip_vith_rn50x16.pth`` (prefix ``neck_student.``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.image_encoder import Block
from torch import nn

ENCODER_STRIDE = 16


class PatchEmbed(nn.Module):
    """One level to stride 16: conv (kernel = stride = 16/s) for s <= 16, transposed conv
    (kernel = stride = s/16) for s > 16. (B, C, h, w) -> (B, H, W, embed)."""

    def __init__(self, *, in_channels: int, embed_dim: int, stride: int) -> None:
        super().__init__()
        if stride > ENCODER_STRIDE:
            k = stride // ENCODER_STRIDE
            self.projection: nn.Module = nn.ConvTranspose2d(in_channels, embed_dim, kernel_size=k, stride=k)
        else:
            k = ENCODER_STRIDE // stride
            self.projection = nn.Conv2d(in_channels, embed_dim, kernel_size=k, stride=k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(x).permute(0, 2, 3, 1)


class SAM2CLIPAdapter(nn.Module):
    """CLIP pyramid -> SAM-style image embedding.

    Args:
        in_channels: channels of the 4 CLIP stages.
        strides: their strides (4, 8, 16, 32).
        image_size: padded model input side S; the token grid is S/16.
        embed_dim: transformer width (1280 in the paper preset).
        num_heads, depth, window_size, global_attn_indexes: the SAM ViT blocks.
        out_channels: neck width (256 = SAM's prompt embedding dim).
    """

    pos_embed: torch.Tensor  # a buffer (registered in __init__)

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        strides: Sequence[int] = (4, 8, 16, 32),
        image_size: int = 1024,
        embed_dim: int = 1280,
        num_heads: int = 16,
        depth: int = 5,
        window_size: int = 14,
        global_attn_indexes: Sequence[int] = (4,),
        out_channels: int = 256,
    ) -> None:
        super().__init__()
        grid = image_size // ENCODER_STRIDE
        self.patch_embeds = nn.ModuleList(
            PatchEmbed(in_channels=c, embed_dim=embed_dim, stride=s) for c, s in zip(in_channels, strides)
        )
        self.level_encoding = nn.Embedding(len(in_channels), embed_dim)
        nn.init.normal_(self.level_encoding.weight, mean=0.0, std=1.0)
        # A fixed buffer, as in the released model: distillation copies SAM's ``pos_embed`` into it.
        self.register_buffer("pos_embed", torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=4.0,
                qkv_bias=True,
                norm_layer=partial(nn.LayerNorm, eps=1e-6),
                act_layer=nn.GELU,
                use_rel_pos=True,
                rel_pos_zero_init=True,
                window_size=0 if i in global_attn_indexes else window_size,
                input_size=(grid, grid),
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_channels, kernel_size=1, bias=False),
            LayerNorm2d(out_channels),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_channels),
        )

    def lock(self) -> None:
        for p in self.parameters():
            p.requires_grad = False

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """feats: 4 maps (B, C_i, S/s_i, S/s_i) -> (B, out_channels, S/16, S/16)."""
        x = sum(embed(f) + self.level_encoding.weight[i] for i, (embed, f) in enumerate(zip(self.patch_embeds, feats)))
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))
