"""FCOS as the reference implementation trains it (megvii-research/LGD's cvpods-style FCOS head): the dense
detectors' common recipe, which ATSS and POTO (lgd.detectors.atss, .poto) inherit.

What differs from torchvision's FCOS, each a constructor keyword (``detector_options``) that restores
torchvision's behaviour:

- ``scale_per_level``: a learnable scalar per pyramid level (init 1.0) multiplies the box branch's output
  before its ReLU (cvpods' ``Scale``); torchvision's head has none.
- ``point_offset``: the points sit at the cell centres, ((i + 0.5) · stride, (j + 0.5) · stride), with the
  levels' fixed strides 8 ... 128 (cvpods' ``ShiftGenerator``, ``OFFSET=0.5``); torchvision's anchors are
  centred on the cells' top-left corners, with strides taken as padded size // feature size. The point's
  "anchor" is a square one stride wide around it (what the box coder normalises by).
- ``centerness_weighted_box``: each foreground GIoU term weighted by its centerness target and the sum divided
  by the centerness targets' sum (cvpods' ``iou_loss(..., weight=gt_centerness) / num_targets``);
  torchvision divides the plain sum by the foreground count.
- ``threshold_class_prob``: at inference ``score_thresh`` and ``topk_candidates`` apply to the class
  probability, the score is then sqrt(class probability x centerness) (cvpods' inference, test threshold
  0.05); torchvision thresholds and ranks sqrt(cls x ctr) itself (its default threshold: 0.2).

The foreground count and the centerness sum that normalise the losses are averaged over the workers
(``dense_losses.mean_over_workers``), as cvpods does. Where P6 comes from (C5 for the ResNet students) is the
backbone's (lgd.backbones); ``p6_from`` rebuilds it.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.detection import FCOS as TorchvisionFCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead, FCOSRegressionHead
from torchvision.ops import boxes as box_ops

from lgd.backbones import set_p6_input
from lgd.detectors.assignment import centre_sampling_assign
from lgd.detectors.dense_losses import fcos_losses

STRIDES = (8, 16, 32, 64, 128)  # P3-P7


class Scale(nn.Module):
    """A learnable scalar (cvpods' ``Scale``)."""

    def __init__(self, init_value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class CellCentrePoints(AnchorGenerator):
    """One point per feature cell at ((i + offset) · stride, (j + offset) · stride), as the (one) anchor
    [x - s/2, y - s/2, x + s/2, y + s/2] of size ``s`` = the level's stride. The strides are the levels' own
    (8, 16, ... 128), not padded size // feature size (which is not the stride where the padded size is no
    multiple of 128)."""

    def __init__(self, strides: tuple[int, ...] = STRIDES, offset: float = 0.5):
        super().__init__(tuple((s,) for s in strides), ((1.0,),) * len(strides))
        self.strides, self.offset = tuple(strides), float(offset)

    def points(self, grid_sizes: list[tuple[int, int]], device, dtype=torch.float32) -> torch.Tensor:
        """(sum H·W, 4) anchors of every level, levels concatenated, each level row-major."""
        if len(grid_sizes) != len(self.strides):
            raise ValueError(f"{len(grid_sizes)} feature levels for {len(self.strides)} strides {self.strides}")
        out = []
        for (h, w), s in zip(grid_sizes, self.strides):
            ys = (torch.arange(h, device=device, dtype=dtype) + self.offset) * s
            xs = (torch.arange(w, device=device, dtype=dtype) + self.offset) * s
            cy, cx = torch.meshgrid(ys, xs, indexing="ij")
            c = torch.stack([cx.reshape(-1), cy.reshape(-1)], dim=1)
            out.append(torch.cat([c - s / 2, c + s / 2], dim=1))
        return torch.cat(out)

    def forward(self, image_list, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        f = feature_maps[0]
        # float32 at least: under autocast the features are 16-bit, which cannot hold pixel coordinates
        dtype = torch.promote_types(f.dtype, torch.float32)
        pts = self.points([tuple(x.shape[-2:]) for x in feature_maps], f.device, dtype)
        return [pts for _ in range(len(image_list.image_sizes))]


class ScaledFCOSRegressionHead(FCOSRegressionHead):
    """torchvision's FCOS box branch with a learnable scale per level before the ReLU:
    relu(scale_l · bbox_reg(x)); centerness from the same tower (cvpods' ``CENTERNESS_ON_REG``)."""

    def __init__(self, in_channels: int, num_anchors: int, num_convs: int = 4, num_levels: int = len(STRIDES),
                 norm_layer=None):
        super().__init__(in_channels, num_anchors, num_convs, norm_layer)
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))

    def forward(self, x: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if len(x) != len(self.scales):
            raise ValueError(f"{len(x)} feature levels for {len(self.scales)} scales")
        regs, ctrs = [], []
        for features, scale in zip(x, self.scales):  # the pyramid levels, as torchvision's head
            t = self.conv(features)
            reg = nn.functional.relu(scale(self.bbox_reg(t)))
            regs.append(reg.flatten(2).transpose(1, 2))  # (N, 4, H, W) -> (N, HW, 4): one anchor per cell
            ctrs.append(self.bbox_ctrness(t).flatten(2).transpose(1, 2))
        return torch.cat(regs, dim=1), torch.cat(ctrs, dim=1)


class ScaledFCOSHead(FCOSHead):
    """torchvision's FCOS head (classification tower, box + centerness tower) with ``ScaledFCOSRegressionHead``."""

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, num_convs: int = 4,
                 num_levels: int = len(STRIDES)):
        super().__init__(in_channels, num_anchors, num_classes, num_convs)
        self.regression_head = ScaledFCOSRegressionHead(in_channels, num_anchors, num_convs, num_levels)


class FCOS(TorchvisionFCOS):
    """torchvision's FCOS with the reference's recipe (see the module's docstring for each option)."""

    def __init__(self, backbone, num_classes: int, scale_per_level: bool = True, point_offset: float = 0.5,
                 centerness_weighted_box: bool = True, box_loss_weight: float = 1.0,
                 threshold_class_prob: bool = True, score_thresh: float = 0.05, p6_from: str | None = None,
                 anchor_generator=None, head=None, **kwargs):
        if p6_from is not None:
            set_p6_input(backbone, p6_from)
        if anchor_generator is None:
            anchor_generator = CellCentrePoints(STRIDES, point_offset)
        if head is None and scale_per_level:
            head = ScaledFCOSHead(backbone.out_channels, 1, num_classes)
        super().__init__(backbone, num_classes, anchor_generator=anchor_generator, head=head,
                         score_thresh=score_thresh, **kwargs)
        self.centerness_weighted_box, self.box_loss_weight = centerness_weighted_box, box_loss_weight
        self.threshold_class_prob = threshold_class_prob

    def assign(self, targets: list[dict], anchors: list[torch.Tensor], num_per_level: list[int]) -> list[torch.Tensor]:
        """FCOS's centre sampling (radius ``center_sampling_radius`` strides) and size ranges, batched."""
        return centre_sampling_assign(targets, anchors, num_per_level, self.center_sampling_radius)

    def set_losses(self, head, targets, out, anchors, matched, sets: int) -> list[dict]:
        """One loss dict per feature set of ``out`` (the sets concatenated along the batch), one assignment."""
        return fcos_losses(head, targets, out, anchors, matched, sets, box_weight=self.box_loss_weight,
                           centerness_weighted_box=self.centerness_weighted_box)

    def compute_loss(self, targets, head_outputs, anchors, num_anchors_per_level):
        """torchvision's training forward calls this: the same losses as the adapter's."""
        matched = self.assign(targets, anchors, num_anchors_per_level)
        return self.set_losses(self.head, targets, head_outputs, anchors, matched, 1)[0]

    def postprocess_detections(self, head_outputs: dict[str, list[torch.Tensor]], anchors: list[list[torch.Tensor]],
                               image_shapes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        """Per image and level: the ``topk_candidates`` best class probabilities above ``score_thresh``, scored
        sqrt(cls x centerness), then class-wise NMS and the ``detections_per_img`` best (cvpods' inference);
        ``threshold_class_prob=False``: torchvision's (threshold and top-k on sqrt(cls x centerness))."""
        if not self.threshold_class_prob:
            return super().postprocess_detections(head_outputs, anchors, image_shapes)
        detections = []
        for index, (anchors_i, shape) in enumerate(zip(anchors, image_shapes)):
            boxes_all, scores_all, labels_all = [], [], []
            for level, anchors_l in enumerate(anchors_i):
                prob = torch.sigmoid(head_outputs["cls_logits"][level][index])  # (HW, K)
                num_classes = prob.shape[-1]
                prob = prob.flatten()
                idx = torch.where(prob > self.score_thresh)[0]
                prob, top = prob[idx].topk(min(self.topk_candidates, idx.numel()))
                idx = idx[top]
                point, labels = idx // num_classes, idx % num_classes
                ctr = torch.sigmoid(head_outputs["bbox_ctrness"][level][index][point, 0])
                boxes = self.box_coder.decode(head_outputs["bbox_regression"][level][index][point], anchors_l[point])
                boxes_all.append(box_ops.clip_boxes_to_image(boxes, shape))
                scores_all.append(torch.sqrt(prob * ctr))
                labels_all.append(labels)
            boxes, scores, labels = torch.cat(boxes_all), torch.cat(scores_all), torch.cat(labels_all)
            keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return detections
