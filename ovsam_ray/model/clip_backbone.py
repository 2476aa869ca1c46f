"""Frozen CLIP visual towers as 4-level feature pyramids plus their image heads.

``ResNetCLIPBackbone`` wraps open_clip's ``ModifiedResNet`` (RN50, RN50x16, RN50x64, tiny test
configs); ``ConvNeXtCLIPBackbone`` wraps open_clip's ``TimmModel`` with a timm ConvNeXt trunk.
Both return stage outputs at strides 4/8/16/32 and embed regions with the CLIP image head
(the "CLIP branch" of DESIGN §2.7).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.ops import roi_align

from ovsam_ray.model.functional import mask_pool


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad = False


class ResNetCLIPBackbone(nn.Module):
    """open_clip ModifiedResNet: stem + layer1..4, attention-pool head.

    ``embed_regions`` RoI-aligns boxes on the stride-32 stage to the attention pool's native
    grid (7/12/14 for RN50/RN50x16/RN50x64) and runs the attention pool, giving CLIP
    embeddings (N, D).
    """

    strides = (4, 8, 16, 32)

    def __init__(self, *, visual: Any) -> None:
        super().__init__()
        # open_clip's visual tower: untyped, its submodules are read by name.
        self.visual: Any = visual
        width = visual.conv3.out_channels
        self.channels = [width * 4, width * 8, width * 16, width * 32]
        self.roi_size = visual.image_size // 32 if isinstance(visual.image_size, int) else visual.image_size[0] // 32
        self.embed_dim = visual.output_dim

    def lock(self) -> None:
        """Freeze all parameters (the CLIP tower is never trained by OV-SAM)."""
        _freeze(self)

    def train(self, mode: bool = True) -> ResNetCLIPBackbone:
        # Frozen BatchNorm statistics: the tower always runs in eval mode.
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: (B, 3, S, S) normalised -> 4 feature maps (B, C_i, S/s_i, S/s_i)."""
        v = self.visual
        x = v.stem(x)
        feats = []
        for layer in (v.layer1, v.layer2, v.layer3, v.layer4):
            x = layer(x)
            feats.append(x)
        return feats

    def embed_regions(
        self,
        feats: list[torch.Tensor],
        boxes: torch.Tensor,
        image_index: torch.Tensor,
        mask_logits: torch.Tensor | None,
    ) -> torch.Tensor:
        """CLIP embeddings (N, D) of (N, 4) XYXY boxes in input pixels on image ``image_index``."""
        if boxes.shape[0] == 0:
            return feats[-1].new_zeros((0, self.embed_dim))
        last = feats[-1]
        rois = torch.cat([image_index[:, None].to(boxes), boxes], dim=1).to(last.dtype)
        regions = roi_align(
            last, rois, output_size=self.roi_size, spatial_scale=1 / 32.0, sampling_ratio=0, aligned=True
        )
        return self.visual.attnpool(regions)


class ConvNeXtCLIPBackbone(nn.Module):
    """open_clip TimmModel with a timm ConvNeXt trunk: stem + 4 stages.

    ``embed_regions`` mask-average-pools the last stage (as the reference does for ConvNeXt
    CLIP) and applies the trunk head and open_clip's projection head.
    """

    strides = (4, 8, 16, 32)

    def __init__(self, *, visual: Any) -> None:
        super().__init__()
        # open_clip's visual tower: untyped, its submodules are read by name.
        self.visual: Any = visual
        trunk = visual.trunk
        self.channels = [stage.blocks[-1].mlp.fc2.out_features for stage in trunk.stages]
        head = visual.head
        self.embed_dim = head.mlp.fc2.out_features if hasattr(head, "mlp") else head.proj.out_features

    def lock(self) -> None:
        _freeze(self)

    def train(self, mode: bool = True) -> ConvNeXtCLIPBackbone:
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        trunk = self.visual.trunk
        x = trunk.stem(x)
        feats = []
        for i, stage in enumerate(trunk.stages):
            x = stage(x)
            if i == len(trunk.stages) - 1:
                x = trunk.norm_pre(x)
            feats.append(x)
        return feats

    def embed_regions(
        self,
        feats: list[torch.Tensor],
        boxes: torch.Tensor,
        image_index: torch.Tensor,
        mask_logits: torch.Tensor,
    ) -> torch.Tensor:
        """CLIP embeddings (N, D) from the mask-pooled last stage; ``boxes`` are unused."""
        if mask_logits.shape[0] == 0:
            return feats[-1].new_zeros((0, self.embed_dim))
        pooled = mask_pool(feats[-1], mask_logits, image_index)
        x = self.visual.trunk.forward_head(pooled[:, :, None, None])
        return self.visual.head(x)


# The two towers OV-SAM runs on (presets choose by the open_clip model's visual tower).
CLIPBackbone = ResNetCLIPBackbone | ConvNeXtCLIPBackbone
