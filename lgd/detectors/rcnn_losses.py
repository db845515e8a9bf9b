"""Faster / Mask R-CNN training losses, batched over images and feature sets: torchvision's rules, run once.

torchvision's RPN and RoI heads loop over the images of a batch (anchor matching, sampling, NMS, proposal matching,
mask targets) and run once per call; LGD needs them on two feature sets (the student's and the instructive ones,
Eq. 6). Here every feature set goes through the RPN head, the RoI pooling and the box and mask heads together
(concatenated along the batch); anchors are matched to the ground truth once and shared; each set keeps its own
proposals, samples and losses, as two separate torchvision calls would. Prediction stays torchvision's own.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import batched_nms, nms, roi_align
from torchvision.ops.poolers import MultiScaleRoIAlign, _setup_scales

from lgd.detectors.assignment import balanced_sample, batched_box_iou, iou_assign, pad_boxes
from lgd.pyramid import concat_sets


def _per_set_mean(values: torch.Tensor, set_idx: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(S,) sums of ``values`` by set over ``counts`` (a set with nothing counted: 0)."""
    sums = values.new_zeros(counts.shape[0]).index_add_(0, set_idx, values)
    return sums / counts.clamp(min=1)


def grouped_nms(boxes: torch.Tensor, scores: torch.Tensor, image: torch.Tensor, level: torch.Tensor,
                levels: int, threshold: float, per_level: bool | None = None) -> torch.Tensor:
    """NMS within each (image, level): the kept indices by decreasing score, as ``torchvision.ops.batched_nms``.
    By default on a CPU, where the arithmetic counts, one NMS per (image, level) (torchvision's own loop); on a
    GPU, where the launches count, ``per_level``: one per level over every image (the images' boxes moved apart)."""
    if per_level is None:
        per_level = boxes.device.type != "cpu"
    if not per_level or boxes.numel() == 0:
        return batched_nms(boxes, scores, image * levels + level, threshold)
    offsets = image.to(boxes) * (boxes.max() + 1)
    keep = []
    for lvl in range(levels):
        idx = torch.where(level == lvl)[0]
        keep.append(idx[nms(boxes[idx] + offsets[idx, None], scores[idx], threshold)])
    keep = torch.cat(keep)
    return keep[scores[keep].argsort(descending=True)]


def _first_per_group(groups: torch.Tensor, order: torch.Tensor, n: int) -> torch.Tensor:
    """Of the indices ``order`` (by decreasing score), the first ``n`` of every group, grouped."""
    order = order[torch.sort(groups[order], stable=True).indices]
    g = groups[order]
    rank = torch.arange(len(g), device=g.device) - torch.searchsorted(g, g)
    return order[rank < n]


def filter_proposals(rpn: nn.Module, proposals: torch.Tensor, objectness: torch.Tensor, per_level: list[int],
                     image_sizes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's ``RegionProposalNetwork.filter_proposals`` on (N, A, 4) proposals of N images at once: per
    level the top ``pre_nms_top_n`` by objectness, clipped to the image, small and low-scoring ones dropped, NMS per
    image and level, the best ``post_nms_top_n`` per image. -> (K, 4) boxes, (K,) their image."""
    n = proposals.shape[0]
    starts = [sum(per_level[:i]) for i in range(len(per_level))]
    top = torch.cat([objectness[:, s:s + c].topk(min(rpn.pre_nms_top_n(), c), dim=1).indices + s
                     for s, c in zip(starts, per_level)], dim=1)  # (N, T): a handful of levels
    level = torch.cat([torch.full((c,), i, device=top.device) for i, c in enumerate(per_level)])[top]
    boxes = proposals.gather(1, top[..., None].expand(-1, -1, 4))
    scores = objectness.gather(1, top).sigmoid()
    hw = torch.tensor(image_sizes, dtype=boxes.dtype, device=boxes.device)  # (N, 2): height, width
    boxes = torch.minimum(boxes.clamp(min=0), hw.flip(1).repeat(1, 2)[:, None])
    wh = boxes[..., 2:] - boxes[..., :2]
    keep = (wh >= rpn.min_size).all(dim=2) & (scores >= rpn.score_thresh)
    image = torch.arange(n, device=boxes.device)[:, None].expand_as(scores)
    boxes, scores, image, level = boxes[keep], scores[keep], image[keep], level[keep]
    kept = grouped_nms(boxes, scores, image, level, len(per_level), rpn.nms_thresh)
    kept = _first_per_group(image, kept, rpn.post_nms_top_n())
    return boxes[kept], image[kept]


def pool(pooler: MultiScaleRoIAlign, features: OrderedDict, boxes: torch.Tensor, image: torch.Tensor,
         image_sizes: list[tuple[int, int]]) -> torch.Tensor:
    """``MultiScaleRoIAlign`` on (K, 4) boxes given with their image index (no per-image lists)."""
    x = [features[k] for k in pooler.featmap_names]
    if pooler.scales is None or pooler.map_levels is None:
        pooler.scales, pooler.map_levels = _setup_scales(x, image_sizes, pooler.canonical_scale,
                                                         pooler.canonical_level)
    rois = torch.cat([image[:, None].to(boxes), boxes], dim=1)
    kw = {"output_size": pooler.output_size, "sampling_ratio": pooler.sampling_ratio}
    if len(x) == 1:
        return roi_align(x[0], rois, spatial_scale=pooler.scales[0], **kw)
    levels = pooler.map_levels([boxes])
    out = x[0].new_zeros((len(rois), x[0].shape[1], *pooler.output_size))
    for lvl, (feat, scale) in enumerate(zip(x, pooler.scales)):  # one roi_align per FPN level
        idx = torch.where(levels == lvl)[0]
        out[idx] = roi_align(feat, rois[idx], spatial_scale=scale, **kw).to(out.dtype)
    return out


def rpn_losses(rpn: nn.Module, features: OrderedDict, images: ImageList, targets: list[dict], sets: int):
    """The RPN on ``sets`` feature sets concatenated along the batch: per set (objectness, box) losses, and every
    image's proposals as (K, 4) boxes with (K,) their index in the concatenated batch."""
    B = len(targets)
    levels = list(features.values())
    objectness, deltas = rpn.head(levels)
    per_level = [o.shape[1] * o.shape[2] * o.shape[3] for o in objectness]
    anchors = rpn.anchor_generator(images, [x[:B] for x in levels])[0]  # the same for every image of the batch
    A = anchors.shape[0]
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)  # (S*B*A, 1), (S*B*A, 4)
    decoded = rpn.box_coder.decode_single(deltas.detach().float(), anchors.repeat(sets * B, 1)).view(sets * B, A, 4)
    boxes, image = filter_proposals(rpn, decoded, objectness.detach().view(sets * B, A), per_level,
                                    list(images.image_sizes) * sets)

    m = rpn.proposal_matcher  # anchors matched once, shared by every set
    matched = torch.stack(iou_assign(targets, [anchors] * B, m.high_threshold, m.low_threshold, True))  # (B, A)
    labels = torch.where(matched >= 0, 1, torch.where(matched == -1, 0, -1)).repeat(sets, 1).flatten()
    group = torch.arange(sets * B, device=labels.device).repeat_interleave(A)
    s = rpn.fg_bg_sampler
    pos, neg = balanced_sample(labels, group, sets * B, s.batch_size_per_image, s.positive_fraction)
    sampled = pos | neg
    set_idx = group // B
    counts = sampled.view(sets, -1).sum(dim=1)

    gt, _ = pad_boxes(targets)
    fg = matched >= 0
    if gt.shape[1]:
        own = gt.gather(1, matched.clamp(min=0)[..., None].expand(-1, -1, 4))
        own = torch.where(fg[..., None], own, anchors)  # background: encoded as zero, never used
    else:
        own = anchors.expand(B, -1, -1)
    reg_targets = rpn.box_coder.encode_single(own.reshape(-1, 4), anchors.repeat(B, 1)).repeat(sets, 1)
    box = F.smooth_l1_loss(deltas, reg_targets, beta=1 / 9, reduction="none").sum(dim=1)
    obj = F.binary_cross_entropy_with_logits(objectness.flatten(), (labels == 1).to(objectness.dtype),
                                             reduction="none")
    zero = obj.new_zeros(())
    box_loss = _per_set_mean(torch.where(pos, box, zero), set_idx, counts)
    obj_loss = _per_set_mean(torch.where(sampled, obj, zero), set_idx, counts)
    return obj_loss, box_loss, boxes, image


def roi_losses(roi_heads: nn.Module, features: OrderedDict, proposals: torch.Tensor, image: torch.Tensor,
               images: ImageList, targets: list[dict], sets: int) -> dict[str, torch.Tensor]:
    """torchvision's ``RoIHeads`` training losses (box; mask where it has a mask head) for ``sets`` sets of
    proposals at once: ground truth added to each image's proposals, matched, sampled per image, pooled and
    headed together, each loss averaged within its set. -> {name: (S,) losses}."""
    B = len(targets)
    gt, valid = pad_boxes(targets)
    gt_labels = torch.nn.utils.rnn.pad_sequence([t["labels"] for t in targets], batch_first=True)
    gt_image = torch.arange(B, device=gt.device)[:, None].expand_as(valid)[valid]
    gt_image = torch.cat([gt_image + s * B for s in range(sets)])
    boxes = torch.cat([proposals, gt[valid].repeat(sets, 1).to(proposals)])
    image = torch.cat([image, gt_image])
    own = image % B  # the image whose ground truth a proposal is matched to
    if gt.shape[1]:
        iou = batched_box_iou(gt[own], boxes[:, None])[..., 0].masked_fill(~valid[own], -1.0)  # (K, M)
        best, matched = iou.max(dim=1)
    else:
        best, matched = boxes.new_full((len(boxes),), -1.0), torch.zeros(len(boxes), dtype=torch.int64,
                                                                         device=boxes.device)
    m = roi_heads.proposal_matcher
    labels = torch.where(best < m.low_threshold, 0,
                         torch.where(best < m.high_threshold, -1, gt_labels[own, matched] if gt.shape[1] else 0))
    s = roi_heads.fg_bg_sampler
    pos, neg = balanced_sample(labels, image, sets * B, s.batch_size_per_image, s.positive_fraction)
    keep = torch.where(pos | neg)[0]
    boxes, image, own, labels, matched = boxes[keep], image[keep], own[keep], labels[keep], matched[keep]
    set_idx = image // B
    counts = torch.bincount(set_idx, minlength=sets)
    sizes = list(images.image_sizes) * sets

    x = roi_heads.box_head(pool(roi_heads.box_roi_pool, features, boxes, image, sizes))
    class_logits, box_regression = roi_heads.box_predictor(x)
    matched_boxes = gt[own, matched] if gt.shape[1] else boxes
    reg_targets = roi_heads.box_coder.encode_single(torch.where((labels > 0)[:, None], matched_boxes, boxes), boxes)
    box_pred = box_regression.reshape(len(labels), -1, 4)[torch.arange(len(labels), device=labels.device),
                                                          labels.clamp(min=0)]
    box = F.smooth_l1_loss(box_pred, reg_targets, beta=1 / 9, reduction="none").sum(dim=1)
    out = {"loss_classifier": _per_set_mean(F.cross_entropy(class_logits, labels, reduction="none"), set_idx, counts),
           "loss_box_reg": _per_set_mean(torch.where(labels > 0, box, box.new_zeros(())), set_idx, counts)}
    if roi_heads.has_mask():
        out["loss_mask"] = _mask_losses(roi_heads, features, boxes, image, own, labels, matched, targets, sizes,
                                        sets)
    return out


def _gt_masks(targets: list[dict]) -> torch.Tensor:
    """Every image's instance masks as one (G, H, W) float tensor; masks of smaller images are padded by repeating
    their last row and column, which leaves ``roi_align`` over boxes inside each image unchanged."""
    masks = [t["masks"] for t in targets if len(t["masks"])]
    if not masks:
        return targets[0]["masks"].new_zeros((0, 1, 1), dtype=torch.float32)
    h = max(m.shape[-2] for m in masks)
    w = max(m.shape[-1] for m in masks)
    masks = [m.float() if m.shape[-2:] == (h, w) else
             F.pad(m.float()[None], (0, w - m.shape[-1], 0, h - m.shape[-2]), mode="replicate")[0] for m in masks]
    return torch.cat(masks)


def _mask_losses(roi_heads, features, boxes, image, own, labels, matched, targets, sizes, sets) -> torch.Tensor:
    """torchvision's ``maskrcnn_loss`` on the positive samples of every set at once (one mask-target roi_align)."""
    B = len(targets)
    pos = torch.where(labels > 0)[0]
    boxes, image, own, labels, matched = boxes[pos], image[pos], own[pos], labels[pos], matched[pos]
    x = roi_heads.mask_head(pool(roi_heads.mask_roi_pool, features, boxes, image, sizes))
    logits = roi_heads.mask_predictor(x)  # (P, classes, M, M)
    size = logits.shape[-1]
    first = torch.cumsum(torch.tensor([0] + [len(t["labels"]) for t in targets[:-1]], device=boxes.device), 0)
    rois = torch.cat([(first[own] + matched)[:, None].to(boxes), boxes], dim=1)
    mask_targets = roi_align(_gt_masks(targets)[:, None].to(boxes), rois, (size, size), 1.0)[:, 0]
    picked = logits[torch.arange(len(labels), device=labels.device), labels]
    per_roi = F.binary_cross_entropy_with_logits(picked, mask_targets, reduction="none").mean(dim=(1, 2))
    set_idx = image // B
    counts = torch.bincount(set_idx, minlength=sets)
    return _per_set_mean(per_roi, set_idx, counts) + logits.sum() * 0  # no positives: 0, the graph kept whole


def rcnn_losses(feature_sets: list[OrderedDict], images: ImageList, targets: list[dict],
                heads: nn.ModuleDict) -> list[dict[str, torch.Tensor]]:
    """One loss dict per feature set, the keys of torchvision's ``GeneralizedRCNN`` in training."""
    sets = len(feature_sets)
    features = concat_sets(feature_sets)
    obj, rpn_box, proposals, image = rpn_losses(heads["rpn"], features, images, targets, sets)
    roi = roi_losses(heads["roi_heads"], features, proposals, image, images, targets, sets)
    per_term = {"loss_objectness": obj, "loss_rpn_box_reg": rpn_box, **roi}
    return [{k: v[i] for k, v in per_term.items()} for i in range(sets)]
