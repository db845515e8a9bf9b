"""The detectors by name: model class and adapter of each, and ``build_detector``."""
from __future__ import annotations

from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet

from lgd.backbones import build_backbone
from lgd.detectors.adapters import (DetectorAdapter, FasterRCNNAdapter, FCOSAdapter, MaskRCNNAdapter,
                                    RetinaNetAdapter)
from lgd.detectors.atss import ATSS, ATSSAdapter
from lgd.detectors.poto import POTO, POTOAdapter

ADAPTERS = {a.name: a for a in (RetinaNetAdapter, FCOSAdapter, FasterRCNNAdapter, MaskRCNNAdapter, ATSSAdapter,
                                POTOAdapter)}
MODEL_CLASSES = {"retinanet": RetinaNet, "fcos": FCOS, "faster_rcnn": FasterRCNN, "mask_rcnn": MaskRCNN,
                 "atss": ATSS, "poto": POTO}


def build_detector(detector: str, backbone: str, num_classes: int, min_sizes: tuple[int, ...], max_size: int,
                   weights: str | None = None, channels: int = 256, options: dict | None = None) -> DetectorAdapter:
    """A detector with a ResNet/Swin-FPN backbone; ``num_classes`` counts the background (K + 1)."""
    if detector not in MODEL_CLASSES:
        raise ValueError(f"unknown detector {detector!r}; known: {', '.join(MODEL_CLASSES)}")
    model = MODEL_CLASSES[detector](build_backbone(backbone, weights, detector, channels), num_classes=num_classes,
                                    min_size=min_sizes, max_size=max_size, **(options or {}))
    return ADAPTERS[detector](model)
