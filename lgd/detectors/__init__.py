"""Detector adapters: one small class per torchvision detector, exposing features / losses / prediction."""
from lgd.detectors.adapters import ADAPTERS, DetectorAdapter, build_detector

__all__ = ["ADAPTERS", "DetectorAdapter", "build_detector"]
