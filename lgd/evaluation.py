"""COCO evaluation with pycocotools: AP, AP50, AP75, APs, APm, APl for boxes (and masks for Mask R-CNN)."""
from __future__ import annotations

import contextlib
import io
from typing import Callable

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from lgd.data.coco import UnreadableImages, collate_checked

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


@torch.no_grad()
def evaluate(predict: Callable[[list[torch.Tensor], list[dict]], list[dict]], dataset, device: torch.device,
             batch_size: int = 2, max_images: int | None = None, with_masks: bool = False,
             max_unreadable_fraction: float = 0.0) -> dict[str, float]:
    """Run ``predict(images, targets)`` over ``dataset`` (a CocoDetection) and score it with COCOeval.

    Keys: ``bbox/AP`` ... and, with masks, ``segm/AP`` ...; ``data/val_unreadable_images`` counts images
    that did not decode (left out of the score; more than ``max_unreadable_fraction`` of them: DataError).
    """
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    unreadable = UnreadableImages(str(dataset.ann_file), n, max_unreadable_fraction)
    outputs, ids = [], []
    for start in range(0, n, batch_size):
        images, targets, skipped = collate_checked([dataset[i] for i in range(start, min(n, start + batch_size))])
        unreadable.add(skipped)
        if not images:
            continue
        images = [im.to(device) for im in images]
        targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        outputs += predict(images, targets)
        ids += [t["image_id"] for t in targets]
    if unreadable.exceeded:
        raise unreadable.error()
    boxes, segms = detections_to_coco(outputs, ids, dataset.label_to_cat, with_masks)
    metrics = {f"bbox/{k}": v for k, v in coco_eval(dataset.coco, boxes, "bbox", ids).items()}
    if with_masks:
        metrics.update({f"segm/{k}": v for k, v in coco_eval(dataset.coco, segms, "segm", ids).items()})
    metrics["data/val_unreadable_images"] = unreadable.count
    return metrics
