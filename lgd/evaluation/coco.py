"""The COCO protocol with pycocotools: AP, AP50, AP75, APs, APm, APl for boxes (and masks for Mask R-CNN),
recorded as ``bbox/<name>`` and ``segm/<name>``."""
from __future__ import annotations

import contextlib
import io

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def detections_to_coco(outputs: list[dict], image_ids: list[int], label_to_cat: dict[int, int],
                       with_masks: bool = False) -> tuple[list[dict], list[dict]]:
    """torchvision outputs (x1y1x2y2, original image size) -> COCO result lists for bbox and segm."""
    boxes, segms = [], []
    for out, img_id in zip(outputs, image_ids):
        b = out["boxes"].detach().cpu().numpy()
        if not len(b):
            continue
        xywh = np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1)
        scores = out["scores"].detach().cpu().numpy().tolist()
        cats = [label_to_cat[int(l)] for l in out["labels"].detach().cpu().tolist()]
        boxes += [{"image_id": int(img_id), "category_id": c, "bbox": [float(v) for v in box], "score": s}
                  for box, c, s in zip(xywh.tolist(), cats, scores)]
        if with_masks and "masks" in out:
            m = (out["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
            rles = mask_utils.encode(np.asfortranarray(m.transpose(1, 2, 0)))
            for rle, c, s in zip(rles, cats, scores):
                rle["counts"] = rle["counts"].decode("ascii")
                segms.append({"image_id": int(img_id), "category_id": c, "segmentation": rle, "score": s})
    return boxes, segms


def coco_eval(gt: COCO, results: list[dict], iou_type: str, image_ids: list[int] | None = None) -> dict[str, float]:
    """COCOeval summary in percent; no detections at all gives 0 for every metric."""
    if not results:
        return {k: 0.0 for k in METRIC_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iou_type)
        if image_ids is not None:
            ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: float(max(v, 0.0) * 100.0) for k, v in zip(METRIC_NAMES, ev.stats[:6])}


def score(dataset, outputs: list[dict], image_ids: list[int], with_masks: bool = False) -> dict[str, float]:
    """COCOeval of ``outputs`` (torchvision's, one per image id) against ``dataset.coco``: ``bbox/AP`` ... and,
    with masks, ``segm/AP`` ..."""
    boxes, segms = detections_to_coco(outputs, image_ids, dataset.label_to_cat, with_masks)
    metrics = {f"bbox/{k}": v for k, v in coco_eval(dataset.coco, boxes, "bbox", image_ids).items()}
    if with_masks:
        metrics.update({f"segm/{k}": v for k, v in coco_eval(dataset.coco, segms, "segm", image_ids).items()})
    return metrics
