"""The dataset check run before any training: every defect of a COCO-format train/val pair is refused with its
file and id/field (:class:`DataError`), or fixed and counted by kind (``FIXES``).

Annotation fields are validated by type and value with pydantic (strict: no string or boolean numbers, finite
values), ids must be unique and references resolvable, train and val categories equal, and every image's header
(format, mode, size, EXIF orientation, a complete file) must agree with the JSON. README "Long runs" states the
policy per defect.
"""
from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Union

import numpy as np
from pycocotools import mask as mask_utils
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from typing_extensions import NotRequired, TypedDict

from lgd.data.images import SWAPPING_ORIENTATIONS, UNREADABLE, ImageHeader, read_header

log = logging.getLogger(__name__)
MAX_LISTED = 10  # problems listed in one error; the rest are counted
HEADER_THREADS = 16  # image headers read at once

# Fixes the check makes, by kind (the ``data/<kind>`` metrics); everything else it finds is refused.
FIXES = {
    "filled_areas": "annotations without 'area': set to the polygon's area (the box's without one)",
    "filled_iscrowd": "annotations without 'iscrowd': set to 0",
    "exif_oriented_images": "images with an EXIF orientation: rotated/flipped as the tag says "
                            "(their JSON width/height are the oriented ones)",
    "high_depth_images": "16/32-bit or float images: scaled from their real range to 8-bit RGB",
    "converted_images": "grey, palette, alpha or CMYK images: converted to RGB",
}


class DataError(ValueError):
    """A dataset problem that stops training before it starts; the message names the file and id."""


_STRICT = ConfigDict(strict=True)
_Int = Annotated[int, Field(strict=True)]
_Finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class _Rle(TypedDict):
    __pydantic_config__ = _STRICT
    size: Annotated[list[_Int], Field(min_length=2, max_length=2)]
    counts: Union[str, list[_Int]]


class _Image(TypedDict):
    __pydantic_config__ = _STRICT
    id: _Int
    file_name: Annotated[str, Field(min_length=1)]
    width: Annotated[int, Field(strict=True, ge=1)]
    height: Annotated[int, Field(strict=True, ge=1)]


class _Annotation(TypedDict):
    __pydantic_config__ = _STRICT
    id: _Int
    image_id: _Int
    category_id: _Int
    bbox: Annotated[list[_Finite], Field(min_length=4, max_length=4)]
    iscrowd: NotRequired[Annotated[int, Field(strict=True, ge=0, le=1)]]
    area: NotRequired[Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0)]]
    segmentation: NotRequired[Union[list[Annotated[list[_Finite], Field(min_length=6)]], _Rle]]


class _Category(TypedDict):
    __pydantic_config__ = _STRICT
    id: _Int
    name: NotRequired[str]


_SECTIONS = {"images": ("image", TypeAdapter(list[_Image])),
             "annotations": ("annotation", TypeAdapter(list[_Annotation])),
             "categories": ("category", TypeAdapter(list[_Category]))}
_EXPECTED = {  # what a union field must be, said once instead of once per branch
    "segmentation": "must be a list of polygons (lists of >= 6 finite numbers, x y pairs) or an RLE "
                    "{'size': [height, width], 'counts': ...}",
}


@dataclass
class SplitCheck:
    """One split that passed the check: its annotations (with the fixes applied) and the fixes, by kind."""
    image_dir: Path
    ann_file: Path
    dataset: dict
    fixes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FIXES, 0))
    seconds: float = 0.0

    @property
    def categories(self) -> dict[int, str]:
        return {c["id"]: c.get("name", str(c["id"])) for c in self.dataset["categories"]}


def _raise(ann_file: Path, problems: list[str], what: str) -> None:
    if problems:
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise DataError(f"{ann_file}: {what}:\n" + "\n".join(f"  - {p}" for p in problems[:MAX_LISTED]) + more)


def load_annotations(ann_file: str | Path) -> dict:
    """Parse an instances JSON: an object with images, annotations and categories lists."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise DataError(f"{ann_file}: annotation file not found")
    try:
        data = json.loads(ann_file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{ann_file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{ann_file}: not a COCO instances file (missing a top-level object)")
    missing = [k for k in _SECTIONS if k not in data]
    if missing:
        raise DataError(f"{ann_file}: not a COCO instances file (missing {', '.join(missing)})")
    not_lists = [k for k in _SECTIONS if not isinstance(data[k], list)]
    if not_lists:
        raise DataError(f"{ann_file}: {', '.join(not_lists)} must be a list")
    return data


def _entry_name(kind: str, entries: list, index: int) -> str:
    entry = entries[index]
    eid = entry.get("id") if isinstance(entry, dict) else None
    return f"{kind} id {eid!r}" if eid is not None else f"{kind} at index {index}"


def _field_problems(data: dict) -> list[str]:
    """Type and value of every field of every entry (pydantic, strict), one line per entry and field."""
    problems = []
    for section, (kind, adapter) in _SECTIONS.items():
        try:
            adapter.validate_python(data[section])
        except ValidationError as e:
            seen = set()
            for err in e.errors(include_url=False):
                loc = err["loc"]
                index, fld = loc[0], (loc[1] if len(loc) > 1 else None)
                if (index, fld) in seen:
                    continue
                seen.add((index, fld))
                where = _entry_name(kind, data[section], index)
                if fld is None:
                    problems.append(f"{section}: {where}: {err['msg'].lower()} (got {err['input']!r:.80})")
                elif err["type"] == "missing":
                    problems.append(f"{section}: {where}: field '{fld}' is missing")
                else:
                    sub = "".join(f"[{p}]" for p in loc[2:] if isinstance(p, int))
                    msg = _EXPECTED.get(fld) or err["msg"].lower()
                    got = data[section][index][fld] if fld in _EXPECTED else err["input"]
                    problems.append(f"{section}: {where}: field '{fld}{'' if fld in _EXPECTED else sub}': {msg} "
                                    f"(got {got!r:.80})")
    return problems


def _duplicates(ids: np.ndarray) -> np.ndarray:
    u, c = np.unique(ids, return_counts=True)
    return u[c > 1]


def _listed(values) -> str:
    values = list(values)
    shown = ", ".join(str(v) for v in values[:MAX_LISTED])
    return shown + (f" ... ({len(values)} in all)" if len(values) > MAX_LISTED else "")


def _reference_problems(data: dict) -> list[str]:
    """Unique ids and file names, annotations pointing at known images and categories, sane boxes."""
    images, anns, cats = data["images"], data["annotations"], data["categories"]
    problems = []
    if not cats:
        problems.append("categories: the list is empty")
    for section, entries in (("images", images), ("annotations", anns), ("categories", cats)):
        ids = np.array([e["id"] for e in entries], dtype=np.int64)
        for dup in _duplicates(ids)[:MAX_LISTED]:
            idx = np.flatnonzero(ids == dup).tolist()
            problems.append(f"{section}: id {dup} is used by {len(idx)} entries (at indices {_listed(idx)})")
    by_name: dict[str, list] = {}
    for im in images:
        by_name.setdefault(im["file_name"], []).append(im["id"])
    for name, ids in by_name.items():
        if len(ids) > 1:
            problems.append(f"images: image ids {_listed(ids)} all name file {name!r} (their boxes would train as "
                            f"separate, partly labelled images)")
    if anns:
        ann_ids = np.array([a["id"] for a in anns], dtype=np.int64)
        img_of = np.array([a["image_id"] for a in anns], dtype=np.int64)
        cat_of = np.array([a["category_id"] for a in anns], dtype=np.int64)
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        known_imgs = np.array([im["id"] for im in images], dtype=np.int64)
        known_cats = np.array([c["id"] for c in cats], dtype=np.int64)
        for i in np.flatnonzero(~np.isin(img_of, known_imgs))[:MAX_LISTED]:
            problems.append(f"annotations: annotation id {ann_ids[i]}: image_id {img_of[i]} is not in images")
        for i in np.flatnonzero(~np.isin(cat_of, known_cats))[:MAX_LISTED]:
            problems.append(f"annotations: annotation id {ann_ids[i]}: unknown category id {cat_of[i]} "
                            f"(known: {sorted(known_cats.tolist())})")
        for i in np.flatnonzero((boxes[:, 2:] < 0).any(axis=1))[:MAX_LISTED]:
            problems.append(f"annotations: annotation id {ann_ids[i]}: field 'bbox': width and height must be >= 0 "
                            f"([x, y, width, height]), got {anns[i]['bbox']}")
        sizes = {im["id"]: [im["height"], im["width"]] for im in images}
        for a in anns:  # one length or size comparison per annotation
            seg = a.get("segmentation")
            if isinstance(seg, dict) and a["image_id"] in sizes and seg["size"] != sizes[a["image_id"]]:
                problems.append(f"annotations: annotation id {a['id']}: field 'segmentation': RLE size {seg['size']} "
                                f"is not its image's [height, width] {sizes[a['image_id']]}")
            elif isinstance(seg, list) and any(len(poly) % 2 for poly in seg):
                problems.append(f"annotations: annotation id {a['id']}: field 'segmentation': a polygon has an odd "
                                f"number of coordinates (x y pairs expected)")
    return problems


def _fill_defaults(data: dict, fixes: dict[str, int]) -> None:
    """Fill the optional fields pycocotools' evaluation needs; count each fill."""
    sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    for a in data["annotations"]:
        if "iscrowd" not in a:
            a["iscrowd"] = 0
            fixes["filled_iscrowd"] += 1
        if "area" not in a:
            seg = a.get("segmentation")
            if seg:
                h, w = sizes[a["image_id"]]
                rles = mask_utils.frPyObjects(seg, h, w) if isinstance(seg, list) else seg
                a["area"] = float(mask_utils.area(mask_utils.merge(rles) if isinstance(rles, list) else rles))
            else:
                a["area"] = float(a["bbox"][2] * a["bbox"][3])
            fixes["filled_areas"] += 1


def check_annotations(data: dict, ann_file: Path) -> dict[str, int]:
    """Validate ``data`` (from :func:`load_annotations`) in place; return the fixes by kind."""
    fixes = dict.fromkeys(FIXES, 0)
    _raise(ann_file, _field_problems(data), "fields with a wrong type or value")
    _raise(ann_file, _reference_problems(data), "ids that are not unique or do not resolve")
    _fill_defaults(data, fixes)
    return fixes


def _header_or_error(path: Path) -> ImageHeader | Exception:
    try:
        return read_header(path)
    except UNREADABLE as e:  # FileNotFoundError and IsADirectoryError are OSErrors
        return e


def _not_an_image(e: Exception) -> str:
    if isinstance(e, FileNotFoundError):
        return "not found"
    if isinstance(e, IsADirectoryError):
        return "is a folder, not an image"
    return f"is not an image PIL can read ({type(e).__name__}: {e})"


def read_headers(paths: list[Path], threads: int = HEADER_THREADS) -> list[ImageHeader | Exception]:
    """Every image's header (or the exception reading it raised), read in parallel."""
    with ThreadPoolExecutor(threads) as pool:  # file-system latency overlaps (network storage)
        return list(pool.map(_header_or_error, paths))


def check_image_files(data: dict, image_dir: Path, ann_file: Path, fixes: dict[str, int],
                      threads: int = HEADER_THREADS, headers: list | None = None) -> None:
    """Read every image's header (unless ``headers`` has them, from :func:`read_headers`) and compare it with the
    JSON; count the fixes decoding will make."""
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: image folder not found (for {ann_file})")
    problems = []
    paths = [image_dir / im["file_name"] for im in data["images"]]
    if headers is None:
        headers = read_headers(paths, threads)
    for im, path, header in zip(data["images"], paths, headers):
        where = f"image id {im['id']}: file {path}"
        if isinstance(header, Exception):
            problems.append(f"{where} {_not_an_image(header)}")
            continue
        if header.problem:
            problems.append(f"{where} ({header.format}) is damaged or truncated: it {header.problem}")
            continue
        json_size = (im["width"], im["height"])
        if header.oriented_size != json_size:
            if header.orientation in SWAPPING_ORIENTATIONS and header.size == json_size:
                problems.append(f"{where}: the JSON's width x height {json_size[0]}x{json_size[1]} is the stored "
                                f"size, but its EXIF orientation {header.orientation} turns it into "
                                f"{header.oriented_size[0]}x{header.oriented_size[1]}: the boxes may be in either "
                                f"frame (re-save the image without the tag, or set the JSON size to the oriented one)")
            else:
                problems.append(f"{where} is {header.oriented_size[0]}x{header.oriented_size[1]} (width x height"
                                f"{', EXIF-oriented' if header.orientation != 1 else ''}) but the JSON says "
                                f"{json_size[0]}x{json_size[1]}")
            continue
        fixes["exif_oriented_images"] += header.orientation != 1
        fixes["high_depth_images"] += header.high_depth
        fixes["converted_images"] += not header.high_depth and header.mode != "RGB"
    _raise(ann_file, problems, f"{len(problems)} image(s) that cannot be used as the JSON describes them")


def check_split(image_dir: str | Path, ann_file: str | Path) -> SplitCheck:
    """The full check of one split (annotations, then every image header); DataError on a refused defect."""
    t0 = time.time()
    image_dir, ann_file = Path(image_dir), Path(ann_file)
    return check_split_data(load_annotations(ann_file), image_dir, ann_file, t0=t0)


def check_split_data(data: dict, image_dir: str | Path, source: str | Path, headers: list | None = None,
                     t0: float | None = None) -> SplitCheck:
    """The check of one split already in COCO form (another format's reader converted it; ``source`` names its
    files in messages); ``headers``: the images' headers when the reader had to read them already."""
    t0 = time.time() if t0 is None else t0
    image_dir, source = Path(image_dir), Path(source)
    fixes = check_annotations(data, source)
    check_image_files(data, image_dir, source, fixes, headers=headers)
    return SplitCheck(image_dir, source, data, fixes, time.time() - t0)


def check_same_categories(train: SplitCheck, val: SplitCheck) -> None:
    """Train and val must define the same category ids with the same names (labels 1..K map the same way)."""
    a, b = train.categories, val.categories
    if a == b:
        return
    parts = []
    if set(a) - set(b):
        parts.append(f"only in train: ids {sorted(set(a) - set(b))}")
    if set(b) - set(a):
        parts.append(f"only in val: ids {sorted(set(b) - set(a))}")
    renamed = [f"id {k}: {a[k]!r} vs {b[k]!r}" for k in sorted(set(a) & set(b)) if a[k] != b[k]]
    if renamed:
        parts.append(f"named differently: {_listed(renamed)}")
    raise DataError(f"{val.ann_file}: categories differ from {train.ann_file}'s ({'; '.join(parts)})")


def check_dataset(train_images: str | Path, train_annotations: str | Path, val_images: str | Path,
                  val_annotations: str | Path) -> tuple[SplitCheck, SplitCheck]:
    """Check both splits and that their categories are equal; the per-kind fixes are logged."""
    train = check_split(train_images, train_annotations)
    val = check_split(val_images, val_annotations)
    check_same_categories(train, val)
    for split in (train, val):
        log.info("checked %s: %d images, %d annotations in %.1fs", split.ann_file, len(split.dataset["images"]),
                 len(split.dataset["annotations"]), split.seconds)
    return train, val


def fixes_summary(fixes: dict[str, int]) -> list[str]:
    """One line per kind of fix made (for the log)."""
    return [f"{n} {FIXES[k]}" for k, n in fixes.items() if n]

