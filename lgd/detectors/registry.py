"""The detectors by name: model class and adapter of each, and ``build_detector``."""
from __future__ import annotations

from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet

from lgd.backbones import build_backbone
from lgd.detectors.adapters import (DetectorAdapter, FasterRCNNAdapter, FCOSAdapter, MaskRCNNAdapter,
                                    RetinaNetAdapter)
from lgd.detectors.atss import ATSS, ATSSAdapter
from lgd.detectors.fcos import FCOS
from lgd.detectors.poto import POTO, POTOAdapter

ADAPTERS = {a.name: a for a in (RetinaNetAdapter, FCOSAdapter, FasterRCNNAdapter, MaskRCNNAdapter, ATSSAdapter,
                                POTOAdapter)}
MODEL_CLASSES = {"retinanet": RetinaNet, "fcos": FCOS, "faster_rcnn": FasterRCNN, "mask_rcnn": MaskRCNN,
                 "atss": ATSS, "poto": POTO}


def build_detector(detector: str, backbone: str, num_classes: int, min_sizes: tuple[int, ...], max_size: int,
                   weights: str | None = None, channels: int = 256, options: dict | None = None,
                   backend: str = "torchvision") -> DetectorAdapter:
    """A detector with a ResNet/Swin-FPN backbone; ``num_classes`` counts the background (K + 1).
    ``backend: detectron2``: detectron2's own detector (lgd.detectors.detectron2; ``options`` are its config keys)."""
    if backend == "detectron2":
        from lgd.detectors.detectron2 import build_detector as build_detectron2

        return build_detectron2(detector, backbone, num_classes, min_sizes, max_size, weights, channels, options)
    if backend != "torchvision":
        raise ValueError(f"unknown backend {backend!r}; known: torchvision, detectron2")
    if detector not in MODEL_CLASSES:
        raise ValueError(f"unknown detector {detector!r}; known: {', '.join(MODEL_CLASSES)}")
    model = MODEL_CLASSES[detector](build_backbone(backbone, weights, detector, channels), num_classes=num_classes,
                                    min_size=min_sizes, max_size=max_size, **(options or {}))
    return ADAPTERS[detector](model)
