"""Per-object normalisation for the label encoder: LayerNorm (no affine, §3.1) or BatchNorm (Appendix B(a))."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ObjectNorm(nn.Module):
    """LayerNorm normalises each object alone; BatchNorm uses statistics over the batch's valid objects."""

    def __init__(self, kind: str, dim: int):
        super().__init__()
        self.kind = kind
        self.bn = nn.BatchNorm1d(dim) if kind == "batchnorm" else None

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        if self.bn is None:
            return F.layer_norm(x, x.shape[-1:])
        if valid is None:
            return self.bn(x.reshape(-1, x.shape[-1])).reshape(x.shape)
        out = torch.zeros_like(x)
        out[valid] = self.bn(x[valid])
        return out
