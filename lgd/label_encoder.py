"""Label encoder (§3.1(1), Table 4): PointNet with LayerNorm, or the MLP / transformer variants."""
from __future__ import annotations

import torch
from torch import nn

from lgd.norm import ObjectNorm


def masked_max(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Max over each image's valid objects: (B, N, C) -> (B, C); objects of other images never mix."""
    out = x.masked_fill(~valid[..., None], float("-inf")).amax(dim=1)
    return torch.where(torch.isfinite(out), out, torch.zeros_like(out))


class SharedMLP(nn.Module):
    """PointNet's shared 1-D convs (kernel 1 = a Linear per object), each with norm, ReLU but the last optional.

    Takes objects as rows, (B, N, d) or flattened (B * N, d), with ``valid`` of the matching shape."""

    def __init__(self, dims: list[int], norm: str, last_relu: bool = True):
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.norms = nn.ModuleList(ObjectNorm(norm, b) for b in dims[1:])
        self.last_relu = last_relu

    def forward(self, x, valid=None):
        for i, (fc, norm) in enumerate(zip(self.fcs, self.norms)):
            x = norm(fc(x), valid)
            if self.last_relu or i < len(self.fcs) - 1:
                x = torch.relu(x)
        return x


class SpatialTransformer(nn.Module):
    """PointNet's T-net: a k x k transform (no identity shortcut), per object or pooled over the image's objects.

    The reference LGD feeds every object to the T-net as a set of one point, so each object gets its own
    transform and nothing crosses objects here (``per_image=False``); ``per_image=True`` max-pools the point
    features over the image's objects first and gives the whole image one transform, as PointNet does.
    """

    def __init__(self, k: int, norm: str, per_image: bool = False):
        super().__init__()
        self.k = k
        self.per_image = per_image
        self.point = SharedMLP([k, 64, 128, 1024], norm)
        self.head = SharedMLP([1024, 512, 256], norm)
        self.out = nn.Linear(256, k * k)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Objects (B * N, k), ``valid`` (B, N) -> the transformed objects x @ T, (B * N, k)."""
        flat = valid.reshape(-1)
        g = self.point(x, flat)  # (B * N, 1024)
        if not self.per_image:
            t = self.out(self.head(g, flat)).view(-1, self.k, self.k)
            return torch.bmm(x[:, None], t)[:, 0]
        B, N = valid.shape
        t = self.out(self.head(masked_max(g.view(B, N, -1), valid))).view(B, self.k, self.k)
        return torch.bmm(x.view(B, N, self.k), t).view(B * N, self.k)


class PointNetEncoder(nn.Module):
    """Descriptors (B, N, d) -> label embeddings (B, N, C): local 64-d + per-image global 1024-d, fused to C.

    Layer for layer the reference's: T-net, 64 (norm, ReLU), T-net, 128, 1024 (norm, ReLU each), max over the
    image's objects, then [local 64 | global 1024] -> Linear -> norm -> ReLU. Objects run flattened, as rows.
    """

    def __init__(self, in_dim: int, dim: int = 256, norm: str = "layernorm", image_level_tnet: bool = False):
        super().__init__()
        self.stn_in = SpatialTransformer(in_dim, norm, image_level_tnet)
        self.mlp1 = SharedMLP([in_dim, 64], norm)
        self.stn_feat = SpatialTransformer(64, norm, image_level_tnet)
        self.mlp2 = SharedMLP([64, 128, 1024], norm)
        self.fuse = SharedMLP([64 + 1024, dim], norm)

    def forward(self, desc, valid):
        B, N, _ = desc.shape
        flat = valid.reshape(-1)
        local = self.stn_feat(self.mlp1(self.stn_in(desc.reshape(B * N, -1), valid), flat), valid)
        g = masked_max(self.mlp2(local, flat).view(B, N, -1), valid)  # (B, 1024)
        feat = torch.cat([local, g.repeat_interleave(N, dim=0)], dim=-1)
        return (self.fuse(feat, flat) * flat[:, None]).view(B, N, -1)


class MLPEncoder(nn.Module):
    """Table 4's "MLP": each object encoded alone, no relation among descriptors."""

    def __init__(self, in_dim: int, dim: int = 256, norm: str = "layernorm"):
        super().__init__()
        self.mlp = SharedMLP([in_dim, 64, 128, dim], norm, last_relu=False)

    def forward(self, desc, valid):
        return self.mlp(desc, valid) * valid[..., None]


class TransformerEncoderVariant(nn.Module):
    """Table 4's "TransEnc": scaled dot-product attention among one image's objects."""

    def __init__(self, in_dim: int, dim: int = 256, heads: int = 8, layers: int = 2):
        super().__init__()
        self.inp = nn.Linear(in_dim, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, desc, valid):
        return self.enc(self.inp(desc), src_key_padding_mask=~valid) * valid[..., None]


def build_label_encoder(kind: str, in_dim: int, dim: int, norm: str, heads: int,
                        image_level_tnet: bool = False) -> nn.Module:
    if kind == "pointnet":
        return PointNetEncoder(in_dim, dim, norm, image_level_tnet)
    if kind == "mlp":
        return MLPEncoder(in_dim, dim, norm)
    if kind == "transformer":
        return TransformerEncoderVariant(in_dim, dim, heads)
    raise ValueError(f"unknown label encoder {kind!r}")
