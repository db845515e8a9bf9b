"""Detections and ground truth of the evaluated images as flat numpy arrays, and the box overlaps the VOC and
CrowdHuman metrics match with, each written the way its reference computes it (same operations, same order, so
that values at a threshold compare the same way):

- :func:`toolkit_overlaps`: the CrowdHuman toolkit's ``Image.box_overlap_opr`` (CrowdDet's APMRToolkits):
  continuous corners, areas not clipped, ``1e-6`` added to both denominators.
- :func:`voc_iou`: ``voc_eval`` of Detectron2's ``pascal_voc_evaluation.py`` (after py-faster-rcnn): 1-based
  inclusive pixel corners, ``+ 1`` on every width and height, no epsilon.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TOOLKIT_EPS = 1e-6  # box_overlap_opr: inter / (area_d + area_g - inter + eps), inter / (area_d + eps)


@dataclass
class Boxes:
    """One array per field over every box of the evaluated images, grouped by image (``image``: 0..n_images-1,
    non-decreasing; within an image, the boxes keep their order: annotation order, or the detector's output order)."""
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


def toolkit_overlaps(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(IoU, intersection over the area of ``a``'s box), each (len(a), len(b)), for x1y1x2y2 boxes, as the
    CrowdHuman toolkit's ``box_overlap_opr`` computes them: intersection sides clipped at 0, areas as they are,
    and 1e-6 added to each denominator (a pair whose exact IoU is 0.5 + 2e-7 over a 2-pixel union is not above 0.5)."""
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.maximum(0, iw) * np.maximum(0, ih)
    area_a = ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]))[:, None]
    area_b = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        return inter / (area_a + area_b - inter + TOOLKIT_EPS), inter / (area_a + TOOLKIT_EPS)


def voc_iou(dt: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU (len(dt), len(gt)) of x1y1x2y2 boxes in this project's continuous coordinates, computed as ``voc_eval``
    does in the devkit's: both boxes as 1-based inclusive corners (x1 + 1, y1 + 1, x2, y2), which is what the VOC
    reader undid for ground truth (xmin - 1, ymin - 1) and what Detectron2's evaluator writes for detections
    (xmin + 1, ymin + 1), then ``+ 1.0`` on each side: ``iw = max(min(x2) - max(x1) + 1, 0)``, ...,
    ``inter / (area_d + area_g - inter)``."""
    d = np.concatenate([dt[:, :2] + 1.0, dt[:, 2:]], axis=1)[:, None, :]
    g = np.concatenate([gt[:, :2] + 1.0, gt[:, 2:]], axis=1)[None, :, :]
    iw = np.maximum(np.minimum(g[..., 2], d[..., 2]) - np.maximum(g[..., 0], d[..., 0]) + 1.0, 0.0)
    ih = np.maximum(np.minimum(g[..., 3], d[..., 3]) - np.maximum(g[..., 1], d[..., 1]) + 1.0, 0.0)
    inters = iw * ih
    uni = ((d[..., 2] - d[..., 0] + 1.0) * (d[..., 3] - d[..., 1] + 1.0)
           + (g[..., 2] - g[..., 0] + 1.0) * (g[..., 3] - g[..., 1] + 1.0) - inters)
    with np.errstate(divide="ignore", invalid="ignore"):
        return inters / uni
