"""Appearance encoder (§3.1(2)): projected student features pooled inside each object's mask, per level."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import roi_align

from lgd.objects import PackedObjects
from lgd.pyramid import PyramidLayout


class AppearanceEncoder(nn.Module):
    """conv3x3 + GroupNorm(1, no affine) + ReLU, then mask pooling (sum over the mask / its area, at least 1)
    or RoIAlign (App. B(b))."""

    def __init__(self, dim: int = 256, pooling: str = "mask"):
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.GroupNorm(1, dim, affine=False),
                                  nn.ReLU(inplace=True))
        self.pooling = pooling

    def forward(self, canvas: torch.Tensor, masks: torch.Tensor, layout: PyramidLayout,
                objs: PackedObjects) -> torch.Tensor:
        """canvas: the L student maps packed by ``layout`` (B, C, Hc, Wc); masks (B, N, P) over the concatenated
        levels. Returns (B, L, N, C)."""
        projected = layout.apply(self.proj, canvas)  # GroupNorm per image and level
        if self.pooling == "mask":
            area = (masks @ layout.onehot.to(masks.dtype)).clamp(min=1.0)  # (B, N, L)
            cells = layout.gather(projected).split(layout.numel, dim=-1)
            pooled = [torch.bmm(m, p.transpose(1, 2)) for m, p in zip(masks.split(layout.numel, dim=-1), cells)]
            out = torch.stack(pooled, dim=1) / area.transpose(1, 2)[..., None]
        else:
            out = torch.stack([self._roi(p, objs) for p in layout.unpack(projected)], dim=1)
        return out * objs.valid[:, None, :, None]

    @staticmethod
    def _roi(p: torch.Tensor, objs: PackedObjects) -> torch.Tensor:
        B, N = objs.valid.shape
        scale = p.shape[-1] / objs.pad_size[1]
        idx = torch.arange(B, device=p.device, dtype=p.dtype)[:, None, None].expand(B, N, 1)
        rois = torch.cat([idx, objs.boxes.to(p.dtype)], dim=-1).reshape(B * N, 5)
        pooled = roi_align(p, rois, output_size=7, spatial_scale=scale, sampling_ratio=2, aligned=True)
        return pooled.mean(dim=(2, 3)).reshape(B, N, -1)
