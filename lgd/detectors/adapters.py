"""The seam between LGD and a detection library: features of a batch, losses on *given* features, prediction.

torchvision's RetinaNet, FCOS, Faster R-CNN and Mask R-CNN; ATSS and POTO (lgd.detectors.atss, .poto) build on
the dense adapter; lgd.detectors.registry names them all.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.image_list import ImageList

from lgd.detectors.assignment import centre_sampling_assign, iou_assign
from lgd.detectors.dense_losses import BATCHED_BOX_LOSSES, fcos_losses, retinanet_losses
from lgd.detectors.rcnn_losses import rcnn_losses
from lgd.pyramid import concat_sets


class DetectorAdapter:
    """Wraps a torchvision detector; ``heads`` is the part that LGD feeds with instructive features (Eq. 6)."""

    name = ""
    uses_masks = False

    def __init__(self, model: nn.Module):
        self.model = model

    def preprocess(self, images: list[torch.Tensor], targets: list[dict] | None):
        """Resize (single- or multi-scale), normalise and pad: the detector's own transform."""
        return self.model.transform(images, targets)

    def features(self, images: ImageList) -> OrderedDict:
        return self.model.backbone(images.tensors)

    def trunk(self) -> nn.Module:
        """The backbone's trunk (ResNet's stages, Swin's stages), without the FPN and its extra levels: what the
        LGD schedule freezes first (the reference's ``student.raw_backbone``)."""
        return self.model.backbone.body

    def heads(self) -> nn.Module:
        raise NotImplementedError

    def losses(self, features: OrderedDict, images: ImageList, targets: list[dict], heads: nn.Module) -> dict:
        raise NotImplementedError

    def losses_pair(self, features: OrderedDict, instructive: OrderedDict, images: ImageList, targets: list[dict],
                    heads: nn.Module, instructive_heads: nn.Module | None = None) -> tuple[dict, dict]:
        """The student's losses and the instructive features' (Eq. 6) through the same ``heads`` (or through
        ``instructive_heads``, an unshared copy: Table 6(b))."""
        return (self.losses(features, images, targets, heads),
                self.losses(instructive, images, targets, heads if instructive_heads is None else instructive_heads))

    def predict(self, features: OrderedDict, images: ImageList, original_sizes, heads: nn.Module) -> list[dict]:
        raise NotImplementedError


class _DenseAdapter(DetectorAdapter):
    """RetinaNet and FCOS (ATSS, POTO): one head over all levels, anchors from the feature sizes.

    Losses run the head once over every feature set of the step (student and instructive features
    concatenated along the batch), and assign anchors once: both sets see the same anchors and boxes.
    """

    def heads(self):
        return self.model.head

    def _run(self, features, images, heads):
        feats = list(features.values())
        return feats, heads(feats), self.model.anchor_generator(images, feats)

    def assign(self, targets: list[dict], anchors: list[torch.Tensor], feats: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def _losses(self, feature_sets: list[OrderedDict], images, targets, heads, set_heads=None) -> list[dict]:
        first = list(feature_sets[0].values())
        if set_heads is None:  # one pass over all sets
            out = heads(list(concat_sets(feature_sets).values()))
        else:  # a head per set (an unshared teacher head): its outputs concatenated as the one pass's
            outs = [h(list(fs.values())) for h, fs in zip(set_heads, feature_sets)]
            out = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
        anchors = self.model.anchor_generator(images, first)
        matched = self.assign(targets, anchors, first)
        return self.set_losses(heads, targets, out, anchors, matched, len(feature_sets))

    def set_losses(self, heads, targets, out, anchors, matched, sets: int) -> list[dict]:
        """One loss dict per feature set; ``out`` holds the sets concatenated along the batch."""
        B = len(targets)
        return [heads.compute_loss(targets, {k: v[i * B:(i + 1) * B] for k, v in out.items()}, anchors, matched)
                for i in range(sets)]

    def losses(self, features, images, targets, heads):
        return self._losses([features], images, targets, heads)[0]

    def losses_pair(self, features, instructive, images, targets, heads, instructive_heads=None):
        """As the base class; ``instructive_heads`` (an unshared teacher head, Table 6(b)) runs on the instructive
        features instead of ``heads``, with the same targets and assignment (POTO: the student's matching)."""
        set_heads = None if instructive_heads is None else [heads, instructive_heads]
        return tuple(self._losses([features, instructive], images, targets, heads, set_heads))

    def predict(self, features, images, original_sizes, heads):
        feats, out, anchors = self._run(features, images, heads)
        per_level = [x.size(2) * x.size(3) for x in feats]
        if isinstance(self.model, RetinaNet):
            hw = sum(per_level)
            a = out["cls_logits"].size(1) // hw
            per_level = [n * a for n in per_level]
        split_out = {k: list(v.split(per_level, dim=1)) for k, v in out.items()}
        split_anchors = [list(a.split(per_level)) for a in anchors]
        dets = self.model.postprocess_detections(split_out, split_anchors, images.image_sizes)
        return self.model.transform.postprocess(dets, images.image_sizes, original_sizes)


class RetinaNetAdapter(_DenseAdapter):
    name = "retinanet"

    def assign(self, targets, anchors, feats):
        m = self.model.proposal_matcher
        return iou_assign(targets, anchors, m.high_threshold, m.low_threshold, m.allow_low_quality_matches)

    def set_losses(self, heads, targets, out, anchors, matched, sets):
        if heads.regression_head._loss_type not in BATCHED_BOX_LOSSES:
            return super().set_losses(heads, targets, out, anchors, matched, sets)
        return retinanet_losses(heads, targets, out, anchors, matched, sets)


class FCOSAdapter(_DenseAdapter):
    """FCOS (and ATSS): the model's own assignment and losses (lgd.detectors.fcos.FCOS) where it has them,
    torchvision's rules otherwise (a plain torchvision FCOS)."""

    name = "fcos"

    def assign(self, targets, anchors, feats):
        num_per_level = [x.size(2) * x.size(3) for x in feats]
        if hasattr(self.model, "assign"):
            return self.model.assign(targets, anchors, num_per_level)
        return centre_sampling_assign(targets, anchors, num_per_level, self.model.center_sampling_radius)

    def set_losses(self, heads, targets, out, anchors, matched, sets):
        if hasattr(self.model, "set_losses"):
            return self.model.set_losses(heads, targets, out, anchors, matched, sets)
        return fcos_losses(heads, targets, out, anchors, matched, sets, centerness_weighted_box=False)


class FasterRCNNAdapter(DetectorAdapter):
    """Faster R-CNN: RPN and RoI heads both run on the given features.

    Training losses follow torchvision's rules batched over images (lgd.detectors.rcnn_losses); for the pair
    (Eq. 6) both feature sets run through the heads together, each with its own proposals and samples.
    """

    name = "faster_rcnn"

    def heads(self):
        return nn.ModuleDict({"rpn": self.model.rpn, "roi_heads": self.model.roi_heads})

    def losses(self, features, images, targets, heads):
        return rcnn_losses([features], images, targets, heads)[0]

    def losses_pair(self, features, instructive, images, targets, heads, instructive_heads=None):
        if instructive_heads is not None:  # an unshared copy: each set through its own heads
            return super().losses_pair(features, instructive, images, targets, heads, instructive_heads)
        return tuple(rcnn_losses([features, instructive], images, targets, heads))

    def predict(self, features, images, original_sizes, heads):
        proposals, _ = heads["rpn"](images, features)
        dets, _ = heads["roi_heads"](features, proposals, images.image_sizes)
        return self.model.transform.postprocess(dets, images.image_sizes, original_sizes)


class MaskRCNNAdapter(FasterRCNNAdapter):
    name = "mask_rcnn"
    uses_masks = True
