"""Distillation (Eq. 5): adapted student vs detached instructive features, InstanceNorm on both, MSE over levels."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AdaptationHead(nn.Module):
    """FitNet-style adapter on the student features: three conv3x3 with ReLU between, shared over levels."""

    def __init__(self, dim: int = 256):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(dim, dim, 3, padding=1))

    def forward(self, x):
        return self.body(x)


def instance_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """InstanceNorm without affine; unlike F.instance_norm and F.group_norm it accepts a single image with
    1x1 maps (small inputs, P7, one image per DDP worker), which it maps to zeros."""
    var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, unbiased=False)
    return (x - mean) * torch.rsqrt(var + eps)


def distillation_loss(student: list[torch.Tensor], instructive: list[torch.Tensor]) -> torch.Tensor:
    """Σ_levels ||IN(student) - IN(sg(instructive))||² / total size of the pyramid (Eq. 5)."""
    s = torch.cat([instance_norm(x).flatten(1) for x in student], dim=1)
    t = torch.cat([instance_norm(x.detach()).flatten(1) for x in instructive], dim=1)
    return F.mse_loss(s, t, reduction="mean")
