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
    """InstanceNorm without affine; unlike F.instance_norm it accepts 1x1 maps (small inputs, P7)."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    var = x.var(dim=(2, 3), keepdim=True, unbiased=False)
    return (x - mean) * torch.rsqrt(var + eps)


def distillation_loss(student: list[torch.Tensor], instructive: list[torch.Tensor]) -> torch.Tensor:
    """Σ_levels ||IN(student) - IN(sg(instructive))||² / total size of the pyramid (Eq. 5)."""
    total = sum(s.numel() for s in student)
    sq = [F.mse_loss(instance_norm(s), instance_norm(t.detach()), reduction="sum") for s, t in zip(student, instructive)]
    return torch.stack(sq).sum() / total
