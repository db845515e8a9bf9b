"""ATSS (Zhang et al. 2020): FCOS's head and losses with adaptive training sample selection, as in cvpods."""
from __future__ import annotations

from lgd.detectors.adapters import FCOSAdapter
from lgd.detectors.assignment import atss_assign
from lgd.detectors.fcos import FCOS


class ATSS(FCOS):
    """The reference's FCOS (lgd.detectors.fcos: scale per level, points at the cell centres, centerness-weighted
    GIoU, cvpods' inference with test threshold 0.05 on the class probability, NMS 0.6) trained with ATSS's
    assignment: ``topk`` candidates per level by centre distance, IoU of a square anchor ``anchor_scale`` strides
    wide >= the candidates' mean + std, point inside the box. The box loss is scaled by ``box_loss_weight``
    (cvpods: 2)."""

    def __init__(self, backbone, num_classes: int, topk: int = 9, anchor_scale: float = 8.0,
                 box_loss_weight: float = 2.0, score_thresh: float = 0.05, nms_thresh: float = 0.6, **kwargs):
        super().__init__(backbone, num_classes, box_loss_weight=box_loss_weight, score_thresh=score_thresh,
                         nms_thresh=nms_thresh, **kwargs)
        self.topk, self.anchor_scale = topk, anchor_scale

    def assign(self, targets, anchors, num_anchors_per_level):
        return atss_assign(targets, anchors, num_anchors_per_level, self.topk, self.anchor_scale)


class ATSSAdapter(FCOSAdapter):
    """ATSS: assignment computed once per step (it depends on boxes and anchors only), shared by both sets."""

    name = "atss"
