"""Evaluation on a validation split: run the detector over it, then score with the protocol of the format the split
was read from (``dataset.format``): COCO (``bbox/``, ``segm/``), Pascal VOC (``voc/``), CrowdHuman (``crowdhuman/``)."""
from __future__ import annotations

from typing import Callable

import torch

from lgd.data.coco import UnreadableImages, collate_checked
from lgd.evaluation import coco, crowdhuman, voc
from lgd.evaluation.coco import METRIC_NAMES, coco_eval, detections_to_coco

__all__ = ["METRIC_NAMES", "coco_eval", "detections_to_coco", "evaluate", "score"]


def score(dataset, outputs: list[dict], image_ids: list[int], with_masks: bool = False) -> dict[str, float]:
    """The metrics of ``outputs`` (one per image id) by the protocol of ``dataset.format``."""
    fmt = getattr(dataset, "format", "coco")
    if fmt == "voc":
        return voc.score(dataset, outputs, image_ids)
    if fmt == "crowdhuman":
        return crowdhuman.score(dataset, outputs, image_ids)
    return coco.score(dataset, outputs, image_ids, with_masks)


@torch.no_grad()
def evaluate(predict: Callable[[list[torch.Tensor], list[dict]], list[dict]], dataset, device: torch.device,
             batch_size: int = 2, max_images: int | None = None, with_masks: bool = False,
             max_unreadable_fraction: float = 0.0) -> dict[str, float]:
    """Run ``predict(images, targets)`` over ``dataset`` (a CocoDetection) and score it (:func:`score`).

    Keys: ``bbox/AP`` ... (with masks ``segm/AP`` ...), ``voc/AP50`` ... or ``crowdhuman/mMR`` ... by the split's
    format; ``data/val_unreadable_images`` counts images that did not decode (left out of the score; more than
    ``max_unreadable_fraction`` of them: DataError).
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
    metrics = score(dataset, outputs, ids, with_masks)
    metrics["data/val_unreadable_images"] = unreadable.count
    return metrics
