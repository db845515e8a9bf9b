"""Label assignment of the dense detectors (RetinaNet's IoU matcher, FCOS's centre sampling, ATSS's adaptive
selection), batched.

The same rules as torchvision's per-image loops, on ground truth padded to (B, M): computed once per step and
shared by the student's and the instructive features' losses (Eq. 6), which see the same anchors and boxes.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


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


def balanced_sample(labels: torch.Tensor, group: torch.Tensor, groups: int, per_group: int,
                    positive_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's ``BalancedPositiveNegativeSampler`` on every group (image) at once: in each group up to
    ``per_group * positive_fraction`` positives (labels >= 1) and then negatives (labels == 0) up to ``per_group``,
    each drawn uniformly at random. ``labels`` and ``group`` are flat; -> (positive, negative) bool masks."""
    pos, neg = labels >= 1, labels == 0
    n_pos = torch.zeros(groups, dtype=torch.int64, device=labels.device).index_add_(0, group, pos.to(torch.int64))
    quota_pos = n_pos.clamp(max=int(per_group * positive_fraction))
    out = []
    for mask, quota in ((pos, quota_pos), (neg, per_group - quota_pos)):  # a random rank within the group
        g = torch.where(mask, group, groups)  # the others sort last, past every group, with quota 0
        order = torch.argsort(g.to(torch.float64) + torch.rand(len(g), dtype=torch.float64, device=g.device))
        gs = g[order]
        rank = torch.arange(len(gs), device=gs.device) - torch.searchsorted(gs, gs)
        chosen = torch.zeros_like(mask)
        chosen[order] = rank < torch.cat([quota, quota.new_zeros(1)])[gs]
        out.append(chosen)
    return out[0], out[1]


def point_box_offsets(points: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """(B, A, 2) points, (B, M, 4) boxes -> (B, A, M, 4) distances to the left, top, right, bottom edges
    (all > 0: the point lies inside the box)."""
    x, y = points[..., 0:1], points[..., 1:2]  # (B, A, 1)
    x0, y0, x1, y1 = gt[:, None].unbind(dim=3)  # (B, 1, M)
    return torch.stack([x - x0, y - y0, x1 - x, y1 - y], dim=3)


def centre_region(anchors: torch.Tensor, gt: torch.Tensor, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FCOS's (and POTO's) spatial prior: (B, A, M) whether an anchor's centre lies inside a box and within
    ``radius`` anchor sizes (strides) of its centre; and the (B, A, M, 4) edge distances."""
    centres = (anchors[..., :2] + anchors[..., 2:]) / 2  # (B, A, 2)
    sizes = anchors[..., 2] - anchors[..., 0]  # (B, A)
    gt_centres = (gt[..., :2] + gt[..., 2:]) / 2  # (B, M, 2)
    match = (centres[:, :, None] - gt_centres[:, None]).abs().amax(dim=3) < radius * sizes[..., None]
    dist = point_box_offsets(centres, gt)
    return match & (dist.amin(dim=3) > 0), dist


def adaptive_select(rank: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor, num_per_level: list[int],
                    topk: int, largest: bool) -> torch.Tensor:
    """ATSS's selection on (B, M, A) scores: per box and level the ``topk`` anchors best by ``rank`` are
    candidates; those whose ``value`` reaches the candidates' mean + std, and are ``allowed``, are positives;
    an anchor positive for several boxes takes the one of highest ``value``. -> (B, A) box index, -1 for none."""
    if value.shape[1] == 0:
        return torch.full((value.shape[0], value.shape[2]), -1, dtype=torch.int64, device=value.device)
    candidates = []
    start = 0
    for n in num_per_level:  # a handful of levels; images and boxes stay batched
        k = min(topk, n)
        candidates.append(rank[..., start:start + n].topk(k, dim=2, largest=largest).indices + start)
        start += n
    cand = torch.cat(candidates, dim=2)  # (B, M, C)
    cand_value = value.gather(2, cand)
    threshold = cand_value.mean(dim=2, keepdim=True) + cand_value.std(dim=2, keepdim=True)
    chosen = torch.zeros_like(allowed).scatter_(2, cand, True) & allowed & (value >= threshold)
    idx = torch.where(chosen, value, float("-inf")).argmax(dim=1)
    return torch.where(chosen.any(dim=1), idx, -1)


def atss_assign(targets: list[dict], anchors: list[torch.Tensor], num_per_level: list[int], topk: int,
                anchor_scale: float) -> list[torch.Tensor]:
    """ATSS: per box and level the ``topk`` points nearest its centre are candidates; a candidate whose IoU
    (of a square anchor ``anchor_scale`` strides wide at the point) reaches the candidates' mean + std and
    whose point lies inside the box is positive; -1 where none."""
    gt, valid = pad_boxes(targets)
    a = torch.stack(anchors)
    if gt.shape[1] == 0:
        return list(torch.full(a.shape[:2], -1, dtype=torch.int64, device=a.device).unbind(0))
    centres = (a[..., :2] + a[..., 2:]) / 2  # (B, A, 2)
    half = (a[..., 2:] - a[..., :2]) * (anchor_scale / 2)
    iou = batched_box_iou(gt, torch.cat([centres - half, centres + half], dim=2))  # (B, M, A)
    distance = torch.cdist(((gt[..., :2] + gt[..., 2:]) / 2).float(), centres.float())  # (B, M, A)
    inside = point_box_offsets(centres, gt).amin(dim=3).transpose(1, 2) > 0  # (B, M, A)
    matched = adaptive_select(distance, iou, inside & valid[..., None], num_per_level, topk, largest=False)
    return list(matched.unbind(0))


def centre_sampling_assign(targets: list[dict], anchors: list[torch.Tensor], num_per_level: list[int],
                           radius: float) -> list[torch.Tensor]:
    """FCOS: a point matches the smallest box that contains it, whose centre is within ``radius`` strides,
    and whose size fits the point's level; -1 where none does."""
    gt, valid = pad_boxes(targets)
    a = torch.stack(anchors)
    if gt.shape[1] == 0:
        return list(torch.full(a.shape[:2], -1, dtype=torch.int64, device=a.device).unbind(0))
    sizes = a[..., 2] - a[..., 0]  # (B, A)
    match, dist = centre_region(a, gt, radius)
    pos = torch.arange(a.shape[1], device=a.device)
    lower = torch.where(pos < num_per_level[0], 0.0, sizes * 4)
    upper = torch.where(pos >= a.shape[1] - num_per_level[-1], float("inf"), sizes * 8)
    far = dist.amax(dim=3)
    match &= (far > lower[..., None]) & (far < upper[..., None]) & valid[:, None]
    areas = (gt[..., 2] - gt[..., 0]) * (gt[..., 3] - gt[..., 1])
    vals, idx = (match.to(torch.float32) * (1e8 - areas[:, None])).max(dim=2)
    return list(torch.where(vals < 1e-5, -1, idx).unbind(0))


def hungarian_assign(quality: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """One-to-one assignment maximising the summed (B, M, A) ``quality`` of each image's real boxes (``valid``
    (B, M)): SciPy's ``linear_sum_assignment`` per image, on one host copy. -> (B, A) box index, -1 for none.
    Every box gets an anchor (where A >= M), as in DeFCN, even one its spatial prior ruled out (quality -1)."""
    q = quality.detach().float().cpu().numpy()
    counts = valid.sum(dim=1).tolist()
    matched = np.full((q.shape[0], q.shape[2]), -1, dtype=np.int64)
    for i, m in enumerate(counts):  # the matcher is sequential per image; everything around it is batched
        rows, cols = linear_sum_assignment(q[i, :m], maximize=True)
        matched[i, cols] = rows
    return torch.from_numpy(matched).to(quality.device)
