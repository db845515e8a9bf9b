"""Detector adapters: one small class per detector, exposing features / losses / prediction."""
from lgd.detectors.adapters import DetectorAdapter
from lgd.detectors.registry import ADAPTERS, MODEL_CLASSES, build_detector

__all__ = ["ADAPTERS", "MODEL_CLASSES", "DetectorAdapter", "build_detector"]
