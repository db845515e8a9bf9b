"""Detections and ground truth of the evaluated images as flat numpy arrays, and box overlaps (IoU, IoA): what the
VOC and CrowdHuman metrics match."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Boxes:
    """One array per field over every box of the evaluated images, grouped by image (``image``: 0..n_images-1)."""
    image: np.ndarray  # (N,) int: index of the box's image in the evaluated list
    box: np.ndarray  # (N, 4) float x1y1x2y2
    label: np.ndarray  # (N,) int 1..K
    score: np.ndarray  # (N,) float (ground truth: 1)
    ignore: np.ndarray  # (N,) bool: VOC difficult, CrowdHuman ignore region (ground truth only)

    def starts(self, n_images: int) -> np.ndarray:
        """Where each image's boxes start (the boxes are sorted by image), with the end appended."""
        return np.searchsorted(self.image, np.arange(n_images + 1))


def ground_truth(dataset, image_ids: list[int]) -> Boxes:
    """Every annotation of ``image_ids`` in ``dataset.coco`` (iscrowd kept, as ``ignore``), labels 1..K."""
    rows = [(i, a) for i, img in enumerate(image_ids) for a in dataset.coco.imgToAnns.get(img, [])]
    xywh = np.array([a["bbox"] for _, a in rows], dtype=np.float64).reshape(-1, 4)
    return Boxes(image=np.array([i for i, _ in rows], dtype=np.int64),
                 box=np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1),
                 label=np.array([dataset.cat_to_label[a["category_id"]] for _, a in rows], dtype=np.int64),
                 score=np.ones(len(rows)), ignore=np.array([bool(a.get("iscrowd", 0)) for _, a in rows], dtype=bool))


def detections(outputs: list[dict]) -> Boxes:
    """torchvision outputs (one dict of boxes, labels, scores per evaluated image) as flat arrays."""
    n = [len(o["boxes"]) for o in outputs]
    cat = (lambda key, shape: np.concatenate([o[key].detach().cpu().numpy().reshape(shape) for o in outputs])
           if outputs else np.zeros((0,) + shape[1:]))
    return Boxes(image=np.repeat(np.arange(len(outputs)), n), box=cat("boxes", (-1, 4)).astype(np.float64),
                 label=cat("labels", (-1,)).astype(np.int64), score=cat("scores", (-1,)).astype(np.float64),
                 ignore=np.zeros(sum(n), dtype=bool))


def overlaps(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(IoU, intersection over the area of ``a``'s box), each (len(a), len(b)), for x1y1x2y2 boxes."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(axis=1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(inter > 0, inter / (area_a[:, None] + area_b[None, :] - inter), 0.0)
        ioa = np.where(inter > 0, inter / area_a[:, None], 0.0)
    return iou, ioa
