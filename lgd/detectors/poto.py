"""POTO (DeFCN, Wang et al. 2021): an FCOS-style head trained one-to-one, for NMS-free detection.

Prediction-aware one-to-one assignment: Hungarian matching of each image's boxes to points on the quality
cls^(1-α) · IoU^α (α = 0.8), within FCOS's centre-sampling prior. Inference keeps the top scores without NMS.
By default plain POTO, the reference's (megvii-research/LGD ``thirdparty_heads/poto.py``; the paper's R-50
POTO baseline, 39.0, is plain POTO's, not full DeFCN's 41.4): FCOS-style box tower with a scale per level, no
3D max filter, no auxiliary loss. DeFCN's full variant: ``max_filter=True`` (a max over 3x3 positions and the
adjacent pyramid levels gates the classification), ``aux_loss=True`` (an auxiliary one-to-many focal loss,
ATSS-style selection on the same quality).

The instructive features' losses (Eq. 6) reuse the student's matching, as the reference's ``DistillatorPOTO``
(its ``forward_teacher`` passes the student's ``gt_classes, gt_shifts_reg_deltas`` to ``student.losses``);
``per_set_matching=True``: each feature set matched on its own predictions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.fcos import FCOSClassificationHead
from torchvision.ops import boxes as box_ops
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss
from torchvision.models.detection import _utils as det_utils

from lgd.detectors.adapters import FCOSAdapter
from lgd.detectors.assignment import adaptive_select, batched_box_iou, centre_region, hungarian_assign, pad_boxes
from lgd.detectors.dense_losses import focal_loss_on_probabilities, matched_targets, mean_over_workers, onehot_targets
from lgd.detectors.fcos import FCOS, STRIDES, Scale


def _conv_tower(channels: int, num_convs: int) -> nn.Sequential:
    layers = []
    for _ in range(num_convs):  # as torchvision's FCOS towers
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(32, channels), nn.ReLU()]
    tower = nn.Sequential(*layers)
    for m in tower:
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)
    return tower


def _flatten(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, HW, C), the layout torchvision's dense heads use."""
    return x.flatten(2).transpose(1, 2)


class MaxFiltering(nn.Module):
    """DeFCN's 3D max filter: a max over ``kernel`` x ``kernel`` positions and ``tau`` + 1 adjacent pyramid levels
    (resized to each level) of conv features, added back to the input, then GroupNorm and ReLU."""

    def __init__(self, channels: int, kernel: int = 3, tau: int = 2):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = nn.GroupNorm(32, channels)
        self.pool = nn.MaxPool3d((tau + 1, kernel, kernel), stride=1, padding=(tau // 2, kernel // 2, kernel // 2))
        self.margin = tau // 2

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        feats = [self.conv(x) for x in inputs]
        out = []
        for level, x in enumerate(feats):  # the pyramid levels (a handful), not images
            lo, hi = max(0, level - self.margin), min(len(feats), level + self.margin + 1)
            stack = [f if k == level else F.interpolate(f, size=x.shape[-2:], mode="bilinear")
                     for k, f in zip(range(lo, hi), feats[lo:hi])]
            pooled = self.pool(torch.stack(stack, dim=2))[:, :, level - lo]
            out.append(F.relu(self.norm(pooled + inputs[level])))
        return out


class POTOHead(nn.Module):
    """FCOS's classification head; a box tower predicting (l, t, r, b) / stride (no centerness), with a learnable
    scale per level before the ReLU (``scale_per_level``, the reference's); with the 3D max filter, a one-channel
    filter score from the box tower that gates the classification."""

    def __init__(self, channels: int, num_classes: int, num_convs: int = 4, max_filter: bool = False,
                 scale_per_level: bool = True, num_levels: int = len(STRIDES)):
        super().__init__()
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels)) if scale_per_level else None
        self.box_coder = det_utils.BoxLinearCoder(normalize_by_size=True)
        self.classification_head = FCOSClassificationHead(channels, 1, num_classes, num_convs)
        self.box_tower = _conv_tower(channels, num_convs)
        self.bbox_reg = nn.Conv2d(channels, 4, 3, padding=1)
        self.max_filter = MaxFiltering(channels) if max_filter else None
        self.filter_score = nn.Conv2d(channels, 1, 3, padding=1) if max_filter else None
        for m in (self.bbox_reg, self.filter_score):
            if m is not None:
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        towers = [self.box_tower(f) for f in x]
        if self.scales is not None and len(x) != len(self.scales):
            raise ValueError(f"{len(x)} feature levels for {len(self.scales)} scales")
        regs = [self.bbox_reg(t) for t in towers]
        if self.scales is not None:
            regs = [s(r) for s, r in zip(self.scales, regs)]
        out = {"cls_logits": self.classification_head(x),
               "bbox_regression": torch.cat([_flatten(F.relu(r)) for r in regs], dim=1)}
        if self.max_filter is not None:
            out["filter_logits"] = torch.cat([_flatten(self.filter_score(t)) for t in self.max_filter(towers)], dim=1)
        return out


class POTO(FCOS):
    """The reference's FCOS (lgd.detectors.fcos: points at the cell centres, P6 from C5) with POTOHead and
    DeFCN's training (α, centre-sampling radius 1.5, GIoU box loss x 2; by default neither the 3D max filter nor
    the auxiliary top-9 one-to-many loss) and NMS-free inference (top ``detections_per_img`` scores above
    ``score_thresh``)."""

    def __init__(self, backbone, num_classes: int, alpha: float = 0.8, center_sampling_radius: float = 1.5,
                 max_filter: bool = False, aux_loss: bool = False, aux_topk: int = 9, box_loss_weight: float = 2.0,
                 per_set_matching: bool = False, scale_per_level: bool = True, score_thresh: float = 0.05,
                 **kwargs):
        head = POTOHead(backbone.out_channels, num_classes, max_filter=max_filter, scale_per_level=scale_per_level)
        super().__init__(backbone, num_classes, head=head, center_sampling_radius=center_sampling_radius,
                         score_thresh=score_thresh, box_loss_weight=box_loss_weight, **kwargs)
        self.alpha, self.aux_loss, self.aux_topk = alpha, aux_loss, aux_topk
        self.per_set_matching = per_set_matching

    def _quality(self, prob: torch.Tensor, labels: torch.Tensor, iou: torch.Tensor) -> torch.Tensor:
        """cls^(1-α) · IoU^α of every (box, point): ``prob`` (N, A, K), ``labels`` (N, M), ``iou`` (N, M, A)."""
        p = prob.gather(2, labels[:, None, :].expand(-1, prob.shape[1], -1)).transpose(1, 2)
        return p ** (1 - self.alpha) * iou ** self.alpha

    @torch.no_grad()
    def assign(self, targets: list[dict], out: dict[str, torch.Tensor], anchors: torch.Tensor,
               num_per_level: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One-to-one (and auxiliary one-to-many) box index of every point of the N = len(targets) rows of
        ``out``, on those rows' predictions (one host copy for SciPy's Hungarian matcher)."""
        gt, valid = pad_boxes(targets)
        N, A = anchors.shape[:2]
        none = torch.full((N, A), -1, dtype=torch.int64, device=anchors.device)
        if gt.shape[1] == 0:
            return none, (none if self.aux_loss else None)
        labels = torch.nn.utils.rnn.pad_sequence([t["labels"] for t in targets], batch_first=True)
        logits = out["cls_logits"].float()
        cls_prob = logits.sigmoid()
        prob = cls_prob * out["filter_logits"].float().sigmoid() if "filter_logits" in out else cls_prob
        pred = self.box_coder.decode(out["bbox_regression"].float(), anchors)
        iou = torch.where(valid[..., None], batched_box_iou(gt.float(), pred), 0.0)  # (N, M, A)
        region, dist = centre_region(anchors, gt, self.center_sampling_radius)
        prior = region.transpose(1, 2) & valid[..., None]
        matched = hungarian_assign(torch.where(prior, self._quality(prob, labels, iou), -1.0), valid)
        aux = None
        if self.aux_loss:  # DeFCN: on the unfiltered classification, points inside the box
            q = self._quality(cls_prob, labels, iou)
            inside = (dist.amin(dim=3) > 0).transpose(1, 2) & valid[..., None]
            aux = adaptive_select(q, q, inside, num_per_level, self.aux_topk, largest=True)
        return matched, aux

    def set_losses(self, head, targets: list[dict], out: dict[str, torch.Tensor], anchors: list[torch.Tensor],
                   num_per_level: list[int], sets: int) -> list[dict[str, torch.Tensor]]:
        """``out`` holds ``sets`` feature sets' head outputs along the batch. The matching is made on the first
        set's (the student's) predictions and used for every set, as the reference's; ``per_set_matching``: each
        set on its own. Focal (of cls x filter) and GIoU losses over the foreground count, averaged over the
        workers (at least 1)."""
        B = len(targets)
        a = torch.stack(anchors)
        if self.per_set_matching:
            matched, aux = self.assign(targets * sets, out, a.repeat(sets, 1, 1), num_per_level)
        else:  # the student's rows only, one Hungarian matching per image
            matched, aux = self.assign(targets, {k: v[:B] for k, v in out.items()}, a, num_per_level)
            matched = matched.repeat(sets, 1)
            aux = None if aux is None else aux.repeat(sets, 1)
        rows, a = targets * sets, a.repeat(sets, 1, 1)
        _, fg, labels, gt, _ = matched_targets(rows, list(matched.unbind(0)), list(a.unbind(0)), 1)
        logits = out["cls_logits"]
        onehot = onehot_targets(labels, fg, logits)
        if "filter_logits" in out:
            log_p = F.logsigmoid(logits.float()) + F.logsigmoid(out["filter_logits"].float())
            cls = focal_loss_on_probabilities(log_p, onehot)
        else:
            cls = sigmoid_focal_loss(logits, onehot, reduction="none")
        pred = head.box_coder.decode(out["bbox_regression"], a)
        box = generalized_box_iou_loss(pred.flatten(0, 1), gt.flatten(0, 1), reduction="none").view(fg.shape)
        counts = [fg.view(sets, -1).sum(dim=1).float()]
        if aux is not None:
            _, fg_aux, labels_aux, _, _ = matched_targets(rows, list(aux.unbind(0)), list(a.unbind(0)), 1)
            counts.append(fg_aux.view(sets, -1).sum(dim=1).float())
        counts = mean_over_workers(torch.cat(counts)).clamp(min=1.0)  # one collective for every normaliser
        num_fg = counts[:sets]
        cls = cls.sum(dim=(1, 2)).view(sets, -1).sum(dim=1) / num_fg
        box = (box * fg).sum(dim=1).view(sets, -1).sum(dim=1) / num_fg * self.box_loss_weight
        losses = [{"classification": cls[i], "bbox_regression": box[i]} for i in range(sets)]
        if aux is not None:
            focal = sigmoid_focal_loss(logits, onehot_targets(labels_aux, fg_aux, logits), reduction="none")
            aux_loss = focal.sum(dim=(1, 2)).view(sets, -1).sum(dim=1) / counts[sets:]
            for i in range(sets):
                losses[i]["classification_aux"] = aux_loss[i]
        return losses

    def compute_loss(self, targets, head_outputs, anchors, num_anchors_per_level):
        """torchvision's training forward calls this: the same losses as the adapter's."""
        return self.set_losses(self.head, targets, head_outputs, anchors, num_anchors_per_level, 1)[0]

    def postprocess_detections(self, head_outputs: dict[str, list[torch.Tensor]], anchors: list[list[torch.Tensor]],
                               image_shapes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        """NMS-free: per level the ``topk_candidates`` best scores above ``score_thresh`` (score: cls x filter),
        then the image's ``detections_per_img`` best."""
        detections = []
        for index, (anchors_i, shape) in enumerate(zip(anchors, image_shapes)):
            boxes_all, scores_all, labels_all = [], [], []
            for level, anchors_l in enumerate(anchors_i):
                log_p = F.logsigmoid(head_outputs["cls_logits"][level][index])
                if "filter_logits" in head_outputs:
                    log_p = log_p + F.logsigmoid(head_outputs["filter_logits"][level][index])
                num_classes = log_p.shape[-1]
                scores = log_p.exp().flatten()
                idx = torch.where(scores > self.score_thresh)[0]
                scores, top = scores[idx].topk(min(self.topk_candidates, idx.numel()))
                idx = idx[top]
                point, labels = idx // num_classes, idx % num_classes
                boxes = self.box_coder.decode(head_outputs["bbox_regression"][level][index][point], anchors_l[point])
                boxes_all.append(box_ops.clip_boxes_to_image(boxes, shape))
                scores_all.append(scores)
                labels_all.append(labels)
            scores = torch.cat(scores_all)
            keep = scores.topk(min(self.detections_per_img, scores.numel())).indices
            detections.append({"boxes": torch.cat(boxes_all)[keep], "scores": scores[keep],
                               "labels": torch.cat(labels_all)[keep]})
        return detections


class POTOAdapter(FCOSAdapter):
    """POTO: the assignment depends on the predictions, so it is made in ``set_losses``, after the step's one
    head pass (on the student's rows; every row's with ``per_set_matching``)."""

    name = "poto"

    def assign(self, targets, anchors, feats):
        return [x.size(2) * x.size(3) for x in feats]  # what set_losses needs to assign on the predictions

    def set_losses(self, heads, targets, out, anchors, matched, sets):
        return self.model.set_losses(heads, targets, out, anchors, matched, sets)
