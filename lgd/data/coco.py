"""COCO-format detection dataset read through pycocotools, with the filters a real dataset needs."""
from __future__ import annotations

import contextlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A dataset problem that stops training before it starts; the message names the file and id."""


@dataclass
class FilterStats:
    """What the reader dropped or changed, reported in the log and recorded in MLflow."""
    images: int = 0
    images_kept: int = 0
    images_without_objects: int = 0
    crowd_annotations: int = 0
    degenerate_boxes: int = 0
    clipped_boxes: int = 0
    truncated_objects: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def _load_coco(ann_file: Path) -> COCO:
    if not ann_file.is_file():
        raise DataError(f"{ann_file}: annotation file not found")
    try:
        data = json.loads(ann_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{ann_file}: not valid JSON ({e})") from None
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if not isinstance(data, dict) or missing:
        raise DataError(f"{ann_file}: not a COCO instances file (missing {', '.join(missing) or 'a top-level object'})")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


@dataclass
class CocoDetection(torch.utils.data.Dataset):
    """Images as float tensors in [0, 1] (C, H, W) and targets {boxes x1y1x2y2, labels 1..K[, masks]}.

    Category ids of any values map to contiguous labels 1..K (``label_to_cat`` maps back). Crowd
    annotations are ignored, degenerate boxes dropped, boxes clipped to the image, and for training
    images left without objects are skipped; each is counted in ``stats``. An unknown category id or a
    missing image file raises :class:`DataError` before any training starts.
    """
    image_dir: str
    ann_file: str
    train: bool = True
    with_masks: bool = False
    max_objects: int = 300
    stats: FilterStats = field(default_factory=FilterStats)

    def __post_init__(self):
        ann_path, img_dir = Path(self.ann_file), Path(self.image_dir)
        self.coco = _load_coco(ann_path)
        cat_ids = sorted(c["id"] for c in self.coco.dataset["categories"])
        if not cat_ids:
            raise DataError(f"{ann_path}: no categories")
        self.cat_to_label = {c: i + 1 for i, c in enumerate(cat_ids)}
        self.label_to_cat = {i + 1: c for i, c in enumerate(cat_ids)}
        self.class_names = [self.coco.cats[c].get("name", str(c)) for c in cat_ids]
        if not img_dir.is_dir():
            raise DataError(f"{img_dir}: image folder not found (for {ann_path})")
        self.records = []
        st = self.stats
        for img_id in sorted(self.coco.imgs):
            info = self.coco.imgs[img_id]
            path = img_dir / info["file_name"]
            if not path.is_file():
                raise DataError(f"{ann_path}: image id {img_id}: file {path} not found")
            st.images += 1
            w, h = float(info["width"]), float(info["height"])
            boxes, labels, anns = [], [], []
            for ann in self.coco.imgToAnns.get(img_id, []):
                if ann.get("category_id") not in self.cat_to_label:
                    raise DataError(f"{ann_path}: annotation id {ann.get('id')}: unknown category id "
                                    f"{ann.get('category_id')!r} (known: {cat_ids})")
                if ann.get("iscrowd", 0):
                    st.crowd_annotations += 1
                    continue
                bbox = ann.get("bbox")
                if not (isinstance(bbox, list) and len(bbox) == 4):
                    raise DataError(f"{ann_path}: annotation id {ann.get('id')}: bbox must be [x, y, w, h], got {bbox!r}")
                x, y, bw, bh = (float(v) for v in bbox)
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

    @property
    def num_classes(self) -> int:
        return len(self.cat_to_label)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, idx: int):
        img_id, path, h, w, boxes, labels, anns = self.records[idx]
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
        except OSError as e:
            raise DataError(f"{path}: cannot read image ({e})") from None
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


def collate(batch):
    images, targets = zip(*batch)
    return list(images), list(targets)
