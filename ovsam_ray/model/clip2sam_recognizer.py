"""CLIP2SAM recognition: an FPN over the CLIP stages, RoIAlign on the level chosen by box scale,
a 1x1 conv + ReLU to the CLIP dimension and a spatial mean -> region embedding (DESIGN §2.5).

New modules start as the reference's (``INIT_RULE``): the FPN's convs Xavier-uniform with zero
bias (mmdet ``FPN``'s ``init_cfg``), the RoI conv Kaiming-normal, fan_out, ReLU gain (mmcv
``ConvModule``'s default init, seg/models/heads/ovsam_head.py:133-135)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from ovsam_ray.model.functional import roi_levels

#: What ``--print-config`` states about the recognizer's initialisation.
INIT_RULE = "FPN convs Xavier-uniform, zero bias (mmdet FPN); RoI conv Kaiming-normal, fan_out, relu (mmcv ConvModule)"


class FPN(nn.Module):
    """Per level a 1x1 lateral conv (bias), top-down nearest-upsample-and-add, then a 3x3
    output conv (bias), no activation. (mmdet's FPN with num_outs = number of inputs.)"""

    def __init__(self, *, in_channels: Sequence[int], out_channels: int = 256) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, kernel_size=1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1) for _ in in_channels
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform weights (gain 1), zero biases: mmdet's FPN
        ``init_cfg=dict(type='Xavier', layer='Conv2d', distribution='uniform')``."""
        for conv in [*self.lateral_convs, *self.fpn_convs]:
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(len(laterals) - 1, 0, -1):
            upsampled = F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
            laterals[i - 1] = laterals[i - 1] + upsampled
        return [conv(x) for conv, x in zip(self.fpn_convs, laterals)]


class CLIP2SAMRecognizer(nn.Module):
    """Region embeddings (N, D) from FPN features and (N, 4) XYXY boxes in input pixels.

    Args:
        in_channels: the 4 CLIP stage widths; strides: (4, 8, 16, 32).
        fpn_channels: FPN width (256); embed_dim: D, the CLIP embedding dim.
        roi_size: RoIAlign output (12); finest_scale: the level rule's base scale (56 at 1024).
    """

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        strides: Sequence[int] = (4, 8, 16, 32),
        fpn_channels: int = 256,
        embed_dim: int = 768,
        roi_size: int = 12,
        finest_scale: float = 56.0,
    ) -> None:
        super().__init__()
        self.strides = tuple(strides)
        self.roi_size = roi_size
        self.finest_scale = finest_scale
        self.fpn = FPN(in_channels=in_channels, out_channels=fpn_channels)
        self.roi_conv = nn.Conv2d(fpn_channels, embed_dim, kernel_size=1, bias=False)
        # mmcv ConvModule's init (kaiming_init(conv, a=0, nonlinearity="relu"): mode fan_out, normal)
        nn.init.kaiming_normal_(self.roi_conv.weight, a=0, mode="fan_out", nonlinearity="relu")

    def region_embeddings(
        self, fpn_feats: Sequence[torch.Tensor], boxes: torch.Tensor, image_index: torch.Tensor
    ) -> torch.Tensor:
        """fpn_feats: FPN outputs; boxes: (N, 4) input pixels; image_index: (N,) -> (N, D)."""
        n = boxes.shape[0]
        feats = fpn_feats[0]
        out = feats.new_zeros((n, feats.shape[1], self.roi_size, self.roi_size))
        if n == 0:
            return out.new_zeros((0, self.roi_conv.out_channels))
        levels = roi_levels(boxes, finest_scale=self.finest_scale, num_levels=len(fpn_feats))
        rois = torch.cat([image_index[:, None].to(boxes), boxes], dim=1).to(feats.dtype)
        for level, (feat, stride) in enumerate(zip(fpn_feats, self.strides)):
            idx = torch.nonzero(levels == level).flatten()
            if idx.numel() == 0:
                continue
            out[idx] = roi_align(
                feat, rois[idx], output_size=self.roi_size, spatial_scale=1.0 / stride, sampling_ratio=0, aligned=True
            )
        return F.relu(self.roi_conv(out)).mean(dim=(-1, -2))
