"""The Pascal VOC metrics as Detectron2 (the paper's codebase) computes them: ``PascalVOCDetectionEvaluator`` and
its ``voc_eval`` / ``voc_ap`` (``detectron2/evaluation/pascal_voc_evaluation.py``, after py-faster-rcnn). Rule by
rule:

- Thresholds: IoU ``t / 100.0`` for t in 50, 55, ..., 95 (``evaluate``'s loop), so 0.9 is the float 0.9 (not
  ``np.linspace(0.5, 0.95, 10)``'s 0.8999999999999999: a box pair at IoU exactly 0.9 is no hit at 0.9).
- IoU: ``voc_eval``'s, on 1-based inclusive corners with ``+ 1`` on widths and heights
  (lgd.evaluation.boxes.voc_iou).
- Matching (``voc_eval``, per class and threshold): detections in the order ``np.argsort(-score)`` gives
  (numpy's default sort, as ``voc_eval``; detections listed image by image) each look at the ground-truth box of
  their image and class with the highest IoU (the first of equals), difficult ones included. IoU strictly above
  the threshold: on a difficult box neither true nor false positive; else a true positive the first time, a false
  positive after. Otherwise a false positive.
- Recall = cumulative TP / non-difficult boxes; precision = TP / max(TP + FP, float64 eps).
- AP (``voc_ap``): the area under the precision envelope (VOC2010+), or with ``use_07_metric`` the VOC2007
  11-point mean of the best precision at recall >= ``np.arange(0.0, 1.1, 0.1)`` (0.30000000000000004, ...: the
  devkit's floats), summed ``p / 11`` one point at a time.
- Means: per threshold, the mean over classes of AP x 100 (``mAP[thresh]``); ``voc/AP`` is the mean of those 10,
  ``voc/AP50`` / ``voc/AP75`` two of them. Detectron2 reports the 11-point variant on VOC2007 (``_is_2007``), the
  area variant otherwise; we record both: ``voc/AP``, ``voc/AP50``, ``voc/AP75`` (area) and ``voc/AP_07``,
  ``voc/AP50_07``, ``voc/AP75_07`` (11-point); and per class ``voc/AP50/<class>``, ``voc/AP75/<class>``,
  ``voc/AP/<class>`` (area; AP: its mean over the thresholds).

Two differences, both outside what the VOC2007 test set exercises: a class without a non-difficult box in the
evaluated images is left out of the means (Detectron2 averages in its 0, or NaN when it has detections); and we
match the detector's scores and boxes as they are, where Detectron2's evaluator first writes them to text files
as ``{score:.3f}`` and ``{x:.1f}``.
"""
from __future__ import annotations

import numpy as np

from lgd.evaluation.boxes import Boxes, detections, ground_truth, voc_iou

IOU_THRESHOLDS = np.array([t / 100.0 for t in range(50, 100, 5)])  # AP = the mean over these; AP50, AP75 two
RECALL_POINTS_07 = np.arange(0.0, 1.1, 0.1)  # voc_ap(use_07_metric=True)
MEANS = ("voc/AP", "voc/AP50", "voc/AP75", "voc/AP_07", "voc/AP50_07", "voc/AP75_07")


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = False) -> float:
    """AP of one class from its cumulative recall and precision in score order (fractions, not percent)."""
    if use_07_metric:  # VOC2007: the mean of the best precision at recall >= 0, 0.1, ..., 1 (0 where none)
        reach = recall[None, :] >= RECALL_POINTS_07[:, None]
        best = np.max(np.where(reach, precision[None, :], 0.0), axis=1, initial=0.0)
        return float(np.cumsum(best / 11.0)[-1])
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # the envelope: best precision at this recall or beyond
    step = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[step + 1] - mrec[step]) * mpre[step + 1]))


def best_overlaps(dt: Boxes, gt: Boxes, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """For every detection: the largest IoU with a ground-truth box of its image and class (difficult ones
    included; -1 without any) and that box's index in ``gt`` (the first of equals; -1 without any)."""
    ov, best = np.full(len(dt.box), -1.0), np.full(len(dt.box), -1, dtype=np.int64)
    ds, gs = dt.starts(n_images), gt.starts(n_images)
    for i in range(n_images):  # one IoU matrix per image; not the training path
        d, g = slice(ds[i], ds[i + 1]), slice(gs[i], gs[i + 1])
        if d.start == d.stop or g.start == g.stop:
            continue
        iou = voc_iou(dt.box[d], gt.box[g])
        other = dt.label[d][:, None] != gt.label[g][None, :]
        iou[other] = -1.0
        j = iou.argmax(axis=1)
        ov[d] = iou[np.arange(len(j)), j]
        best[d] = np.where(~other[np.arange(len(j)), j], j + g.start, -1)
    return ov, best


def class_outcomes(score: np.ndarray, ov: np.ndarray, best: np.ndarray, difficult: np.ndarray,
                   thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tp, fp), each (len(thresholds), n) in ``voc_eval``'s order, for one class's ``n`` detections."""
    order = np.argsort(-score)  # voc_eval's sort, ties included
    ov, best = ov[order], best[order]
    hit = (ov[None, :] > thresholds[:, None]) & (best >= 0)[None, :]  # (T, n)
    on_difficult = hit & difficult[np.maximum(best, 0)][None, :]
    candidate = hit & ~on_difficult
    tp = np.zeros_like(hit)
    for t in range(len(thresholds)):  # the first detection (in that order) on each box is the true positive
        idx = np.flatnonzero(candidate[t])
        _, first = np.unique(best[idx], return_index=True)
        tp[t, idx[first]] = True
    return tp, ~tp & ~on_difficult


def metrics(dt: Boxes, gt: Boxes, n_images: int, class_names: list[str]) -> dict[str, float]:
    """The VOC metrics (percent) of detections ``dt`` against ``gt`` (labels 1..K for ``class_names``; ``ignore``:
    difficult) over ``n_images`` images."""
    ov, best = best_overlaps(dt, gt, n_images)
    area, eleven = {}, {}  # class -> AP x 100 per threshold
    for label, name in enumerate(class_names, 1):
        npos = int(np.sum((gt.label == label) & ~gt.ignore))
        if npos == 0:  # no box to find: left out of the means (recall is undefined)
            continue
        mine = dt.label == label
        tp, fp = class_outcomes(dt.score[mine], ov[mine], best[mine], gt.ignore, IOU_THRESHOLDS)
        ctp, cfp = np.cumsum(tp, axis=1, dtype=np.float64), np.cumsum(fp, axis=1, dtype=np.float64)
        recall = ctp / float(npos)
        precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
        area[name] = np.array([voc_ap(r, p) * 100 for r, p in zip(recall, precision)])
        eleven[name] = np.array([voc_ap(r, p, use_07_metric=True) * 100 for r, p in zip(recall, precision)])
    if not area:
        return dict.fromkeys(MEANS, 0.0)
    out = {}
    for suffix, per_class in (("", area), ("_07", eleven)):
        by_threshold = np.stack(list(per_class.values()))  # (classes, thresholds)
        m = [float(np.mean(by_threshold[:, t])) for t in range(len(IOU_THRESHOLDS))]  # evaluate's mAP[thresh]
        out.update({f"voc/AP{suffix}": float(np.mean(m)), f"voc/AP50{suffix}": m[0], f"voc/AP75{suffix}": m[5]})
    for name, aps in area.items():
        out.update({f"voc/AP/{name}": float(np.mean(aps)), f"voc/AP50/{name}": float(aps[0]),
                    f"voc/AP75/{name}": float(aps[5])})
    return out


def score(dataset, outputs: list[dict], image_ids: list[int]) -> dict[str, float]:
    """The VOC metrics of ``outputs`` (torchvision's, one per image id) against the split's boxes."""
    return metrics(detections(outputs), ground_truth(dataset, image_ids), len(image_ids), dataset.class_names)
