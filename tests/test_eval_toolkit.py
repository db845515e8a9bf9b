"""The CrowdHuman and VOC metrics against the field's reference code: one hand-made case per rule (values computed by
hand in the comments), then ~200 seeded random cases each against a plain loop-by-loop statement of the reference
algorithm written below: the CrowdHuman toolkit (CrowdDet's APMRToolkits: ``Image.load`` / ``clip_all_boader`` /
``compare_caltech`` / ``box_overlap_opr``, ``Database.compare`` / ``eval_MR`` / ``eval_AP``) and Detectron2's
``voc_eval`` / ``voc_ap`` with ``PascalVOCDetectionEvaluator.evaluate``'s thresholds and means."""
import math
import warnings

import numpy as np
import pytest

from lgd.evaluation import crowdhuman, voc
from lgd.evaluation.boxes import Boxes, toolkit_overlaps, voc_iou


# --- the reference algorithms, loop by loop ------------------------------------------------------------------------
def toolkit(images):
    """The CrowdHuman toolkit on ``images``: (W, H, gt [(x, y, w, h, tag)], dt [(x, y, w, h, score)]), tag 1 for a
    person, -1 for an ignore region. Returns (AP, mMR, last recall) as fractions; mMR NaN without a kept detection."""
    def clip(b, w, h):
        b[0] = min(max(b[0], 0), w - 1)
        b[1] = min(max(b[1], 0), h - 1)
        b[2] = max(min(b[2], w), 0)
        b[3] = max(min(b[3], h), 0)

    def overlap(d, g, iou):
        inter = max(0.0, min(d[2], g[2]) - max(d[0], g[0])) * max(0.0, min(d[3], g[3]) - max(d[1], g[1]))
        area_d = (d[2] - d[0]) * (d[3] - d[1])
        if not iou:
            return inter / (area_d + 1e-6)
        return inter / (area_d + (g[2] - g[0]) * (g[3] - g[1]) - inter + 1e-6)

    n_gt = n_ign = 0
    scorelist = []  # (score, 1 TP / 0 FP) in the order compare_caltech adds them, image by image
    for w, h, gts, dts in images:
        gt = [[x, y, x + bw, y + bh, tag] for x, y, bw, bh, tag in gts]
        dt = [[x, y, x + bw, y + bh, s] for x, y, bw, bh, s in dts]
        n_gt += len(gt)
        n_ign += sum(1 for b in gt if b[4] == -1)
        for b in gt + dt:
            clip(b, w, h)
        dt = sorted(dt, key=lambda b: b[4], reverse=True)
        gt = sorted(gt, key=lambda b: b[4], reverse=True)
        matched = [False] * len(gt)
        for d in dt:
            pos, best = -1, 0.5
            for j, g in enumerate(gt):
                if matched[j]:
                    continue
                if g[4] > 0:
                    o = overlap(d, g, True)
                    if o > best:
                        pos, best = j, o
                elif pos >= 0:
                    break
                else:
                    o = overlap(d, g, False)
                    if o > 0.5:
                        pos, best = j, o
            if pos >= 0 and gt[pos][4] > 0:
                matched[pos] = True
                scorelist.append((d[4], 1))
            elif pos < 0:
                scorelist.append((d[4], 0))
    scorelist.sort(key=lambda item: item[0], reverse=True)
    tp = fp = 0.0
    recall, precision, fppi, miss = [], [], [], []
    for _, hit in scorelist:
        tp, fp = tp + hit, fp + (1 - hit)
        fn = (n_gt - n_ign) - tp
        recall.append(tp / (tp + fn))
        precision.append(tp / (tp + fp))
        fppi.append(fp / len(images))
        miss.append(1.0 - recall[-1])
    at = []
    for ref in [0.0100, 0.0178, 0.03160, 0.0562, 0.1000, 0.1778, 0.3162, 0.5623, 1.000]:
        at.append(next((i for i, f in enumerate(fppi) if f >= ref), len(fppi) - 1))
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # no kept detection: the mean of nothing, NaN
        mmr = float(np.exp(np.log(np.array([miss[i] for i in at if i >= 0])).mean()))
    ap = 0
    for i in range(1, len(recall)):
        ap += (recall[i] - recall[i - 1]) * ((precision[i - 1] + precision[i]) / 2)
    return ap, mmr, (recall[-1] if recall else 0.0)


def voc_reference(images, dets, n_classes):
    """Detectron2's VOC evaluation. images: per image [(class, xmin, ymin, xmax, ymax, difficult)] as the XML's
    integers; dets: (image, class, score, x1, y1, x2, y2) in the detector's coordinates, image by image, written
    as the evaluator writes them (xmin + 1, ymin + 1). Returns {class: (area APs, 11-point APs)} x 100 per
    threshold, for the classes with a non-difficult box."""
    def ap_of(rec, prec, use_07):
        if use_07:
            ap = 0.0
            for t in np.arange(0.0, 1.1, 0.1):
                p = 0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
                ap = ap + p / 11.0
            return ap
        mrec = np.concatenate(([0.0], rec, [1.0]))
        mpre = np.concatenate(([0.0], prec, [0.0]))
        for i in range(mpre.size - 1, 0, -1):
            mpre[i - 1] = max(mpre[i - 1], mpre[i])
        i = np.where(mrec[1:] != mrec[:-1])[0]
        return np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])

    out = {}
    for c in range(1, n_classes + 1):
        mine = [d for d in dets if d[1] == c]
        image_ids = [d[0] for d in mine]
        confidence = np.array([d[2] for d in mine])
        bb_all = np.array([[d[3] + 1, d[4] + 1, d[5], d[6]] for d in mine]).reshape(-1, 4)
        order = np.argsort(-confidence)
        bb_all, image_ids = bb_all[order, :], [image_ids[k] for k in order]
        npos = sum(1 for objs in images for o in objs if o[0] == c and not o[5])
        if npos == 0:
            continue
        boxes = [np.array([o[1:5] for o in objs if o[0] == c], dtype=float).reshape(-1, 4) for objs in images]
        best = []  # (ovmax, jmax) per detection: voc_eval's overlaps, which no threshold changes
        for d in range(len(mine)):
            g, bb, ovmax, jmax = boxes[image_ids[d]], bb_all[d], -np.inf, -1
            if g.size > 0:
                iw = np.maximum(np.minimum(g[:, 2], bb[2]) - np.maximum(g[:, 0], bb[0]) + 1.0, 0.0)
                ih = np.maximum(np.minimum(g[:, 3], bb[3]) - np.maximum(g[:, 1], bb[1]) + 1.0, 0.0)
                inters = iw * ih
                uni = ((bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
                       + (g[:, 2] - g[:, 0] + 1.0) * (g[:, 3] - g[:, 1] + 1.0) - inters)
                overlaps = inters / uni
                ovmax, jmax = np.max(overlaps), np.argmax(overlaps)
            best.append((ovmax, jmax))
        aps = ([], [])
        for thresh in range(50, 100, 5):
            recs = [{"difficult": [bool(o[5]) for o in objs if o[0] == c],
                     "det": [False] * sum(1 for o in objs if o[0] == c)} for objs in images]
            tp, fp = np.zeros(len(mine)), np.zeros(len(mine))
            for d in range(len(mine)):
                r, (ovmax, jmax) = recs[image_ids[d]], best[d]
                if ovmax > thresh / 100.0:
                    if not r["difficult"][jmax]:
                        if not r["det"][jmax]:
                            tp[d], r["det"][jmax] = 1.0, True
                        else:
                            fp[d] = 1.0
                else:
                    fp[d] = 1.0
            fp, tp = np.cumsum(fp), np.cumsum(tp)
            rec, prec = tp / float(npos), tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
            aps[0].append(ap_of(rec, prec, False) * 100)
            aps[1].append(ap_of(rec, prec, True) * 100)
        out[c] = aps
    return out


def voc_reference_means(per_class):
    """evaluate's means: per threshold over the classes, then over the thresholds."""
    res = {}
    for k, suffix in ((0, ""), (1, "_07")):
        m = {t: np.mean([aps[k][t] for aps in per_class.values()]) for t in range(10)}
        res.update({f"voc/AP{suffix}": np.mean(list(m.values())), f"voc/AP50{suffix}": m[0],
                    f"voc/AP75{suffix}": m[5]})
    return res


# --- building our inputs from the same cases ----------------------------------------------------------------------
def _boxes(image, box, label, score, ignore):
    return Boxes(image=np.array(image, dtype=np.int64), box=np.array(box, dtype=np.float64).reshape(-1, 4),
                 label=np.array(label, dtype=np.int64), score=np.array(score, dtype=np.float64),
                 ignore=np.array(ignore, dtype=bool))


def ours_crowd(images):
    """crowdhuman.metrics on the toolkit's input (x, y, w, h boxes), as fractions (AP, mMR, recall)."""
    gt = [(i, (x, y, x + w, y + h), t == -1) for i, (_, _, gts, _) in enumerate(images) for x, y, w, h, t in gts]
    dt = [(i, (x, y, x + w, y + h), s) for i, (_, _, _, dts) in enumerate(images) for x, y, w, h, s in dts]
    m = crowdhuman.metrics(
        _boxes([d[0] for d in dt], [d[1] for d in dt], [1] * len(dt), [d[2] for d in dt], [False] * len(dt)),
        _boxes([g[0] for g in gt], [g[1] for g in gt], [1] * len(gt), [1.0] * len(gt), [g[2] for g in gt]),
        np.array([[w, h] for w, h, _, _ in images], dtype=np.float64))
    return m["crowdhuman/AP"] / 100, m["crowdhuman/mMR"] / 100, m["crowdhuman/recall"] / 100


def ours_voc(images, dets, n_classes):
    gt = [(i, o) for i, objs in enumerate(images) for o in objs]
    return voc.metrics(
        _boxes([d[0] for d in dets], [d[3:] for d in dets], [d[1] for d in dets], [d[2] for d in dets],
               [False] * len(dets)),
        _boxes([i for i, _ in gt], [(o[1] - 1, o[2] - 1, o[3], o[4]) for _, o in gt], [o[0] for _, o in gt],
               [1.0] * len(gt), [bool(o[5]) for _, o in gt]), len(images), [f"c{c}" for c in range(1, n_classes + 1)])


# --- CrowdHuman: one rule per case ---------------------------------------------------------------------------------
def test_fppi_points_are_the_toolkits_rounded_ones_777_false_positives_over_4370_images():
    # 4370 images (CrowdHuman val); persons in images 0 and 1. In score order: 777 false positives (image 2), a true
    # positive on the person of image 0, a 778th false positive. FPPI after the 777th: 777/4370 = 0.177803...
    # The toolkit's points 0.0100 .. 0.1000 are reached at 44, 78, 139, 246, 437 false positives, 0.1778 at the
    # 777th (0.177803 >= 0.1778): all before the true positive, miss rate 1. 0.3162, 0.5623, 1 are never reached
    # (the last FPPI is 778/4370 = 0.178): the last detection's miss rate, 1/2.
    # mMR = exp((6 ln 1 + 3 ln 1/2) / 9) = 2^(-1/3) = 79.37%. With the exact 10^-0.75 = 0.177828 (our code before)
    # that point waits for the 778th false positive, after the true positive: 2^(-4/9) = 73.49%.
    # AP: points (0, 0) x 777, (1/2, 1/778), (1/2, 1/779): one trapezoid 1/2 * (0 + 1/778) / 2 = 1/3112.
    images = [(100, 100, [(0, 0, 10, 10, 1)], []), (100, 100, [(0, 0, 10, 10, 1)], [])]
    images += [(100, 100, [], []) for _ in range(4368)]
    images[0][3].append((0, 0, 10, 10, 0.5))
    images[2][3].extend((50, 50, 10, 10, s) for s in np.linspace(0.99, 0.6, 777))
    images[2][3].append((50, 50, 10, 10, 0.4))
    ap, mmr, recall = ours_crowd(images)
    assert mmr == pytest.approx(2 ** (-1 / 3), abs=1e-12) and recall == 0.5
    assert ap == pytest.approx(1 / 3112, abs=1e-15)
    # the same curve read at the unrounded points gives the old value
    gt = _boxes([0, 1], [(0, 0, 10, 10)] * 2, [1, 1], [1, 1], [False, False])
    dt = _boxes([0] + [2] * 778, [(0, 0, 10, 10)] + [(50, 50, 60, 60)] * 778, [1] * 779,
                [0.5, *np.linspace(0.99, 0.6, 777), 0.4], [False] * 779)
    rec, _, fppi = crowdhuman.curves(crowdhuman.match(dt, gt, 4370), dt.score, 2, 4370)
    at = np.minimum(np.searchsorted(fppi, np.power(10.0, np.linspace(-2, 0, 9))), len(fppi) - 1)
    assert np.exp(np.log(1 - rec[at]).mean()) == pytest.approx(2 ** (-4 / 9))
    assert crowdhuman.FPPI_POINTS[5] == 0.1778 and 777 / 4370 >= 0.1778 > 777 / 4370 - 1e-5


def test_ap_is_the_toolkits_trapezoids_from_the_first_detection():
    # 2 persons, both found (scores 0.9, 0.8): points (1/2, 1), (1, 1); the toolkit's area starts at the first
    # point: 1/2 * 1 = 0.5 (a perfect detector over P persons gets (P - 1) / P). Then TP, FP, TP over 4 persons:
    # (1/4, 1), (1/4, 1/2), (1/2, 2/3): 0 + 1/4 * (1/2 + 2/3) / 2 = 7/48.
    two = [(64, 48, [(0, 0, 10, 10, 1), (20, 0, 10, 10, 1)], [(0, 0, 10, 10, 0.9), (20, 0, 10, 10, 0.8)])]
    ap, mmr, recall = ours_crowd(two)
    assert (ap, mmr, recall) == (0.5, 0.0, 1.0)
    four = [(64, 48, [(10 * k, 0, 8, 10, 1) for k in range(4)],
             [(0, 0, 8, 10, 0.9), (40, 30, 8, 10, 0.8), (10, 0, 8, 10, 0.7)])]
    assert ours_crowd(four)[0] == pytest.approx(7 / 48, abs=1e-15)
    assert crowdhuman.average_precision(np.array([0.5]), np.array([1.0])) == 0.0  # one point: no area


def test_boxes_are_clipped_to_w_minus_1_and_h_minus_1_for_x1_y1():
    size = np.array([[64.0, 48.0]] * 3)
    box = np.array([[-3, 50, 70, 60], [63.5, 47.2, 63.9, 47.9], [10, -1, -2, 49]], dtype=np.float64)
    assert crowdhuman.clip_to_image(box, size).tolist() == [[0, 47, 64, 48], [63, 47, 63.9, 47.9], [10, 0, 0, 48]]
    # a person at x 62.5..64 (the right edge) and a detection starting past W - 1 (x 63.5..80): the detection
    # becomes x 63..64, IoU 48/72 = 2/3 with the person: a true positive. Clipped to W only (x 63.5..64) it was
    # 24/72 = 1/3, a miss (our code before did not clip detections at all: IoU 0.03).
    case = [(64, 48, [(62.5, 0, 1.5, 48, 1)], [(63.5, 0, 16.5, 48, 0.9)])]
    assert ours_crowd(case) == toolkit(case) == (0, 0.0, 1.0)
    # ground truth too: a person at x 63.5..73.5 becomes 63..64 (before: 63.5..64), so a detection on x 63..64
    # is a true positive (IoU 20 / (20 + 20 - 20 + 1e-6)), where it was 10/20 = 0.5: not above 0.5
    case = [(64, 48, [(63.5, 10, 10, 20, 1)], [(63, 10, 1, 20, 0.9)])]
    assert ours_crowd(case)[2] == 1.0 == toolkit(case)[2]


def test_overlap_denominators_carry_the_toolkits_1e_minus_6():
    # person 0..1 x 0..1 (area 1); detection 0..1 x 0..1.9999992: exact IoU 1/1.9999992 = 0.5000002 > 0.5,
    # with the toolkit's 1e-6: 1/2.0000002 = 0.49999995, not above 0.5: a false positive, the person missed
    d, g = np.array([[0, 0, 1, 1.9999992]]), np.array([[0, 0, 1, 1.0]])
    iou, ioa = toolkit_overlaps(d, g)
    assert iou[0, 0] == 1 / (1.9999992 + 1 - 1 + 1e-6) < 0.5 < 1 / 1.9999992
    assert ioa[0, 0] == 1 / (1.9999992 + 1e-6)
    case = [(64, 48, [(0, 0, 1, 1, 1)], [(0, 0, 1, 1.9999992, 0.9)])]
    assert ours_crowd(case) == toolkit(case) == (0, 1.0, 0.0)
    # the same for an ignore region (IoA): a detection 0..1.9999992 x 0..1 on a 1x1 region, IoA 1/1.9999992 > 0.5
    # exactly, 1/(1.9999992 + 1e-6) < 0.5 with it: a false positive (0.9), not left out, before the true positive
    # on the person (0.8): points (0, 0), (1, 1/2), AP = 1 * (0 + 1/2) / 2 = 1/4 (left out, it would be 0)
    case = [(64, 48, [(30, 30, 5, 5, 1), (0, 0, 1, 1, -1)], [(0, 0, 1.9999992, 1, 0.9), (30, 30, 5, 5, 0.8)])]
    assert ours_crowd(case) == toolkit(case) == (0.25, 1.0, 1.0)


# --- VOC: one rule per case ---------------------------------------------------------------------------------------
def test_voc_thresholds_are_exact_decimals_and_iou_0_9_is_no_hit_at_0_9():
    assert voc.IOU_THRESHOLDS.tolist() == [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]
    assert np.linspace(0.5, 0.95, 10)[8] == 0.8999999999999999  # the old thresholds' drift
    # ground truth (XML) 1..10 x 1..10 -> 0..10 x 0..10 here (100 px²); detection 0..10 x 0..9 (90 px²):
    # IoU 90/100, the float 0.9 exactly (in voc_eval's +1 arithmetic too)
    assert voc_iou(np.array([[0, 0, 10, 9.0]]), np.array([[0, 0, 10, 10.0]]))[0, 0] == 0.9
    images, dets = [[(1, 1, 1, 10, 10, 0)]], [(0, 1, 0.9, 0, 0, 10, 9)]
    m = ours_voc(images, dets, 1)
    # a hit at 0.50 .. 0.85 (8 thresholds), none at 0.9 (0.9 > 0.9 is false) and 0.95: AP 80, AP75 100
    # (with linspace's 0.8999999999999999 it was a hit at 9 thresholds: AP 90)
    assert (m["voc/AP"], m["voc/AP50"], m["voc/AP75"]) == (80.0, 100.0, 100.0)
    assert m["voc/AP_07"] == pytest.approx(80.0)  # 11 x (1/11) sums to 1.0000000000000002, as voc_ap's loop
    ref = voc_reference(images, dets, 1)
    assert m["voc/AP/c1"] == np.mean(ref[1][0]) == 80.0


def test_voc_07_points_are_the_devkits_arange():
    # recall 3/10 = 0.3 is below np.arange's 0.30000000000000004: 10 boxes, 3 found with precision 1, then none.
    # 11-point AP: recall >= 0, 0.1, 0.2 -> 1; >= 0.30000000000000004 -> none (0): 3/11
    rec, prec = np.array([0.1, 0.2, 0.3]), np.array([1.0, 1.0, 1.0])
    assert voc.voc_ap(rec, prec, use_07_metric=True) == 3 / 11
    assert voc.voc_ap(rec, prec) == pytest.approx(0.3)


# --- ~200 random cases each against the loop-by-loop statements ---------------------------------------------------
def _random_crowd(rng):
    images = []
    for _ in range(int(rng.integers(1, 5))):
        w, h = (int(v) for v in rng.integers(20, 80, 2))
        gts = []
        for _ in range(int(rng.integers(1, 6))):  # the toolkit needs a box in every image
            bw, bh = rng.uniform(2, 30, 2).round(int(rng.integers(0, 3)))
            x, y = rng.uniform(-8, w + 4), rng.uniform(-8, h + 4)
            gts.append((float(x), float(y), float(bw), float(bh), -1 if rng.random() < 0.25 else 1))
        if rng.random() < 0.3:  # two persons on the same box: ties in IoU (the first of equals is taken first)
            gts.append(gts[0][:4] + (1,))
        dts = []
        for _ in range(int(rng.integers(0, 9))):
            s = float(rng.choice([0.3, 0.5, 0.7, 0.9])) if rng.random() < 0.5 else float(rng.random())
            if gts and rng.random() < 0.7:  # near a box (maybe on the image's edge)
                x, y, bw, bh, _ = gts[int(rng.integers(len(gts)))]
                j = rng.normal(0, 2, 4)
                dts.append((x + j[0], y + j[1], max(bw + j[2], 0.5), max(bh + j[3], 0.5), s))
            else:
                dts.append((float(rng.uniform(-5, w)), float(rng.uniform(-5, h)),
                            *(float(v) for v in rng.uniform(1, 40, 2)), s))
        images.append((w, h, gts, dts))
    if not any(t == 1 for _, _, gts, _ in images for *_, t in gts):
        images[0][2].append((1.0, 1.0, 5.0, 5.0, 1))  # at least one person (the toolkit divides by their number)
    return images


def test_crowdhuman_equals_the_toolkit_on_200_random_cases():
    rng = np.random.default_rng(2022)
    nan_cases = 0
    for case in range(200):
        images = _random_crowd(rng)
        ap, mmr, recall = ours_crowd(images)
        ref_ap, ref_mmr, ref_recall = toolkit(images)
        assert ap == pytest.approx(ref_ap, abs=1e-6) and recall == pytest.approx(ref_recall, abs=1e-6), case
        if math.isnan(ref_mmr):  # no kept detection: the toolkit's NaN, our 1
            nan_cases += 1
            assert mmr == 1.0, case
        else:
            assert mmr == pytest.approx(ref_mmr, abs=1e-6), case
    assert nan_cases < 20


def _random_voc(rng, n_classes=3):
    images, dets = [], []
    for i in range(int(rng.integers(1, 5))):
        objs = []
        for _ in range(int(rng.integers(0, 5))):
            x1, y1 = (int(v) for v in rng.integers(1, 60, 2))
            x2, y2 = x1 + int(rng.integers(0, 30)), y1 + int(rng.integers(0, 30))
            objs.append((int(rng.integers(1, n_classes + 1)), x1, y1, x2, y2, int(rng.random() < 0.2)))
        if objs and rng.random() < 0.3:  # the same box twice: ties in IoU, one of them maybe difficult
            objs.append(objs[0][:5] + (int(rng.random() < 0.5),))
        images.append(objs)
        for _ in range(int(rng.integers(0, 7))):
            s = float(rng.choice([0.3, 0.5, 0.7, 0.9])) if rng.random() < 0.5 else float(rng.random())
            if objs and rng.random() < 0.7:
                c, x1, y1, x2, y2, _ = objs[int(rng.integers(len(objs)))]
                j = rng.normal(0, 1.5, 4)
                b = (x1 - 1 + j[0], y1 - 1 + j[1], x2 + j[2], y2 + j[3])
                c = c if rng.random() < 0.85 else int(rng.integers(1, n_classes + 1))
            else:
                x1, y1 = rng.uniform(0, 60, 2)
                b, c = (x1, y1, x1 + rng.uniform(1, 30), y1 + rng.uniform(1, 30)), int(rng.integers(1, n_classes + 1))
            dets.append((i, c, s, *(float(v) for v in b)))
    if not any(not o[5] for objs in images for o in objs):
        images[0].append((1, 5, 5, 20, 20, 0))
    return images, dets


def test_voc_equals_detectron2s_voc_eval_on_200_random_cases():
    rng = np.random.default_rng(7)
    for case in range(200):
        images, dets = _random_voc(rng)
        ours, ref = ours_voc(images, dets, 3), voc_reference(images, dets, 3)
        expected = voc_reference_means(ref)
        for c, (area, _) in ref.items():
            expected.update({f"voc/AP/c{c}": np.mean(area), f"voc/AP50/c{c}": area[0], f"voc/AP75/c{c}": area[5]})
        assert ours.keys() == expected.keys(), case
        for k, v in expected.items():
            assert ours[k] == pytest.approx(v, abs=1e-6), (case, k)
