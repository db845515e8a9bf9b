"""ATSS (Zhang et al. 2020): FCOS's head and losses with adaptive training sample selection, as in cvpods."""
from __future__ import annotations

from torchvision.models.detection import FCOS

from lgd.detectors.adapters import FCOSAdapter
from lgd.detectors.assignment import atss_assign
from lgd.detectors.dense_losses import fcos_losses


class ATSS(FCOS):
    """torchvision's FCOS (one point/anchor per location, centerness on the box branch, GIoU box loss, focal
    classification) trained with ATSS's assignment: ``topk`` candidates per level by centre distance, IoU of a
    square anchor ``anchor_scale`` strides wide >= the candidates' mean + std, point inside the box.
    The box loss is weighted by the centerness targets and scaled by ``box_loss_weight`` (cvpods: 2).
    Inference is FCOS's (score sqrt(cls x centerness), NMS), with cvpods' test thresholds."""

    def __init__(self, backbone, num_classes: int, topk: int = 9, anchor_scale: float = 8.0,
                 box_loss_weight: float = 2.0, score_thresh: float = 0.05, nms_thresh: float = 0.6, **kwargs):
        super().__init__(backbone, num_classes, score_thresh=score_thresh, nms_thresh=nms_thresh, **kwargs)
        self.topk, self.anchor_scale, self.box_loss_weight = topk, anchor_scale, box_loss_weight

    def assign(self, targets, anchors, num_anchors_per_level):
        return atss_assign(targets, anchors, num_anchors_per_level, self.topk, self.anchor_scale)

    def set_losses(self, head, targets, out, anchors, matched, sets: int):
        return fcos_losses(head, targets, out, anchors, matched, sets, box_weight=self.box_loss_weight,
                           centerness_weighted_box=True)

    def compute_loss(self, targets, head_outputs, anchors, num_anchors_per_level):
        """torchvision's training forward calls this: the same losses as the adapter's."""
        matched = self.assign(targets, anchors, num_anchors_per_level)
        return self.set_losses(self.head, targets, head_outputs, anchors, matched, 1)[0]


class ATSSAdapter(FCOSAdapter):
    """ATSS: assignment computed once per step (it depends on boxes and anchors only), shared by both sets."""

    name = "atss"

    def assign(self, targets, anchors, feats):
        return self.model.assign(targets, anchors, [x.size(2) * x.size(3) for x in feats])

    def set_losses(self, heads, targets, out, anchors, matched, sets):
        return self.model.set_losses(heads, targets, out, anchors, matched, sets)
