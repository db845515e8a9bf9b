"""The batch's objects packed once per step (§3.1): padded boxes/labels, the context object, masks per level.

Every LGD module reads this one representation; nothing loops over images or objects.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass
class PackedObjects:
    boxes: torch.Tensor  # (B, N, 4) x1y1x2y2 in input pixels; zeros where invalid
    labels: torch.Tensor  # (B, N) contiguous labels 1..K; 0 for the context object and padding
    valid: torch.Tensor  # (B, N) bool: a real object or the context object
    is_context: torch.Tensor  # (B, N) bool
    pad_size: tuple[int, int]  # (H, W) of the padded input batch
    instance_masks: Optional[torch.Tensor] = None  # (B, N, H, W) uint8 at input resolution, or None

    @property
    def objects(self) -> torch.Tensor:
        """(B, N) bool: the real objects (not the context object, not padding)."""
        return self.valid & ~self.is_context

    def descriptors(self, num_classes: int) -> torch.Tensor:
        """§3.1(1): box / padded size and one-hot class, mapped from [0, 1] to [-1, 1]; (B, N, 4 + K)."""
        h, w = self.pad_size
        scale = self.boxes.new_tensor([w, h, w, h])
        onehot = F.one_hot(self.labels, num_classes + 1)[..., 1:].to(self.boxes.dtype)  # context -> zeros
        d = torch.cat([self.boxes / scale, onehot], dim=-1) * 2.0 - 1.0
        return d * self.valid[..., None]

    def level_masks(self, size: tuple[int, int]) -> torch.Tensor:
        """Object masks down-scaled to a feature level of ``size`` (h, w); (B, N, h*w) float.

        Box masks cover every cell the box touches (at least one cell); with instance masks the real
        objects use those instead (Table 10), the context object keeps its whole-image box.
        """
        h, w = size
        H, W = self.pad_size
        b = self.boxes * self.boxes.new_tensor([w / W, h / H, w / W, h / H])
        x1, y1 = b[..., 0].floor(), b[..., 1].floor()
        x2 = torch.maximum(b[..., 2].ceil(), x1 + 1)
        y2 = torch.maximum(b[..., 3].ceil(), y1 + 1)
        xs = torch.arange(w, device=b.device, dtype=b.dtype)
        ys = torch.arange(h, device=b.device, dtype=b.dtype)
        in_x = (xs >= x1[..., None]) & (xs < x2[..., None])  # (B, N, w)
        in_y = (ys >= y1[..., None]) & (ys < y2[..., None])  # (B, N, h)
        m = in_y[..., :, None] & in_x[..., None, :]  # (B, N, h, w)
        if self.instance_masks is not None:
            B, N = self.valid.shape
            seg = F.adaptive_avg_pool2d(self.instance_masks.reshape(B * N, 1, H, W).float(), (h, w))
            seg = seg.reshape(B, N, h, w) > 0.25
            m = torch.where(self.is_context[..., None, None], m, seg)
        m = m & self.valid[..., None, None]
        return m.flatten(2).to(self.boxes.dtype)


def pack_objects(targets: list[dict], image_sizes: list[tuple[int, int]], pad_size: tuple[int, int],
                 use_context: bool, with_masks: bool = False) -> PackedObjects:
    """Pack per-image targets (after the detector's resize) into padded tensors, context object in slot 0."""
    device = targets[0]["boxes"].device
    counts = torch.tensor([len(t["boxes"]) for t in targets], device=device)
    boxes = torch.cat([t["boxes"] for t in targets])
    labels = torch.cat([t["labels"] for t in targets])
    B, ctx = len(targets), int(use_context)
    N = int(counts.max()) + ctx if len(counts) else ctx
    img = torch.repeat_interleave(torch.arange(B, device=device), counts)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(boxes), device=device) - starts[img] + ctx
    P = torch.zeros(B, N, 4, device=device, dtype=boxes.dtype)
    L = torch.zeros(B, N, dtype=torch.int64, device=device)
    V = torch.zeros(B, N, dtype=torch.bool, device=device)
    P[img, slot] = boxes
    L[img, slot] = labels
    V[img, slot] = True
    C = torch.zeros(B, N, dtype=torch.bool, device=device)
    if use_context:
        hw = torch.tensor(image_sizes, device=device, dtype=boxes.dtype)  # (B, 2) as (h, w)
        P[:, 0, 2], P[:, 0, 3] = hw[:, 1], hw[:, 0]
        V[:, 0] = True
        C[:, 0] = True
    masks = None
    if with_masks:
        H, W = pad_size
        # masks come resized per image; padding them is the one step that needs the per-image list
        flat = torch.cat([F.pad(t["masks"].to(torch.uint8), (0, W - t["masks"].shape[-1], 0, H - t["masks"].shape[-2]))
                          for t in targets])
        masks = torch.zeros(B, N, H, W, dtype=torch.uint8, device=device)
        masks[img, slot] = flat
    return PackedObjects(P, L, V, C, (int(pad_size[0]), int(pad_size[1])), masks)
