"""Distillation (Eq. 5): adapted student vs detached instructive features, InstanceNorm on both, MSE over levels."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lgd.pyramid import PyramidLayout


class AdaptationHead(nn.Module):
    """FitNet-style adapter on the student features: three conv3x3 with ReLU between, shared over levels."""

    def __init__(self, dim: int = 256):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(dim, dim, 3, padding=1))

    def forward(self, canvas: torch.Tensor, layout: PyramidLayout) -> torch.Tensor:
        """The student's L maps packed by ``layout`` -> adapted maps, same canvas (cells between levels not
        zeroed: ``distillation_loss`` normalises per level, which zeroes them)."""
        return layout.apply(self.body, canvas, mask_output=False)


def distillation_loss(student: torch.Tensor, instructive: torch.Tensor, layout: PyramidLayout) -> torch.Tensor:
    """Σ_levels ||IN(student) - IN(sg(instructive))||² / total size of the pyramid (Eq. 5); both sides are
    canvases of ``layout``, InstanceNorm per image, channel and level (a 1x1 map normalises to zeros)."""
    s = layout.normalize(student, per_channel=True)
    t = layout.normalize(instructive.detach(), per_channel=True)
    B, C = s.shape[:2]
    return F.mse_loss(s, t, reduction="sum") / (B * C * sum(layout.numel))
