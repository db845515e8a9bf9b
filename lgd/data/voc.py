"""Pascal VOC devkit (``VOC2007/``, ``VOC2012/``: Annotations/*.xml, ImageSets/Main/<split>.txt, JPEGImages/):
read into the COCO-style form the reader trains from, and written (the synthetic set's VOC copy).

Boxes: VOC's 1-based inclusive pixel corners become continuous x1y1x2y2 = (xmin - 1, ymin - 1, xmax, ymax), the
convention Detectron2 uses; IoU in these coordinates equals the devkit's "+1" IoU. ``difficult`` objects are
kept as ``iscrowd: 1``: out of the training targets, ignored by the VOC metric (lgd.evaluation.voc).
"""
from __future__ import annotations

import math
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterable, Optional, Sequence


from lgd.data.check import DataError, check_split_data
from lgd.data.coco import CocoDetection
from lgd.data.images import copy_as_jpeg

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
TRAIN_SETS = ("VOC2007/trainval", "VOC2012/trainval")  # the paper (§4.1): 07+12 trainval for training
VAL_SETS = ("VOC2007/test",)  # ... and 07 test for validation


def _number(node: Optional[ET.Element], where: str) -> float:
    text = node.text.strip() if node is not None and node.text else ""
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{where}: expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise DataError(f"{where}: expected a finite number, got {text!r}")
    return value


def _parse_xml(xml: Path, classes: dict[str, int]) -> tuple[int, int, list[tuple[int, list[float], int]]]:
    """(width, height, [(category id, [x1, y1, x2, y2], difficult)]) of one annotation file."""
    try:
        root = ET.parse(xml).getroot()
    except ET.ParseError as e:
        raise DataError(f"{xml}: not valid XML ({e})") from None
    size = root.find("size")
    if size is None:
        raise DataError(f"{xml}: no <size> element")
    width, height = (_number(size.find(k), f"{xml}: <size><{k}>") for k in ("width", "height"))
    if width < 1 or height < 1 or width != int(width) or height != int(height):
        raise DataError(f"{xml}: <size> must give whole width and height >= 1, got {width:g}x{height:g}")
    objects = []
    for i, obj in enumerate(root.findall("object")):
        name_node = obj.find("name")
        name = name_node.text.strip() if name_node is not None and name_node.text else ""
        where = f"{xml}: object {i} ({name or 'no name'})"
        if name not in classes:
            raise DataError(f"{where}: <name> {name!r} is not one of the classes ({', '.join(classes)})")
        diff = obj.find("difficult")
        difficult = 0 if diff is None or not (diff.text or "").strip() else _number(diff, f"{where}: <difficult>")
        if difficult not in (0, 1):
            raise DataError(f"{where}: <difficult> must be 0 or 1, got {difficult:g}")
        box = obj.find("bndbox")
        if box is None:
            raise DataError(f"{where}: no <bndbox>")
        x1, y1, x2, y2 = (_number(box.find(k), f"{where}: <bndbox><{k}>") for k in ("xmin", "ymin", "xmax", "ymax"))
        if x2 < x1 or y2 < y1:
            raise DataError(f"{where}: <bndbox> has xmax < xmin or ymax < ymin ({x1:g}, {y1:g}, {x2:g}, {y2:g})")
        objects.append((classes[name], [x1 - 1.0, y1 - 1.0, x2, y2], int(difficult)))
    return int(width), int(height), objects


def read_voc(root: str | Path, sets: Sequence[str], classes: Sequence[str] = VOC_CLASSES) -> dict:
    """The union of ``sets`` ("VOC2007/trainval": folder under ``root``, then the ImageSets/Main list) as a COCO-style
    dict (file names relative to ``root``); category ids 1..K in ``classes`` order. DataError names the list file
    and line, or the XML file and object, of the first defect."""
    root = Path(root)
    cat_ids = {c: i + 1 for i, c in enumerate(classes)}
    images, annotations, seen = [], [], {}
    for s in sets:
        folder, _, split = s.rpartition("/")
        listing = root / folder / "ImageSets" / "Main" / f"{split}.txt"
        if not folder or not listing.is_file():
            raise DataError(f"{listing}: image set list not found (set {s!r}: expected <folder>/<split>, e.g. "
                            f"VOC2007/trainval, under {root})")
        for line_no, line in enumerate(listing.read_text().splitlines(), 1):
            name = line.strip()
            if not name:
                continue
            if len(name.split()) != 1:
                raise DataError(f"{listing}: line {line_no}: expected one image id, got {name!r}")
            key = (folder, name)
            if key in seen:
                raise DataError(f"{listing}: line {line_no}: image {name!r} is listed again (first: {seen[key]})")
            seen[key] = f"{listing} line {line_no}"
            xml = root / folder / "Annotations" / f"{name}.xml"
            if not xml.is_file():
                raise DataError(f"{listing}: line {line_no}: annotation file {xml} not found")
            width, height, objects = _parse_xml(xml, cat_ids)
            image_id = len(images) + 1
            images.append({"id": image_id, "file_name": f"{folder}/JPEGImages/{name}.jpg", "width": width,
                           "height": height})
            for cat, (x1, y1, x2, y2), difficult in objects:
                w, h = x2 - x1, y2 - y1
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat,
                                    "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": difficult})
    if not images:
        raise DataError(f"{root}: the image sets {', '.join(sets)} list no images")
    return {"images": images, "annotations": annotations,
            "categories": [{"id": i, "name": c} for c, i in cat_ids.items()]}


def load_voc_split(root: str | Path, sets: Sequence[str], train: bool, classes: Sequence[str] = VOC_CLASSES,
                   max_objects: int = 300) -> CocoDetection:
    """Read, check (lgd.data.check: every image header against its XML size) and index one split."""
    t0 = time.time()
    root = Path(root)
    source = root / "+".join(sets).replace("/", ":")  # names the split in messages and logs: VOC2007:test
    checked = check_split_data(read_voc(root, sets, classes), root, source, t0=t0)
    return CocoDetection(str(root), str(source), train=train, max_objects=max_objects, checked=checked,
                         format="voc")


def load_voc(root: str | Path, train_sets: Sequence[str] = TRAIN_SETS, val_sets: Sequence[str] = VAL_SETS,
             classes: Sequence[str] = VOC_CLASSES, max_objects: int = 300) -> tuple[CocoDetection, CocoDetection]:
    """The train and val splits of a VOC devkit (default: the paper's 07+12 trainval / 07 test)."""
    return (load_voc_split(root, train_sets, True, classes, max_objects),
            load_voc_split(root, val_sets, False, classes, max_objects))


def write_voc(coco: dict, image_dir: str | Path, devkit: str | Path, folder: str, split: str,
              image_ids: Iterable[int]) -> None:
    """Write images ``image_ids`` of a COCO-style dict as ``devkit/folder`` (JPEGImages as JPEG, Annotations as
    XML with 1-based inclusive corners, iscrowd as difficult) and append them to ImageSets/Main/<split>.txt."""
    base = Path(devkit) / folder
    for sub in ("Annotations", "ImageSets/Main"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    listed = []
    for name, im, anns in copy_as_jpeg(coco, image_dir, image_ids, base / "JPEGImages"):
        ann = ET.Element("annotation")
        ET.SubElement(ann, "folder").text = folder
        ET.SubElement(ann, "filename").text = f"{name}.jpg"
        size = ET.SubElement(ann, "size")
        for k, v in (("width", im["width"]), ("height", im["height"]), ("depth", 3)):
            ET.SubElement(size, k).text = str(v)
        for a in anns:
            x, y, w, h = a["bbox"]
            corners = (round(x) + 1, round(y) + 1, max(round(x + w), round(x) + 1), max(round(y + h), round(y) + 1))
            obj = ET.SubElement(ann, "object")
            ET.SubElement(obj, "name").text = names[a["category_id"]]
            ET.SubElement(obj, "difficult").text = str(int(a.get("iscrowd", 0)))
            box = ET.SubElement(obj, "bndbox")
            for k, v in zip(("xmin", "ymin", "xmax", "ymax"), corners):
                ET.SubElement(box, k).text = str(v)
        ET.ElementTree(ann).write(base / "Annotations" / f"{name}.xml")
        listed.append(name)
    with open(base / "ImageSets" / "Main" / f"{split}.txt", "a") as f:
        f.write("".join(f"{n}\n" for n in listed))
