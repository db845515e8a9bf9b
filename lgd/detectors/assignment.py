"""Label assignment of the dense detectors (RetinaNet's IoU matcher, FCOS's centre sampling), batched.

The same rules as torchvision's per-image loops, on ground truth padded to (B, M): computed once per step and
shared by the student's and the instructive features' losses (Eq. 6), which see the same anchors and boxes.
"""
from __future__ import annotations

import torch


def pad_boxes(targets: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image boxes -> (B, M, 4) zero-padded, and (B, M) bool of the real ones."""
    boxes = torch.nn.utils.rnn.pad_sequence([t["boxes"] for t in targets], batch_first=True)
    counts = torch.tensor([len(t["boxes"]) for t in targets], device=boxes.device)
    valid = torch.arange(boxes.shape[1], device=boxes.device) < counts[:, None]
    return boxes, valid


def batched_box_iou(gt: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """(B, M, 4) x (B, A, 4) -> (B, M, A), torchvision's box_iou per image."""
    area_g = (gt[..., 2] - gt[..., 0]) * (gt[..., 3] - gt[..., 1])
    area_a = (anchors[..., 2] - anchors[..., 0]) * (anchors[..., 3] - anchors[..., 1])
    lt = torch.max(gt[:, :, None, :2], anchors[:, None, :, :2])
    rb = torch.min(gt[:, :, None, 2:], anchors[:, None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_g[:, :, None] + area_a[:, None, :] - inter)


def iou_assign(targets: list[dict], anchors: list[torch.Tensor], high: float, low: float,
               allow_low_quality: bool) -> list[torch.Tensor]:
    """RetinaNet's ``Matcher``: per anchor the best ground truth if IoU >= high, -1 below low, -2 between;
    with ``allow_low_quality`` every ground truth also keeps the anchors of its highest IoU (ties included)."""
    gt, valid = pad_boxes(targets)
    a = torch.stack(anchors)
    if gt.shape[1] == 0:
        return list(torch.full(a.shape[:2], -1, dtype=torch.int64, device=a.device).unbind(0))
    iou = batched_box_iou(gt, a).masked_fill(~valid[..., None], -1.0)
    vals, idx = iou.max(dim=1)
    matches = torch.where(vals < low, -1, torch.where(vals < high, -2, idx))
    if allow_low_quality:
        best = iou.max(dim=2, keepdim=True).values
        keep = ((iou == best) & valid[..., None]).any(dim=1)
        matches = torch.where(keep, idx, matches)
    return list(matches.unbind(0))


def centre_sampling_assign(targets: list[dict], anchors: list[torch.Tensor], num_per_level: list[int],
                           radius: float) -> list[torch.Tensor]:
    """FCOS: a point matches the smallest box that contains it, whose centre is within ``radius`` strides,
    and whose size fits the point's level; -1 where none does."""
    gt, valid = pad_boxes(targets)
    a = torch.stack(anchors)
    if gt.shape[1] == 0:
        return list(torch.full(a.shape[:2], -1, dtype=torch.int64, device=a.device).unbind(0))
    centres = (a[..., :2] + a[..., 2:]) / 2  # (B, A, 2)
    sizes = a[..., 2] - a[..., 0]  # (B, A)
    gt_centres = (gt[..., :2] + gt[..., 2:]) / 2  # (B, M, 2)
    match = (centres[:, :, None] - gt_centres[:, None]).abs().amax(dim=3) < radius * sizes[..., None]
    x, y = centres[..., 0:1], centres[..., 1:2]  # (B, A, 1)
    x0, y0, x1, y1 = gt[:, None].unbind(dim=3)  # (B, 1, M)
    dist = torch.stack([x - x0, y - y0, x1 - x, y1 - y], dim=3)  # (B, A, M, 4)
    match &= dist.amin(dim=3) > 0
    pos = torch.arange(a.shape[1], device=a.device)
    lower = torch.where(pos < num_per_level[0], 0.0, sizes * 4)
    upper = torch.where(pos >= a.shape[1] - num_per_level[-1], float("inf"), sizes * 8)
    far = dist.amax(dim=3)
    match &= (far > lower[..., None]) & (far < upper[..., None]) & valid[:, None]
    areas = (gt[..., 2] - gt[..., 0]) * (gt[..., 3] - gt[..., 1])
    vals, idx = (match.to(torch.float32) * (1e8 - areas[:, None])).max(dim=2)
    return list(torch.where(vals < 1e-5, -1, idx).unbind(0))
