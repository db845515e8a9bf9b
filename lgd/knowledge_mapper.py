"""Intra-object knowledge mapper (§3.3, Eq. 4): paint object embeddings into their masks, add context, refine."""
from __future__ import annotations

import torch
from torch import nn

from lgd.objects import PackedObjects


def _conv_gn_relu(dim):
    return [nn.Conv2d(dim, dim, 3, padding=1), nn.GroupNorm(1, dim), nn.ReLU(inplace=True)]


class KnowledgeMapper(nn.Module):
    """R(conv(sum_i M_i fc_o(e_i)) + fc_c(e_ctx)), R = ReLU then three conv3x3 (GN + ReLU between).

    ``inputs`` selects the ablation of Table 6(a): "objects", "context" or "both".
    """

    def __init__(self, dim: int = 256, inputs: str = "both"):
        super().__init__()
        self.inputs = inputs
        self.obj_fc = nn.Linear(dim, dim) if inputs in ("objects", "both") else None
        self.paint_conv = nn.Conv2d(dim, dim, 3, padding=1) if self.obj_fc is not None else None
        self.ctx_fc = nn.Linear(dim, dim) if inputs in ("context", "both") else None
        self.refine = nn.Sequential(nn.ReLU(), *_conv_gn_relu(dim), *_conv_gn_relu(dim), nn.Conv2d(dim, dim, 3, padding=1))

    def forward(self, inter: torch.Tensor, masks: list[torch.Tensor], sizes: list[tuple[int, int]],
                objs: PackedObjects) -> list[torch.Tensor]:
        """inter (B, L, N, C); masks L of (B, N, h*w) -> instructive features, L maps (B, C, h, w)."""
        B, L, N, C = inter.shape
        out = []
        for lvl, (m, (h, w)) in enumerate(zip(masks, sizes)):
            x = inter.new_zeros(B, C, h, w)
            if self.obj_fc is not None:
                e = self.obj_fc(inter[:, lvl]) * objs.objects[..., None]
                x = self.paint_conv(torch.einsum("bnc,bnp->bcp", e, m).reshape(B, C, h, w))
            if self.ctx_fc is not None:  # the context object sits in slot 0
                x = x + self.ctx_fc(inter[:, lvl, 0])[..., None, None]
            out.append(self.refine(x))
        return out
