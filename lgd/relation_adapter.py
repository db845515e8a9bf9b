"""Inter-object relation adapter (§3.2, Eq. 1-3): multi-head cross-attention within each image, per level."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RelationAdapter(nn.Module):
    """Query = appearance, key = value = label embeddings ("student" mode); reversed in "label" mode (Table 5)."""

    def __init__(self, dim: int = 256, heads: int = 8, query: str = "student"):
        super().__init__()
        self.label_proj = nn.Linear(dim, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.query = query

    def forward(self, label: torch.Tensor, appearance: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """label (B, N, C), appearance (B, L, N, C), valid (B, N) -> interacted embeddings (B, L, N, C)."""
        B, L, N, C = appearance.shape
        lab = torch.relu(F.layer_norm(self.label_proj(label), (C,)))
        lab = lab[:, None].expand(B, L, N, C).reshape(B * L, N, C)
        app = appearance.reshape(B * L, N, C)
        pad = (~valid)[:, None].expand(B, L, N).reshape(B * L, N)  # attention never crosses images
        q, kv = (app, lab) if self.query == "student" else (lab, app)
        out, _ = self.attn(q, kv, kv, key_padding_mask=pad, need_weights=False)
        return out.reshape(B, L, N, C) * valid[:, None, :, None]
