"""COCO-format detection dataset read through pycocotools, with the filters a real dataset needs."""
from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from lgd.data.check import DataError, SplitCheck, check_dataset, check_split, fixes_summary
from lgd.data.images import UNREADABLE, decode_rgb

log = logging.getLogger(__name__)
__all__ = ["CocoDetection", "DataError", "FilterStats", "UnreadableImages", "collate", "collate_checked",
           "load_datasets"]


@dataclass
class FilterStats:
    """What the check fixed and the reader dropped or changed, reported in the log and recorded in MLflow."""
    images: int = 0
    images_kept: int = 0
    images_without_objects: int = 0
    crowd_annotations: int = 0
    degenerate_boxes: int = 0
    clipped_boxes: int = 0
    truncated_objects: int = 0
    filled_areas: int = 0  # the fixes of lgd.data.check (FIXES)
    filled_iscrowd: int = 0
    exif_oriented_images: int = 0
    high_depth_images: int = 0
    converted_images: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def _index(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


@dataclass
class CocoDetection(torch.utils.data.Dataset):
    """Images as float tensors in [0, 1] (C, H, W) and targets {boxes x1y1x2y2, labels 1..K[, masks]}.

    The split is checked first (:func:`lgd.data.check.check_split`, or ``checked`` when the caller ran it):
    a refused defect raises :class:`DataError` before any training starts, fixes are counted. Category ids
    of any values map to contiguous labels 1..K (``label_to_cat`` maps back). Crowd annotations are
    ignored, degenerate boxes dropped, boxes clipped to the image, and for training images left without
    objects are skipped; each is counted in ``stats`` (``crowd_annotations`` also counts VOC's difficult objects
    and CrowdHuman's ignore regions). Images are decoded like detection libraries do
    (:func:`lgd.data.images.decode_rgb`); one that does not decode comes back as ``(None, {"image_id",
    "unreadable"})`` for :func:`collate_checked` to skip and count.
    """
    image_dir: str
    ann_file: str
    train: bool = True
    with_masks: bool = False
    max_objects: int = 300
    stats: FilterStats = field(default_factory=FilterStats)
    checked: Optional[SplitCheck] = field(default=None, repr=False)
    # the format the split was read from (lgd.data.voc / lgd.data.crowdhuman convert theirs to this COCO form,
    # VOC difficult objects and CrowdHuman ignore regions as iscrowd); it picks the metric (lgd.evaluation)
    format: str = "coco"

    def __post_init__(self):
        ann_path, img_dir = Path(self.ann_file), Path(self.image_dir)
        checked = self.checked or check_split(img_dir, ann_path)
        self.coco = _index(checked.dataset)
        cat_ids = sorted(c["id"] for c in self.coco.dataset["categories"])
        self.cat_to_label = {c: i + 1 for i, c in enumerate(cat_ids)}
        self.label_to_cat = {i + 1: c for i, c in enumerate(cat_ids)}
        self.class_names = [self.coco.cats[c].get("name", str(c)) for c in cat_ids]
        self.records = []
        st = self.stats
        for kind, n in checked.fixes.items():
            setattr(st, kind, n)
        for img_id in sorted(self.coco.imgs):  # the check made every field below present, typed and resolvable
            info = self.coco.imgs[img_id]
            path = img_dir / info["file_name"]
            st.images += 1
            w, h = float(info["width"]), float(info["height"])
            boxes, labels, anns = [], [], []
            for ann in self.coco.imgToAnns.get(img_id, []):
                if ann["iscrowd"]:
                    st.crowd_annotations += 1
                    continue
                x, y, bw, bh = (float(v) for v in ann["bbox"])
                x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + bw, w), min(y + bh, h)
                if (x1, y1, x2, y2) != (x, y, x + bw, y + bh):
                    st.clipped_boxes += 1
                if x2 - x1 < 1.0 or y2 - y1 < 1.0:
                    st.degenerate_boxes += 1
                    continue
                boxes.append((x1, y1, x2, y2))
                labels.append(self.cat_to_label[ann["category_id"]])
                anns.append(ann)
            if len(boxes) > self.max_objects:
                st.truncated_objects += len(boxes) - self.max_objects
                boxes, labels, anns = boxes[: self.max_objects], labels[: self.max_objects], anns[: self.max_objects]
            if not boxes:
                st.images_without_objects += 1
                if self.train:
                    continue
            self.records.append((img_id, path, int(h), int(w), boxes, labels, anns))
        st.images_kept = len(self.records)
        if not self.records:
            raise DataError(f"{ann_path}: no usable images ({st.as_dict()})")
        log.info("%s: %s", ann_path.name, st.as_dict())
        for line in fixes_summary(checked.fixes):
            log.info("%s: fixed: %s", ann_path.name, line)

    @property
    def num_classes(self) -> int:
        return len(self.cat_to_label)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, idx: int):
        img_id, path, h, w, boxes, labels, anns = self.records[idx]
        try:
            arr = decode_rgb(path)
        except UNREADABLE as e:  # passed the header check, fails now: skipped and counted by the caller
            return None, {"image_id": img_id, "unreadable": f"{path}: {type(e).__name__}: {e}"}
        if arr.shape[:2] != (h, w):
            return None, {"image_id": img_id, "unreadable": f"{path}: decodes to {arr.shape[1]}x{arr.shape[0]}, "
                                                            f"not the checked {w}x{h} (changed since the check?)"}
        image = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": img_id,
        }
        if self.with_masks:
            hh, ww = arr.shape[:2]
            masks = np.zeros((len(anns), hh, ww), dtype=np.uint8)
            for i, ann in enumerate(anns):  # decoding only; not on the model's hot path
                seg = ann.get("segmentation")
                if seg:
                    rles = mask_utils.frPyObjects(seg, hh, ww) if isinstance(seg, list) else seg
                    masks[i] = mask_utils.decode(mask_utils.merge(rles) if isinstance(rles, list) else rles)
                else:  # no polygon: the box is the mask
                    x1, y1, x2, y2 = (int(round(v)) for v in boxes[i])
                    masks[i, y1:y2, x1:x2] = 1
            target["masks"] = torch.from_numpy(masks)
        return image, target


def collate_checked(batch):
    """(images, targets, skipped) of a batch: ``skipped`` are the targets of images that did not decode."""
    images = [im for im, _ in batch if im is not None]
    targets = [t for im, t in batch if im is not None]
    skipped = [t for im, t in batch if im is None]
    return images, targets, skipped


def collate(batch):
    """(images, targets) of the images that decoded."""
    return collate_checked(batch)[:2]


@dataclass
class UnreadableImages:
    """Images that passed the check but failed to decode: skipped, logged once with their id, counted;
    more than ``max_fraction`` of ``total`` of them is a :class:`DataError` naming them."""
    source: str  # the annotation file, for messages
    total: int
    max_fraction: float
    reasons: dict = field(default_factory=dict)  # image id -> why it did not decode

    def add(self, skipped: Iterable[dict]) -> None:
        for t in skipped:  # the few targets of undecodable images, not a batch's images
            if t["image_id"] not in self.reasons:
                self.reasons[t["image_id"]] = t["unreadable"]
                log.warning("%s: image id %s skipped, it does not decode: %s", self.source, t["image_id"],
                            t["unreadable"])

    @property
    def count(self) -> int:
        return len(self.reasons)

    @property
    def exceeded(self) -> bool:
        return self.count > self.max_fraction * self.total

    def error(self) -> DataError:
        listed = "\n".join(f"  - image id {k}: {v}" for k, v in list(self.reasons.items())[:10])
        return DataError(f"{self.source}: {self.count} of {self.total} images do not decode, more than "
                         f"data.max_unreadable_fraction={self.max_fraction:g} allows:\n{listed}")


def load_datasets(train_images: str, train_annotations: str, val_images: str, val_annotations: str,
                  with_masks: bool = False, max_objects: int = 300) -> tuple[CocoDetection, CocoDetection]:
    """Check a train/val pair (:func:`lgd.data.check.check_dataset`: refusals first) and read both splits."""
    train_check, val_check = check_dataset(train_images, train_annotations, val_images, val_annotations)
    train = CocoDetection(train_images, train_annotations, train=True, with_masks=with_masks,
                          max_objects=max_objects, checked=train_check)
    val = CocoDetection(val_images, val_annotations, train=False, with_masks=with_masks, max_objects=max_objects,
                        checked=val_check)
    return train, val
