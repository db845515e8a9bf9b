"""The CrowdHuman protocol (its benchmark toolkit, full-body boxes): per image, detections in score order take the
unmatched person box they overlap most with IoU > 0.5 (a true positive); one that matches none but covers an
ignore region with intersection over the detection's area > 0.5 is left out; the rest are false positives.
Ground-truth boxes are clipped to their image first, as the toolkit does.

Recorded (percent): ``crowdhuman/mMR``, the log-average miss rate at 9 FPPI points evenly spaced in log space in
[1e-2, 1] (at each point, the miss rate where the false positives per image first reach it; lower is better),
``crowdhuman/AP`` (IoU 0.5: the trapezoid area under precision-recall in score order, from recall 0 at the first
detection's precision; the toolkit starts at the first detection's recall, which differs by at most
1 / number of persons), and ``crowdhuman/recall`` (all detections).
"""
from __future__ import annotations

import numpy as np

from lgd.evaluation.boxes import Boxes, detections, ground_truth, overlaps

IOU = 0.5
FPPI_POINTS = np.power(10.0, np.linspace(-2.0, 0.0, 9))


def match(dt: Boxes, gt: Boxes, n_images: int) -> np.ndarray:
    """Per detection: 1 true positive, 0 false positive, -1 left out (on an ignore region)."""
    outcome = np.zeros(len(dt.box), dtype=np.int64)
    ds, gs = dt.starts(n_images), gt.starts(n_images)
    for i in range(n_images):  # greedy in score order within an image, as the toolkit; not the training path
        d = np.arange(ds[i], ds[i + 1])[np.argsort(-dt.score[ds[i]:ds[i + 1]], kind="stable")]
        g = slice(gs[i], gs[i + 1])
        if not len(d) or g.start == g.stop:
            continue
        iou, ioa = overlaps(dt.box[d], gt.box[g])
        ignore = gt.ignore[g]
        iou[:, ignore] = -1.0
        ioa = ioa[:, ignore]
        taken = np.zeros(g.stop - g.start, dtype=bool)
        for k in range(len(d)):
            row = np.where(taken, -1.0, iou[k])
            j = int(row.argmax())
            if row[j] > IOU:
                taken[j] = True
                outcome[d[k]] = 1
            elif ioa.shape[1] and ioa[k].max() > IOU:
                outcome[d[k]] = -1
    return outcome


def log_average_miss_rate(fppi: np.ndarray, miss_rate: np.ndarray) -> float:
    """mMR (fraction) from the curve in score order: at each FPPI point the miss rate where FPPI first reaches it
    (the curve's last point when it never does); the geometric mean of the 9 (0 when one of them is 0)."""
    if not len(fppi):
        return 1.0
    at = np.searchsorted(fppi, FPPI_POINTS, side="left")  # fppi never decreases: the first index with fppi >= point
    rates = miss_rate[np.minimum(at, len(fppi) - 1)]
    if np.any(rates <= 0):
        return 0.0
    return float(np.exp(np.mean(np.log(rates))))


def score(dataset, outputs: list[dict], image_ids: list[int]) -> dict[str, float]:
    """The CrowdHuman metrics of ``outputs`` (torchvision's, one per image id) against the split's boxes."""
    gt, dt = ground_truth(dataset, image_ids), detections(outputs)
    sizes = np.array([[dataset.coco.imgs[i]["width"], dataset.coco.imgs[i]["height"]] for i in image_ids],
                     dtype=np.float64).reshape(-1, 2)
    if len(gt.box):
        gt.box = np.clip(gt.box, 0.0, np.tile(sizes[gt.image], 2))
    outcome = match(dt, gt, len(image_ids))
    persons = int(np.sum(~gt.ignore))
    kept = outcome >= 0
    order = np.argsort(-dt.score[kept], kind="stable")
    tp = np.cumsum(outcome[kept][order] == 1)
    fp = np.cumsum(outcome[kept][order] == 0)
    recall = tp / max(persons, 1)
    precision = tp / np.maximum(tp + fp, 1)
    ap = 0.0
    if len(tp):
        r = np.concatenate([[0.0], recall])
        p = np.concatenate([[precision[0]], precision])
        ap = float(np.sum((r[1:] - r[:-1]) * (p[1:] + p[:-1]) / 2))
    mmr = log_average_miss_rate(fp / max(len(image_ids), 1), 1.0 - recall)
    return {"crowdhuman/AP": 100.0 * ap, "crowdhuman/recall": 100.0 * (float(recall[-1]) if len(tp) else 0.0),
            "crowdhuman/mMR": 100.0 * mmr}
