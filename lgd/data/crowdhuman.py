"""CrowdHuman (``annotation_{train,val}.odgt``: one JSON object per line; ``Images/<ID>.jpg``): read into the
COCO-style form the reader trains from, and written (the synthetic set's CrowdHuman copy).

Persons are their full-body boxes (``fbox``, [x, y, w, h]); boxes tagged ``mask`` and boxes with
``extra.ignore: 1`` are ignore regions, kept as ``iscrowd: 1``: out of the training targets and matched by
intersection over the detection's area in the CrowdHuman metric (lgd.evaluation.crowdhuman). The .odgt files
give no image size: it is read from the image headers (once, for the check as well).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Iterable

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from typing_extensions import NotRequired, TypedDict

from lgd.data.check import DataError, check_split_data, read_headers
from lgd.data.coco import CocoDetection
from lgd.data.images import ImageHeader, copy_as_jpeg

PERSON = "person"  # the one class; every other tag ("mask") is an ignore region
IMAGES = "Images"
ANNOTATIONS = {"train": "annotation_train.odgt", "val": "annotation_val.odgt"}
_STRICT = ConfigDict(strict=True)
_Finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]
_Box = Annotated[list[_Finite], Field(min_length=4, max_length=4)]


class _Extra(TypedDict):
    __pydantic_config__ = _STRICT
    ignore: NotRequired[Annotated[int, Field(strict=True, ge=0, le=1)]]


class _GtBox(TypedDict):
    __pydantic_config__ = _STRICT
    tag: str
    fbox: _Box
    extra: NotRequired[_Extra]


class _Record(TypedDict):
    __pydantic_config__ = _STRICT
    ID: Annotated[str, Field(min_length=1)]
    gtboxes: list[_GtBox]


_RECORD = TypeAdapter(_Record)


def _records(odgt: Path) -> list[tuple[int, dict]]:
    """(line number, record) of every non-blank line, each validated; DataError names the line and field."""
    if not odgt.is_file():
        raise DataError(f"{odgt}: annotation file not found")
    out, first_line = [], {}
    for line_no, line in enumerate(odgt.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{odgt}: line {line_no}: not valid JSON ({e})") from None
        rid = rec.get("ID") if isinstance(rec, dict) else None
        try:
            _RECORD.validate_python(rec)
        except ValidationError as e:
            err = e.errors(include_url=False)[0]
            loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
            raise DataError(f"{odgt}: line {line_no}{f' (ID {rid})' if isinstance(rid, str) else ''}: field "
                            f"{loc or '<record>'}: {err['msg'].lower()} (got {err['input']!r:.80})") from None
        for i, box in enumerate(rec["gtboxes"]):
            if box["fbox"][2] < 0 or box["fbox"][3] < 0:
                raise DataError(f"{odgt}: line {line_no} (ID {rid}): field gtboxes[{i}].fbox: width and height "
                                f"must be >= 0 ([x, y, w, h]), got {box['fbox']}")
        if rid in first_line:
            raise DataError(f"{odgt}: line {line_no}: ID {rid} is used again (first on line {first_line[rid]})")
        first_line[rid] = line_no
        out.append((line_no, rec))
    if not out:
        raise DataError(f"{odgt}: no records")
    return out


def read_odgt(odgt: str | Path, image_dir: str | Path) -> tuple[dict, list]:
    """One .odgt file as a COCO-style dict (one category, ``person``) and the images' headers (their sizes)."""
    odgt, image_dir = Path(odgt), Path(image_dir)
    records = _records(odgt)
    headers = read_headers([image_dir / f"{rec['ID']}.jpg" for _, rec in records])
    images, annotations = [], []
    for (_, rec), header in zip(records, headers):
        # an image that does not read gets a placeholder size: the check refuses it, naming its file
        width, height = header.oriented_size if isinstance(header, ImageHeader) else (1, 1)
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": f"{rec['ID']}.jpg", "width": width, "height": height})
        for box in rec["gtboxes"]:
            ignore = box["tag"] != PERSON or box.get("extra", {}).get("ignore", 0) == 1
            x, y, w, h = (float(v) for v in box["fbox"])
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(ignore)})
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": PERSON}]}, headers


def load_crowdhuman_split(root: str | Path, split: str, max_objects: int = 300) -> CocoDetection:
    """Read, check (lgd.data.check) and index ``root/annotation_<split>.odgt`` with its ``root/Images``."""
    t0 = time.time()
    root = Path(root)
    odgt, image_dir = root / ANNOTATIONS[split], root / IMAGES
    data, headers = read_odgt(odgt, image_dir)
    checked = check_split_data(data, image_dir, odgt, headers=headers, t0=t0)
    return CocoDetection(str(image_dir), str(odgt), train=split == "train", max_objects=max_objects,
                         checked=checked, format="crowdhuman")


def load_crowdhuman(root: str | Path, max_objects: int = 300) -> tuple[CocoDetection, CocoDetection]:
    """CrowdHuman's train and val splits (the paper: train on the 15k training images, validate on the 4370)."""
    return load_crowdhuman_split(root, "train", max_objects), load_crowdhuman_split(root, "val", max_objects)


def write_odgt(coco: dict, image_dir: str | Path, root: str | Path, split: str, image_ids: Iterable[int]) -> None:
    """Write images ``image_ids`` of a COCO-style dict in CrowdHuman's layout: ``root/Images/<ID>.jpg`` and one
    line each in ``root/annotation_<split>.odgt`` (every object a person's ``fbox``; iscrowd: ``extra.ignore``)."""
    root = Path(root)
    lines = []
    for name, _, anns in copy_as_jpeg(coco, image_dir, image_ids, root / IMAGES):
        boxes = []
        for i, a in enumerate(anns):
            x, y, w, h = (round(float(v), 1) for v in a["bbox"])
            boxes.append({"tag": PERSON, "fbox": [x, y, w, h], "vbox": [x, y, w, h],
                          "hbox": [x + w / 4, y, round(w / 2, 1), round(h / 5, 1)],
                          "extra": {"box_id": i, "occ": 0, "ignore": int(a.get("iscrowd", 0))},
                          "head_attr": {"ignore": 0, "occ": 0, "unsure": 0}})
        lines.append(json.dumps({"ID": name, "gtboxes": boxes}))
    with open(root / ANNOTATIONS[split], "a") as f:
        f.write("".join(f"{ln}\n" for ln in lines))
