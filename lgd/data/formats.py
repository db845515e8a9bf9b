"""The dataset entry's ``format`` picks its reader (COCO, Pascal VOC, CrowdHuman); each checks its splits first."""
from __future__ import annotations

import os
import tempfile

from lgd.config import DataConfig
from lgd.data.coco import CocoDetection, load_datasets
from lgd.data.crowdhuman import load_crowdhuman
from lgd.data.synthetic import class_names, ensure_synthetic
from lgd.data.voc import TRAIN_SETS, VAL_SETS, VOC_CLASSES, load_voc


def load_splits(d: DataConfig, with_masks: bool = False) -> tuple[CocoDetection, CocoDetection]:
    """The train and val splits of ``d``; a synthetic set is generated (in ``d.format``) once under
    ``$LGD_DATA_CACHE`` (default: the temp folder's lgd-synthetic)."""
    if d.synthetic is not None:
        s = d.synthetic
        cache = os.environ.get("LGD_DATA_CACHE", os.path.join(tempfile.gettempdir(), "lgd-synthetic"))
        paths = ensure_synthetic(cache, s.num_train, s.num_val, s.image_size, s.num_classes, s.max_objects, s.seed,
                                 format=d.format)
    else:
        paths = {"root": d.root, "train_images": d.train_images, "train_annotations": d.train_annotations,
                 "val_images": d.val_images, "val_annotations": d.val_annotations}
    if d.format == "voc":
        classes = class_names(d.synthetic.num_classes) if d.synthetic is not None else VOC_CLASSES
        return load_voc(paths["root"], d.train_sets or TRAIN_SETS, d.val_sets or VAL_SETS, classes,
                        d.max_objects_per_image)
    if d.format == "crowdhuman":
        return load_crowdhuman(paths["root"], d.max_objects_per_image)
    return load_datasets(paths["train_images"], paths["train_annotations"], paths["val_images"],
                         paths["val_annotations"], with_masks=with_masks, max_objects=d.max_objects_per_image)
