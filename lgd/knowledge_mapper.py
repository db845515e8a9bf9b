"""Intra-object knowledge mapper (§3.3, Eq. 4): paint object embeddings into their masks, add context, refine."""
from __future__ import annotations

import torch
from torch import nn

from lgd.objects import PackedObjects
from lgd.pyramid import PyramidLayout


def refinement(dim: int) -> nn.Sequential:
    """R of Eq. 4 as the reference builds it: ReLU, then three conv3x3, each followed by GroupNorm(1) without
    affine parameters, ReLU between them; the output is normalised per image."""
    def gn():
        return nn.GroupNorm(1, dim, affine=False)
    return nn.Sequential(nn.ReLU(), nn.Conv2d(dim, dim, 3, padding=1), gn(), nn.ReLU(),
                         nn.Conv2d(dim, dim, 3, padding=1), gn(), nn.ReLU(), nn.Conv2d(dim, dim, 3, padding=1), gn())


class KnowledgeMapper(nn.Module):
    """R(conv(sum_i M_i fc_o(e_i)) + fc_c(e_ctx)) with R = ``refinement``.

    ``inputs`` selects the ablation of Table 6(a): "objects", "context" or "both".
    """

    def __init__(self, dim: int = 256, inputs: str = "both"):
        super().__init__()
        self.inputs = inputs
        self.obj_fc = nn.Linear(dim, dim) if inputs in ("objects", "both") else None
        self.paint_conv = nn.Conv2d(dim, dim, 3, padding=1) if self.obj_fc is not None else None
        self.ctx_fc = nn.Linear(dim, dim) if inputs in ("context", "both") else None
        self.refine = refinement(dim)

    def forward(self, inter: torch.Tensor, masks: torch.Tensor, layout: PyramidLayout,
                objs: PackedObjects) -> torch.Tensor:
        """inter (B, L, N, C); masks (B, N, P) over the concatenated levels -> the L maps as one canvas."""
        B, L, N, C = inter.shape
        x = None
        if self.obj_fc is not None:
            e = (self.obj_fc(inter) * objs.objects[:, None, :, None]).transpose(2, 3)  # (B, L, C, N)
            painted = torch.cat([torch.bmm(e_l, m) for e_l, m in zip(e.unbind(1), masks.split(layout.numel, dim=-1))],
                                dim=-1)  # (B, C, P)
            x = layout.mask_between_levels(self.paint_conv(layout.scatter(painted)))
        if self.ctx_fc is not None:
            ctx = layout.broadcast(self.ctx_fc(inter[:, :, 0]))  # the context object (slot 0), on its level's cells
            x = ctx if x is None else x + ctx
        return layout.apply(self.refine, x)
