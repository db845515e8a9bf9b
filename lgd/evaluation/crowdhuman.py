"""The CrowdHuman metrics as the field's toolkit computes them (the APMR toolkit of Megvii's CrowdDet,
``lib/evaluate/APMRToolkits``: ``Database`` and ``Image``), full-body boxes, mode 0. Rule by rule:

- Boxes: [x, y, w, h] become x1y1x2y2 = (x, y, x + w, y + h) (``load_gt_boxes`` / ``load_det_boxes``). Then
  ground truth *and* detections are clipped to their image as ``Image.clip_all_boader`` does:
  x1 to [0, W - 1], y1 to [0, H - 1], x2 to [0, W], y2 to [0, H] (:func:`clip_to_image`).
- Overlaps: ``box_overlap_opr``, with 1e-6 in both denominators (lgd.evaluation.boxes.toolkit_overlaps).
- Matching (``Image.compare_caltech``, IoU 0.5): per image, detections in descending score order (ties: their
  order); each takes, among the persons not yet taken, the first one of highest IoU when that IoU is above 0.5
  (a true positive); one that takes no person but covers an ignore region (``mask`` tag or ``extra.ignore``) with
  intersection over the detection's own area above 0.5 is left out; the rest are false positives.
- Curves (``Database.compare`` / ``eval_MR`` / ``eval_AP``): the kept detections of all images in descending
  score order (a stable sort: ties keep image order, then the order within the image); after each one, recall
  = TP / persons, precision = TP / (TP + FP), miss rate = 1 - recall, FPPI = FP / images.
- ``crowdhuman/mMR``: ``eval_MR`` with ``CALTECH_-2``: at each of the 9 reference FPPI points as the toolkit
  lists them, rounded to 4 decimals (0.0100, 0.0178, 0.0316, 0.0562, 0.1000, 0.1778, 0.3162, 0.5623, 1.000; not
  10^(-2 + k/4): 777 false positives over 4370 images, FPPI 0.17780, reach 0.1778 but not 10^-0.75 = 0.17783),
  the miss rate at the first detection whose FPPI is >= the point, or at the last detection when none is;
  mMR = exp(mean(log(those 9))) (0 when one of them is 0).
- ``crowdhuman/AP``: ``eval_AP``'s ``_calculate_map``: the trapezoid area under the precision-recall points of
  the detections, from the first detection's point on (not from recall 0), summed in score order.
- ``crowdhuman/recall``: the curve's last recall (``eval_AP``'s ``rpX[-1]``).

All three in percent. Where the toolkit has no value we give one: no kept detection (it returns NaN for mMR):
mMR 100, AP 0, recall 0; no person in the split (it divides by zero): recall 0; an image without ground-truth
boxes (it fails to load one): every detection there is a false positive.
"""
from __future__ import annotations

import numpy as np

from lgd.evaluation.boxes import Boxes, detections, ground_truth, toolkit_overlaps

IOU = 0.5
# eval_MR's CALTECH_-2 reference points, 10^(-2 .. 0) in 9 steps as the toolkit writes them (4 decimals)
FPPI_POINTS = np.array([0.0100, 0.0178, 0.0316, 0.0562, 0.1000, 0.1778, 0.3162, 0.5623, 1.000])


def clip_to_image(box: np.ndarray, size: np.ndarray) -> np.ndarray:
    """x1y1x2y2 boxes clipped as ``clip_all_boader`` does; ``size``: (W, H) per box."""
    w, h = size[:, 0], size[:, 1]
    return np.stack([np.minimum(np.maximum(box[:, 0], 0), w - 1), np.minimum(np.maximum(box[:, 1], 0), h - 1),
                     np.maximum(np.minimum(box[:, 2], w), 0), np.maximum(np.minimum(box[:, 3], h), 0)], axis=1)


def match(dt: Boxes, gt: Boxes, n_images: int) -> np.ndarray:
    """Per detection (boxes already clipped): 1 true positive, 0 false positive, -1 left out (``compare_caltech``)."""
    outcome = np.zeros(len(dt.box), dtype=np.int64)
    ds, gs = dt.starts(n_images), gt.starts(n_images)
    for i in range(n_images):  # greedy in score order within an image; not the training path
        if ds[i] == ds[i + 1] or gs[i] == gs[i + 1]:
            continue  # no detection, or none to match: false positives
        d = np.arange(ds[i], ds[i + 1])[np.argsort(-dt.score[ds[i]:ds[i + 1]], kind="stable")]
        g = slice(gs[i], gs[i + 1])
        iou, ioa = toolkit_overlaps(dt.box[d], gt.box[g])
        person = ~gt.ignore[g]
        iou, ioa = iou[:, person], ioa[:, ~person]
        found = np.where((ioa > IOU).any(axis=1), -1, 0)  # without a person to take: on an ignore region or not
        rows = np.flatnonzero((iou > IOU).any(axis=1))  # only these can take a person
        if len(rows):
            # each row's persons above 0.5 by IoU, highest first, the first of equals first: walking that list to
            # the first one not taken finds what the toolkit's strict '>' scan over the untaken persons finds
            sub = iou[rows]
            ranked = np.argsort(-sub, axis=1, kind="stable")
            count = (sub > IOU).sum(axis=1)
            taken = [False] * sub.shape[1]
            for k, cand, n in zip(rows.tolist(), ranked[:, :int(count.max())].tolist(), count.tolist()):
                for j in cand[:n]:
                    if not taken[j]:
                        taken[j] = True
                        found[k] = 1
                        break
        outcome[d] = found
    return outcome


def curves(outcome: np.ndarray, score: np.ndarray, persons: int, n_images: int):
    """(recall, precision, FPPI) after each kept detection, in the toolkit's order (``Database.compare``)."""
    kept = outcome >= 0
    order = np.argsort(-score[kept], kind="stable")
    hit = outcome[kept][order] == 1
    tp, fp = np.cumsum(hit).astype(np.float64), np.cumsum(~hit).astype(np.float64)
    return tp / max(persons, 1), tp / (tp + fp), fp / max(n_images, 1)


def log_average_miss_rate(fppi: np.ndarray, miss_rate: np.ndarray) -> float:
    """``eval_MR`` (fraction): the miss rate at the first FPPI >= each reference point (the last when none is),
    their geometric mean. No detection: 1 (the toolkit: NaN)."""
    if not len(fppi):
        return 1.0
    at = np.minimum(np.searchsorted(fppi, FPPI_POINTS, side="left"), len(fppi) - 1)  # fppi never decreases
    with np.errstate(divide="ignore"):
        return float(np.exp(np.log(miss_rate[at]).mean()))


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """``_calculate_map`` (fraction): trapezoids between consecutive points, summed in order (a cumulative sum
    adds them one by one, as its loop)."""
    if len(recall) < 2:
        return 0.0
    return float(np.cumsum((recall[1:] - recall[:-1]) * ((precision[:-1] + precision[1:]) / 2))[-1])


def metrics(dt: Boxes, gt: Boxes, sizes: np.ndarray) -> dict[str, float]:
    """The three metrics (percent) of detections ``dt`` against ``gt`` over the images of ``sizes`` ((W, H) each,
    in the order of the boxes' image indices); boxes unclipped, as loaded."""
    n_images = len(sizes)
    sizes = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
    gt = Boxes(gt.image, clip_to_image(gt.box, sizes[gt.image]), gt.label, gt.score, gt.ignore)
    dt = Boxes(dt.image, clip_to_image(dt.box, sizes[dt.image]), dt.label, dt.score, dt.ignore)
    recall, precision, fppi = curves(match(dt, gt, n_images), dt.score, int(np.sum(~gt.ignore)), n_images)
    return {"crowdhuman/AP": 100.0 * average_precision(recall, precision),
            "crowdhuman/recall": 100.0 * (float(recall[-1]) if len(recall) else 0.0),
            "crowdhuman/mMR": 100.0 * log_average_miss_rate(fppi, 1.0 - recall)}


def score(dataset, outputs: list[dict], image_ids: list[int]) -> dict[str, float]:
    """The CrowdHuman metrics of ``outputs`` (torchvision's, one per image id) against the split's boxes."""
    sizes = np.array([[dataset.coco.imgs[i]["width"], dataset.coco.imgs[i]["height"]] for i in image_ids],
                     dtype=np.float64).reshape(-1, 2)
    return metrics(detections(outputs), ground_truth(dataset, image_ids), sizes)
