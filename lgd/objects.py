"""The batch's objects packed once per step (§3.1): padded boxes/labels, the context object, masks per level.

Every LGD module reads this one representation; nothing loops over images or objects.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from lgd.pyramid import PyramidLayout

MASK_CODE_SIZE = 7  # Table 10: each object's mask inside its box, 7 x 7, appended to its descriptor (the reference's)


def descriptor_size(num_classes: int, with_mask_codes: bool = False) -> int:
    """Length of an object's descriptor: box (4), one-hot class (K), and the mask code (49) with Table 10's."""
    return 4 + num_classes + (MASK_CODE_SIZE ** 2 if with_mask_codes else 0)


@dataclass
class PackedObjects:
    boxes: torch.Tensor  # (B, N, 4) x1y1x2y2 in input pixels, clamped to the padded batch; zeros where invalid
    labels: torch.Tensor  # (B, N) contiguous labels 1..K; 0 for the context object and padding
    valid: torch.Tensor  # (B, N) bool: a real object or the context object
    is_context: torch.Tensor  # (B, N) bool
    pad_size: tuple[int, int]  # (H, W) of the padded input batch
    instance_masks: Optional[torch.Tensor] = None  # (B, N, H, W) uint8 at input resolution, or None
    empty_images: int = 0  # images with neither an object nor the context object (known without a host sync)
    # (B, N, 49) in {0, 1}: each real object's instance mask cropped to its box at 7 x 7, ones for the context
    # object (Table 10, the reference's LOAD_LABELMAP descriptor); None without instance masks
    mask_codes: Optional[torch.Tensor] = None

    @property
    def objects(self) -> torch.Tensor:
        """(B, N) bool: the real objects (not the context object, not padding)."""
        return self.valid & ~self.is_context

    def descriptors(self, num_classes: int, with_mask_codes: bool = False) -> torch.Tensor:
        """§3.1(1): box / padded size and one-hot class (and, Table 10, the 7 x 7 mask code), mapped from [0, 1]
        to [-1, 1]; (B, N, 4 + K [+ 49])."""
        h, w = self.pad_size
        scale = self.boxes.new_tensor([w, h, w, h])
        onehot = F.one_hot(self.labels, num_classes + 1)[..., 1:].to(self.boxes.dtype)  # context -> zeros
        parts = [self.boxes / scale, onehot]
        if with_mask_codes:
            if self.mask_codes is None:
                raise ValueError("mask descriptors need the objects' instance masks (pack_objects with_masks)")
            parts.append(self.mask_codes.to(self.boxes.dtype))
        d = torch.cat(parts, dim=-1) * 2.0 - 1.0
        return d * self.valid[..., None]

    def level_masks(self, size: tuple[int, int], cover_touched_cells: bool = False) -> torch.Tensor:
        """Object masks on one feature level of ``size`` (h, w); (B, N, h*w) float. See ``pyramid_masks``."""
        return self.pyramid_masks(PyramidLayout([size], self.boxes.device), cover_touched_cells)

    def pyramid_masks(self, layout: PyramidLayout, cover_touched_cells: bool = False) -> torch.Tensor:
        """Object masks on every level of ``layout`` at once, levels concatenated: (B, N, P) float.

        Reference rule: the box, scaled per axis by the level's size over the padded input's, marks cell
        (row j, column i) when |centre - index| / extent <= 0.5 on both axes, i.e. x1' <= i <= x2' and
        y1' <= j <= y2'; a box smaller than a cell can mark none. ``cover_touched_cells`` marks every cell
        the box touches instead, at least one. With instance masks (Table 10) the real objects use those,
        down-sampled nearest-neighbour; the context object keeps its box.
        """
        H, W = self.pad_size
        dt = self.boxes.dtype
        b = self.boxes[:, :, None, :] * (layout.scale.to(dt) / self.boxes.new_tensor([W, H, W, H]))  # (B, N, L, 4)
        if cover_touched_cells:
            lo = b[..., :2].floor()
            hi = torch.maximum(b[..., 2:].ceil(), lo + 1)
            lo, hi = lo[:, :, layout.level], hi[:, :, layout.level]  # (B, N, P, 2) as (x, y)
            idx = layout.index.to(dt)
            inside = ((idx >= lo) & (idx < hi)).all(-1)
        else:  # written as the reference writes it, so that rounding at cell borders agrees too
            centre = (b[..., :2] + b[..., 2:]) * 0.5
            extent = b[..., 2:] - b[..., :2]
            ce = torch.cat([centre, extent], -1)[:, :, layout.level]  # (B, N, P, 4)
            inside = ((ce[..., :2] - layout.index.to(dt)).abs() / ce[..., 2:] <= 0.5).all(-1)
        if self.instance_masks is not None:
            B, N = self.valid.shape
            flat = self.instance_masks.reshape(B * N, 1, H, W).float()
            seg = torch.cat([F.interpolate(flat, size=s, mode="nearest").flatten(1) for s in layout.sizes], 1)
            inside = torch.where(self.is_context[..., None], inside, seg.reshape(B, N, -1) > 0)
        return (inside & self.valid[..., None]).to(dt)


def pack_objects(targets: list[dict], image_sizes: list[tuple[int, int]], pad_size: tuple[int, int],
                 use_context: bool, with_masks: bool = False, context_box_per_image: bool = False) -> PackedObjects:
    """Pack per-image targets (after the detector's resize) into padded tensors, context object in slot 0.

    As in the reference, every box is clamped to [0, W-1] x [0, H-1] of the padded batch, and the context
    object's box is the whole padded batch; ``context_box_per_image`` makes it each image's own extent.
    """
    device = targets[0]["boxes"].device
    lens = [len(t["boxes"]) for t in targets]  # shapes: known on the host, no sync
    counts = torch.tensor(lens, device=device)
    boxes = torch.cat([t["boxes"] for t in targets])
    labels = torch.cat([t["labels"] for t in targets])
    B, ctx = len(targets), int(use_context)
    N = max(lens, default=0) + ctx
    img = torch.repeat_interleave(torch.arange(B, device=device), counts, output_size=sum(lens))
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(boxes), device=device) - starts[img] + ctx
    P = torch.zeros(B, N, 4, device=device, dtype=boxes.dtype)
    L = torch.zeros(B, N, dtype=torch.int64, device=device)
    V = torch.zeros(B, N, dtype=torch.bool, device=device)
    P[img, slot] = boxes
    L[img, slot] = labels
    V[img, slot] = True
    C = torch.zeros(B, N, dtype=torch.bool, device=device)
    H, W = int(pad_size[0]), int(pad_size[1])
    if use_context:
        hw = torch.tensor(image_sizes if context_box_per_image else [(H, W)] * B, device=device, dtype=boxes.dtype)
        P[:, 0, 2], P[:, 0, 3] = hw[:, 1], hw[:, 0]
        V[:, 0] = True
        C[:, 0] = True
    P = torch.minimum(P.clamp(min=0), P.new_tensor([W - 1, H - 1, W - 1, H - 1]))
    masks = codes = None
    if with_masks:
        # masks come resized per image; padding them (and cropping each to its box within its own image, as the
        # reference crops its per-image masks) is the one step that needs the per-image list
        flat = torch.cat([F.pad(t["masks"].to(torch.uint8), (0, W - t["masks"].shape[-1], 0, H - t["masks"].shape[-2]))
                          for t in targets])
        masks = torch.zeros(B, N, H, W, dtype=torch.uint8, device=device)
        masks[img, slot] = flat
        codes = torch.zeros(B, N, MASK_CODE_SIZE ** 2, dtype=torch.uint8, device=device)
        codes[img, slot] = torch.cat([mask_codes(t["masks"], t["boxes"]) for t in targets])
        if use_context:
            codes[:, 0] = 1
    return PackedObjects(P, L, V, C, (H, W), masks, empty_images=0 if use_context else lens.count(0),
                         mask_codes=codes)


def mask_codes(masks: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Each of one image's instance masks (n, h, w) inside its box (n, 4; not clamped), at 7 x 7: (n, 49) uint8.
    detectron2's ``BitMasks.crop_and_resize``, which the reference's Table 10 descriptor uses: aligned RoIAlign
    (sampling points at pixel centres, adaptive sampling), then >= 0.5."""
    dt = boxes.dtype if boxes.is_floating_point() else torch.float32
    rois = torch.cat([torch.arange(len(boxes), device=boxes.device, dtype=dt)[:, None], boxes.to(dt)], dim=1)
    crop = roi_align(masks[:, None].to(dt), rois, MASK_CODE_SIZE, spatial_scale=1.0, sampling_ratio=0, aligned=True)
    return (crop >= 0.5).flatten(1).to(torch.uint8)
