"""Random horizontal flip of training images with their boxes and masks (detectron2's default mapper: RandomFlip,
p 0.5, after the resize; flipping before the resize is the same image, since the resize treats both sides alike)."""
from __future__ import annotations

import torch


def hflip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    """``image`` (C, H, W) mirrored left-right; boxes x1y1x2y2 become (W - x2, y1, W - x1, y2), masks mirrored."""
    width = image.shape[-1]
    out = dict(target)
    boxes = target["boxes"]
    out["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
    if "masks" in target:
        out["masks"] = target["masks"].flip(-1)
    return image.flip(-1), out


class FlippedSubset(torch.utils.data.Dataset):
    """The samples ``indices`` of ``dataset``, the i-th mirrored where ``flips[i]`` (drawn by the caller, so that
    the flips, like the order, depend on the seed and epoch only and a resumed trial sees the same ones)."""

    def __init__(self, dataset, indices: list[int], flips: list[bool]):
        self.dataset, self.indices, self.flips = dataset, indices, flips

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        image, target = self.dataset[self.indices[i]]
        if image is None or not self.flips[i]:  # an image that did not decode passes through to be counted
            return image, target
        return hflip(image, target)
