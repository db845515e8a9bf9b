"""The cells of a feature pyramid (§3 works on every FPN level): the levels concatenated, and the levels packed
into one canvas with zero rows/columns between them, so that a layer shared by all levels runs once."""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


def concat_sets(feature_sets: list[dict]) -> OrderedDict:
    """Several feature sets of the same batch (the student's, the instructive), each level concatenated along
    the batch: one head pass serves them all."""
    if len(feature_sets) == 1:
        return OrderedDict(feature_sets[0])
    return OrderedDict((k, torch.cat([fs[k] for fs in feature_sets])) for k in feature_sets[0])


class PyramidLayout:
    """Per cell its level and (column, row) index, levels concatenated; and the canvas the levels pack into.

    Canvas: level 0 (the largest) at the top left, the other levels in a column to its right, one zero row or
    column between any two levels. A 3x3 convolution (padding 1) over the canvas gives each level exactly what
    it gives that level alone with zero padding, as long as the cells between levels are zero when it reads
    them: ``apply`` keeps them zero. Costs ~12% more cells than the levels themselves; saves, per layer, the
    per-level kernels and the per-level gradient sums of the shared weights.
    """

    def __init__(self, sizes: list[tuple[int, int]], device: torch.device):
        self.sizes = [tuple(int(v) for v in s) for s in sizes]
        self.numel = [h * w for h, w in self.sizes]
        level, index = [], []
        for lvl, (h, w) in enumerate(self.sizes):
            rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
            index.append(torch.stack([cols.flatten(), rows.flatten()], 1))
            level.append(torch.full((h * w,), lvl, device=device, dtype=torch.long))
        self.level = torch.cat(level)  # (P,)
        self.index = torch.cat(index)  # (P, 2): column, row
        self.scale = torch.tensor([[w, h, w, h] for h, w in self.sizes], device=device, dtype=torch.float32)
        self.onehot = F.one_hot(self.level, len(self.sizes)).float()  # (P, L)
        self._place_canvas(device)

    def _place_canvas(self, device: torch.device) -> None:
        (h0, w0), rest = self.sizes[0], self.sizes[1:]
        if any(h > h0 or w > w0 for h, w in rest):
            raise ValueError(f"pyramid levels must be ordered largest first, got sizes {self.sizes}")
        origins, x, y = [(0, 0)], w0 + 1, 0
        for h, _ in rest:
            origins.append((y, x))
            y += h + 1
        self.canvas_size = (max(h0, y - 1), x + max((w for _, w in rest), default=-1))
        width = self.canvas_size[1]
        rows, cols = self.index[:, 1], self.index[:, 0]
        origin = torch.tensor(origins, device=device)[self.level]  # (P, 2): row, column of the cell's level
        self.canvas_index = (rows + origin[:, 0]) * width + cols + origin[:, 1]  # (P,) flat canvas position
        cells = self.canvas_size[0] * width
        self.canvas_onehot = torch.zeros(cells, len(self.sizes), device=device).index_copy(
            0, self.canvas_index, self.onehot)  # (Q, L); rows of zeros between levels
        self.on_level = self.canvas_onehot.sum(1).view(1, 1, *self.canvas_size)  # 1 on a level's cell, 0 between
        self.level_numel = torch.tensor(self.numel, device=device, dtype=torch.float32)
        self._means: dict[tuple, torch.Tensor] = {}

    def pack(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """L maps (B, C, h, w) -> one canvas (B, C, Hc, Wc), zero between levels."""
        return self.scatter(torch.cat([m.flatten(2) for m in maps], 2))

    def scatter(self, cells: torch.Tensor) -> torch.Tensor:
        """(B, C, P) in concatenated-level order -> canvas."""
        B, C, _ = cells.shape
        canvas = cells.new_zeros(B, C, self.canvas_size[0] * self.canvas_size[1])
        return canvas.index_copy(2, self.canvas_index, cells).view(B, C, *self.canvas_size)

    def gather(self, canvas: torch.Tensor) -> torch.Tensor:
        """Canvas -> (B, C, P) in concatenated-level order."""
        return canvas.flatten(2).index_select(2, self.canvas_index)

    def unpack(self, canvas: torch.Tensor) -> list[torch.Tensor]:
        """Canvas -> L maps (B, C, h, w)."""
        return [c.unflatten(2, s) for c, s in zip(self.gather(canvas).split(self.numel, 2), self.sizes)]

    def broadcast(self, per_level: torch.Tensor) -> torch.Tensor:
        """(B, L, C) one vector per image and level -> canvas holding it on every cell of that level."""
        B, _, C = per_level.shape
        onehot = self.canvas_onehot.to(per_level.dtype)
        return (per_level.transpose(1, 2) @ onehot.T).view(B, C, *self.canvas_size)

    def normalize(self, canvas: torch.Tensor, per_channel: bool, eps: float = 1e-5) -> torch.Tensor:
        """Zero mean and unit variance per image and level: GroupNorm(1) without affine, or with ``per_channel``
        InstanceNorm without affine; in float32 at least (autocast off), cells between levels come out zero.
        A level of one cell normalises to zeros (InstanceNorm of a 1x1 map, one image per worker)."""
        B, C = canvas.shape[:2]
        dt = torch.float64 if canvas.dtype == torch.float64 else torch.float32
        key = (dt, 1 if per_channel else C)
        if key not in self._means:  # (Q, L): averages a level's cells (and channels) in one product
            self._means[key] = self.canvas_onehot.to(dt) / (self.level_numel.to(dt) * key[1])
        with torch.autocast(canvas.device.type, enabled=False):
            out = _LevelNorm.apply(canvas.reshape(B, C, -1).to(dt), self.canvas_onehot.to(dt), self._means[key],
                                   per_channel, eps)
        return out.view(canvas.shape)

    def mask_between_levels(self, canvas: torch.Tensor) -> torch.Tensor:
        return canvas * self.on_level.to(canvas.dtype)

    def apply(self, layers: nn.Sequential, canvas: torch.Tensor, mask_output: bool = True) -> torch.Tensor:
        """Run convs, ReLUs and GroupNorm(1)s shared by all levels over the canvas, as if per level: each
        GroupNorm normalises per image and level, and a conv's output is zeroed between levels unless a
        GroupNorm (which zeroes them) comes next, or ``mask_output`` is off for the last one (a consumer that
        ignores the cells between levels, like ``normalize``)."""
        x = canvas
        for i, layer in enumerate(layers):
            if isinstance(layer, nn.GroupNorm):
                if layer.num_groups != 1 or layer.affine:
                    raise ValueError("the canvas runs GroupNorm(1) without affine parameters only")
                x = self.normalize(x, per_channel=False, eps=layer.eps)
            elif isinstance(layer, nn.ReLU):
                x = torch.relu(x)  # never in place: the norm before it keeps its output for its gradient
            else:
                x = layer(x)
                following = layers[i + 1] if i + 1 < len(layers) else None
                if isinstance(layer, nn.Conv2d) and not isinstance(following, nn.GroupNorm) and (
                        following is not None or mask_output):
                    x = self.mask_between_levels(x)
        return x


def _level_mean(t: torch.Tensor, means: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """(B, C, Q) -> mean per image (and channel) over each level's cells: (B, C or 1, L)."""
    return (t if per_channel else t.sum(1, keepdim=True)) @ means


class _LevelNorm(torch.autograd.Function):
    """y = (x - mean) / std per image (and channel) and level, with its gradient written out:
    dx = rstd * (dy - mean(dy) - y * mean(dy * y)) per group; a handful of kernels for all levels."""

    @staticmethod
    def forward(ctx, flat, onehot, means, per_channel, eps):
        centred = flat - _level_mean(flat, means, per_channel) @ onehot.T
        rstd = (_level_mean(centred * centred, means, per_channel) + eps).rsqrt() @ onehot.T
        y = centred * rstd  # zero between levels, where rstd is zero
        ctx.save_for_backward(y, rstd, onehot, means)
        ctx.per_channel = per_channel
        return y

    @staticmethod
    def backward(ctx, dy):
        y, rstd, onehot, means = ctx.saved_tensors
        both = _level_mean(torch.cat([dy, dy * y], 1), means, ctx.per_channel) if ctx.per_channel else \
            torch.cat([dy.sum(1, keepdim=True), (dy * y).sum(1, keepdim=True)], 1) @ means  # (B, 2C or 2, L)
        mean_dy, mean_dyy = (both @ onehot.T).chunk(2, dim=1)
        return rstd * (dy - mean_dy - y * mean_dyy), None, None, None, None
