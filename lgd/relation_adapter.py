"""Inter-object relation adapter (§3.2, Eq. 1-3): multi-head cross-attention within each image, per level."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RelationAdapter(nn.Module):
    """Query = appearance, key = value = label embeddings ("student" mode); reversed in "label" mode (Table 5).

    The parameters are ``nn.MultiheadAttention``'s (so the reference's weights map one to one); the attention
    itself runs as one ``scaled_dot_product_attention`` over all images and levels, and the side that is the
    same on every level (the label embeddings) is projected once, not once per level.
    """

    def __init__(self, dim: int = 256, heads: int = 8, query: str = "student"):
        super().__init__()
        self.label_proj = nn.Linear(dim, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.query = query

    def forward(self, label: torch.Tensor, appearance: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """label (B, N, C), appearance (B, L, N, C), valid (B, N) -> interacted embeddings (B, L, N, C)."""
        B, L, N, C = appearance.shape
        h = self.attn.num_heads
        lab = torch.relu(F.layer_norm(self.label_proj(label.reshape(B * N, C)), (C,))).view(B, 1, N, C)
        q_in, kv_in = (appearance, lab) if self.query == "student" else (lab, appearance)
        w, b = self.attn.in_proj_weight, self.attn.in_proj_bias
        q = F.linear(q_in.reshape(-1, C), w[:C], b[:C]).view(B, q_in.shape[1], N, h, C // h).transpose(2, 3)
        kv = F.linear(kv_in.reshape(-1, C), w[C:], b[C:]).view(B, kv_in.shape[1], N, 2, h, C // h)
        k, v = kv.permute(3, 0, 1, 4, 2, 5).expand(2, B, L, h, N, C // h).reshape(2, B * L, h, N, C // h)
        q = q.expand(B, L, h, N, C // h).reshape(B * L, h, N, C // h)  # dense 4-D inputs for every SDPA kernel
        keys = valid.repeat_interleave(L, dim=0)[:, None, None, :]  # never across images, never to padding
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keys)
        out = F.linear(out.transpose(1, 2).reshape(-1, C), self.attn.out_proj.weight, self.attn.out_proj.bias)
        return out.view(B, L, N, C) * valid[:, None, :, None]
