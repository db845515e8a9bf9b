"""RetinaNet's and FCOS's losses, batched over images and feature sets.

torchvision computes them image by image (and FCOS's with a host sync for its foreground count); here every
image of every feature set of the step (the student's and the instructive features', Eq. 6) is one tensor
operation. RetinaNet's normalisation is torchvision's: per image by its foreground count (at least 1), averaged
over the set's images. FCOS's (and ATSS's, POTO's) is cvpods': by the batch's foreground count (and the box
loss by the batch's centerness-target sum), each averaged over the workers (``mean_over_workers``), at least 1.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from lgd.detectors.assignment import pad_boxes

BATCHED_BOX_LOSSES = ("l1", "giou")


def matched_targets(targets: list[dict], matched: list[torch.Tensor], anchors: list[torch.Tensor], sets: int):
    """Per anchor of every set's images: matched index (S * B, A), foreground mask, the label and box of its
    ground truth (background anchors: label 0 and their own box, so that no loss term sees a degenerate box)."""
    B = len(targets)
    m = torch.stack(matched).repeat(sets, 1)
    fg = m >= 0
    boxes, _ = pad_boxes(targets)
    labels = torch.nn.utils.rnn.pad_sequence([t["labels"] for t in targets], batch_first=True)
    if labels.shape[1] == 0:  # no box in the whole batch: nothing is foreground
        labels, boxes = labels.new_zeros(B, 1), boxes.new_zeros(B, 1, 4)
    at = m.clamp(min=0)
    a = torch.stack(anchors).repeat(sets, 1, 1)
    gt_labels = labels.repeat(sets, 1).gather(1, at) * fg
    gt_boxes = torch.where(fg[..., None], boxes.repeat(sets, 1, 1).gather(1, at[..., None].expand(-1, -1, 4)), a)
    return m, fg, gt_labels, gt_boxes, a


def mean_over_workers(x: torch.Tensor) -> torch.Tensor:
    """``x`` averaged over the workers of the default process group (all_reduce(sum) / world size), as cvpods'
    ``reduce_sum(num_foreground) / world_size``; ``x`` itself where no group is initialised. A collective: every
    worker calls it the same number of times per step (the loss functions make one call each)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


def onehot_targets(labels: torch.Tensor, fg: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, logits.shape[-1]).to(logits.dtype) * fg[..., None]


def fcos_losses(head, targets: list[dict], out: dict[str, torch.Tensor], anchors: list[torch.Tensor],
                matched: list[torch.Tensor], sets: int, box_weight: float = 1.0,
                centerness_weighted_box: bool = True) -> list[dict[str, torch.Tensor]]:
    """FCOS (and ATSS): focal classification and centerness BCE over the foreground count; GIoU box loss, by
    default (cvpods) each foreground term weighted by its centerness target and the sum divided by the centerness
    targets' sum, ``centerness_weighted_box=False``: unweighted over the foreground count (torchvision's FCOS).
    Both normalisers are averaged over the workers, then at least 1 (cvpods' ``max(1.0, ...)``); every set of
    ``out`` has the same ground truth and assignment, hence the same normalisers. ``box_weight`` scales the box
    loss (ATSS: 2)."""
    B = len(targets)
    _, fg, labels, gt, a = matched_targets(targets, matched, anchors, sets)
    logits, reg = out["cls_logits"], out["bbox_regression"]
    cls = sigmoid_focal_loss(logits, onehot_targets(labels, fg, logits), reduction="none").sum(dim=(1, 2))
    pred = head.box_coder.decode(reg, a)
    box = generalized_box_iou_loss(pred.flatten(0, 1), gt.flatten(0, 1), reduction="none").view(fg.shape)
    enc = head.box_coder.encode(a, gt)
    lr, tb = enc[..., [0, 2]], enc[..., [1, 3]]
    centre = torch.sqrt((lr.amin(-1) / lr.amax(-1)) * (tb.amin(-1) / tb.amax(-1)))
    ctr = torch.nn.functional.binary_cross_entropy_with_logits(out["bbox_ctrness"][..., 0], centre, reduction="none")
    # one collective for both normalisers (the same ground truth in every set: the first set's)
    norms = mean_over_workers(torch.stack([fg[:B].sum().float(), (centre[:B] * fg[:B]).sum().float()]))
    num_fg, centre_sum = norms.clamp(min=1.0).unbind(0)
    if centerness_weighted_box:
        box, box_norm = box * centre, centre_sum
    else:
        box_norm = num_fg
    box = (box * fg).sum(1).view(sets, -1).sum(dim=1) / box_norm * box_weight
    cls, ctr = (x.view(sets, -1).sum(dim=1) / num_fg for x in (cls, (ctr * fg).sum(1)))
    return [{"classification": cls[i], "bbox_regression": box[i], "bbox_ctrness": ctr[i]} for i in range(sets)]


def retinanet_losses(head, targets: list[dict], out: dict[str, torch.Tensor], anchors: list[torch.Tensor],
                     matched: list[torch.Tensor], sets: int) -> list[dict[str, torch.Tensor]]:
    """``out`` holds ``sets`` feature sets' head outputs concatenated along the batch; one loss dict per set."""
    B = len(targets)
    m, fg, labels, gt, a = matched_targets(targets, matched, anchors, sets)
    valid = m != head.classification_head.BETWEEN_THRESHOLDS
    num_fg = fg.sum(dim=1).clamp(min=1)
    logits = out["cls_logits"]
    focal = sigmoid_focal_loss(logits, onehot_targets(labels, fg, logits), reduction="none") * valid[..., None]
    cls = focal.sum(dim=(1, 2)) / num_fg

    reg = out["bbox_regression"]
    coder = head.regression_head.box_coder
    if head.regression_head._loss_type == "l1":
        per = (reg - coder.encode_single(gt.flatten(0, 1), a.flatten(0, 1)).view_as(reg)).abs().sum(-1)
    else:  # giou
        pred = coder.decode_single(reg.flatten(0, 1), a.flatten(0, 1))
        per = generalized_box_iou_loss(pred, gt.flatten(0, 1), reduction="none").view(fg.shape)
    box = (per * fg).sum(dim=1) / num_fg
    cls, box = cls.view(sets, B).mean(dim=1), box.view(sets, B).mean(dim=1)
    return [{"classification": cls[i], "bbox_regression": box[i]} for i in range(sets)]


def focal_loss_on_probabilities(log_p: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                                gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss of probabilities given as logarithms (POTO: classification x 3D max filter, a
    product of two sigmoids), elementwise; log-space and float32 so that autocast and p -> 0 or 1 stay finite."""
    log_p = log_p.float().clamp(max=-1e-7)
    log_q = torch.log(-torch.expm1(log_p)).clamp(min=-100.0)  # log(1 - p)
    p = log_p.exp()
    ce = -(targets * log_p + (1 - targets) * log_q)
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return alpha_t * ce * (1 - p_t) ** gamma
