"""The Pascal VOC protocol (the devkit's ``voc_eval``): per class, detections in score order each take the
ground-truth box of their image and class they overlap most; above the IoU threshold (strictly) that is a true
positive the first time, a false positive after; a difficult box makes its detection neither; anything else is
a false positive. AP is the area under the precision envelope (VOC2010+ protocol); the ``_07`` metrics are the
VOC2007 11-point variant (the one Detectron2, the paper's codebase, reports on VOC2007 test).

Recorded (percent): ``voc/AP`` (mean over IoU 0.50:0.95), ``voc/AP50``, ``voc/AP75`` and ``voc/AP_07``,
``voc/AP50_07``, ``voc/AP75_07``: means over the classes that have a non-difficult box in the evaluated images;
and per class ``voc/AP50/<class>``, ``voc/AP75/<class>``, ``voc/AP/<class>`` (area variant).
"""
from __future__ import annotations

import numpy as np

from lgd.evaluation.boxes import Boxes, detections, ground_truth, overlaps

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # AP = the mean over these; AP50 and AP75 are two of them
MEANS = ("voc/AP", "voc/AP50", "voc/AP75", "voc/AP_07", "voc/AP50_07", "voc/AP75_07")


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = False) -> float:
    """AP of one class from its cumulative recall and precision in score order (fractions, not percent)."""
    if use_07_metric:  # VOC2007: the mean of the best precision at recall >= 0, 0.1, ..., 1
        return float(np.mean([precision[recall >= t].max(initial=0.0) for t in np.linspace(0, 1, 11)]))
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # the envelope: best precision at this recall or beyond
    step = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[step + 1] - mrec[step]) * mpre[step + 1]))


def best_overlaps(dt: Boxes, gt: Boxes, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """For every detection: the largest IoU with a ground-truth box of its image and class (difficult ones
    included; -1 without any) and that box's index in ``gt`` (-1 without any)."""
    ov, best = np.full(len(dt.box), -1.0), np.full(len(dt.box), -1, dtype=np.int64)
    ds, gs = dt.starts(n_images), gt.starts(n_images)
    for i in range(n_images):  # one IoU matrix per image; not the training path
        d, g = slice(ds[i], ds[i + 1]), slice(gs[i], gs[i + 1])
        if d.start == d.stop or g.start == g.stop:
            continue
        iou = overlaps(dt.box[d], gt.box[g])[0]
        iou[dt.label[d][:, None] != gt.label[g][None, :]] = -1.0
        j = iou.argmax(axis=1)
        ov[d] = iou[np.arange(len(j)), j]
        best[d] = np.where(ov[d] >= 0, j + g.start, -1)
    return ov, best


def class_outcomes(score: np.ndarray, ov: np.ndarray, best: np.ndarray, difficult: np.ndarray,
                   thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tp, fp), each (len(thresholds), n) in descending score order, for one class's ``n`` detections."""
    order = np.argsort(-score, kind="stable")
    ov, best = ov[order], best[order]
    hit = ov[None, :] > thresholds[:, None]  # (T, n)
    on_difficult = np.zeros_like(hit)
    valid = best >= 0
    on_difficult[:, valid] = hit[:, valid] & difficult[best[valid]][None, :]
    candidate = hit & ~on_difficult
    tp = np.zeros_like(hit)
    for t in range(len(thresholds)):  # the first detection (in score order) on each box is the true positive
        idx = np.flatnonzero(candidate[t])
        _, first = np.unique(best[idx], return_index=True)
        tp[t, idx[first]] = True
    return tp, ~tp & ~on_difficult


def score(dataset, outputs: list[dict], image_ids: list[int]) -> dict[str, float]:
    """The VOC metrics of ``outputs`` (torchvision's, one per image id) against the split's boxes."""
    gt, dt = ground_truth(dataset, image_ids), detections(outputs)
    ov, best = best_overlaps(dt, gt, len(image_ids))
    per_class: dict[str, list[float]] = {}
    for label, name in enumerate(dataset.class_names, 1):
        npos = int(np.sum((gt.label == label) & ~gt.ignore))
        if npos == 0:  # no box to find: the class is left out of the means, as recall is undefined
            continue
        mine = dt.label == label
        tp, fp = class_outcomes(dt.score[mine], ov[mine], best[mine], gt.ignore, IOU_THRESHOLDS)
        ctp, cfp = np.cumsum(tp, axis=1), np.cumsum(fp, axis=1)
        recall = ctp / npos
        precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
        aps = [voc_ap(r, p) for r, p in zip(recall, precision)]
        aps07 = [voc_ap(r, p, use_07_metric=True) for r, p in zip(recall, precision)]
        per_class[name] = [float(np.mean(aps)), aps[0], aps[5], float(np.mean(aps07)), aps07[0], aps07[5]]
    if not per_class:
        return dict.fromkeys(MEANS, 0.0)
    metrics = dict(zip(MEANS, (np.mean(list(per_class.values()), axis=0) * 100.0).tolist()))
    for name, (ap, ap50, ap75, *_) in per_class.items():
        metrics.update({f"voc/AP/{name}": 100.0 * ap, f"voc/AP50/{name}": 100.0 * ap50,
                        f"voc/AP75/{name}": 100.0 * ap75})
    return metrics
