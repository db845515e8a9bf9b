"""The seam between LGD and a detection library: features of a batch, losses on *given* features, prediction.

torchvision's RetinaNet, FCOS, Faster R-CNN and Mask R-CNN; another backend adds one adapter here.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.image_list import ImageList

from lgd.backbones import build_backbone


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

    def heads(self) -> nn.Module:
        raise NotImplementedError

    def losses(self, features: OrderedDict, images: ImageList, targets: list[dict], heads: nn.Module) -> dict:
        raise NotImplementedError

    def predict(self, features: OrderedDict, images: ImageList, original_sizes, heads: nn.Module) -> list[dict]:
        raise NotImplementedError


class _DenseAdapter(DetectorAdapter):
    """RetinaNet and FCOS: one head over all levels, anchors from the feature sizes."""

    def heads(self):
        return self.model.head

    def _run(self, features, images, heads):
        feats = list(features.values())
        return feats, heads(feats), self.model.anchor_generator(images, feats)

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

    def losses(self, features, images, targets, heads):
        _, out, anchors = self._run(features, images, heads)
        return self.model.compute_loss(targets, out, anchors)


class FCOSAdapter(_DenseAdapter):
    name = "fcos"

    def losses(self, features, images, targets, heads):
        feats, out, anchors = self._run(features, images, heads)
        return self.model.compute_loss(targets, out, anchors, [x.size(2) * x.size(3) for x in feats])


class FasterRCNNAdapter(DetectorAdapter):
    """Faster R-CNN: RPN and RoI heads both run on the given features."""

    name = "faster_rcnn"

    def heads(self):
        return nn.ModuleDict({"rpn": self.model.rpn, "roi_heads": self.model.roi_heads})

    def losses(self, features, images, targets, heads):
        proposals, rpn_losses = heads["rpn"](images, features, targets)
        _, det_losses = heads["roi_heads"](features, proposals, images.image_sizes, targets)
        return {**rpn_losses, **det_losses}

    def predict(self, features, images, original_sizes, heads):
        proposals, _ = heads["rpn"](images, features)
        dets, _ = heads["roi_heads"](features, proposals, images.image_sizes)
        return self.model.transform.postprocess(dets, images.image_sizes, original_sizes)


class MaskRCNNAdapter(FasterRCNNAdapter):
    name = "mask_rcnn"
    uses_masks = True


ADAPTERS = {a.name: a for a in (RetinaNetAdapter, FCOSAdapter, FasterRCNNAdapter, MaskRCNNAdapter)}
MODEL_CLASSES = {"retinanet": RetinaNet, "fcos": FCOS, "faster_rcnn": FasterRCNN, "mask_rcnn": MaskRCNN}


def build_detector(detector: str, backbone: str, num_classes: int, min_sizes: tuple[int, ...], max_size: int,
                   weights: str | None = None, channels: int = 256, options: dict | None = None) -> DetectorAdapter:
    """A torchvision detector with a ResNet-FPN backbone; ``num_classes`` counts the background (K + 1)."""
    if detector not in MODEL_CLASSES:
        raise ValueError(f"unknown detector {detector!r}; known: {', '.join(MODEL_CLASSES)}")
    model = MODEL_CLASSES[detector](build_backbone(backbone, weights, detector, channels), num_classes=num_classes,
                              min_size=min_sizes, max_size=max_size, **(options or {}))
    return ADAPTERS[detector](model)
