"""A synthetic COCO-format dataset: coloured shapes with boxes and polygon masks (the embedded default), and its
VOC-devkit and CrowdHuman copies."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Deliberately non-contiguous category ids, as in COCO (1..90 with gaps).
CATEGORY_IDS = (1, 3, 7, 8, 13, 17, 21, 42)
SHAPES = ("rectangle", "ellipse", "triangle", "diamond", "hexagon", "pentagon", "cross", "star")
COLOURS = ((230, 60, 60), (60, 200, 60), (60, 90, 230), (230, 200, 40), (200, 60, 220), (40, 210, 210),
           (240, 140, 30), (250, 250, 250))


def _polygon(shape: str, cx: float, cy: float, w: float, h: float) -> list[tuple[float, float]]:
    def ring(n: int, phase: float = 0.0, radii=(1.0,)):
        pts = []
        for i in range(n):
            a = phase + 2 * math.pi * i / n
            r = radii[i % len(radii)]
            pts.append((cx + r * w / 2 * math.cos(a), cy + r * h / 2 * math.sin(a)))
        return pts

    if shape == "rectangle":
        return [(cx - w / 2, cy - h / 2), (cx + w / 2, cy - h / 2), (cx + w / 2, cy + h / 2), (cx - w / 2, cy + h / 2)]
    if shape == "ellipse":
        return ring(24)
    if shape == "triangle":
        return [(cx, cy - h / 2), (cx + w / 2, cy + h / 2), (cx - w / 2, cy + h / 2)]
    if shape == "diamond":
        return ring(4, -math.pi / 2)
    if shape == "hexagon":
        return ring(6)
    if shape == "pentagon":
        return ring(5, -math.pi / 2)
    if shape == "star":
        return ring(10, -math.pi / 2, radii=(1.0, 0.45))
    # cross
    a, b = w / 6, h / 6
    return [(cx - a, cy - h / 2), (cx + a, cy - h / 2), (cx + a, cy - b), (cx + w / 2, cy - b), (cx + w / 2, cy + b),
            (cx + a, cy + b), (cx + a, cy + h / 2), (cx - a, cy + h / 2), (cx - a, cy + b), (cx - w / 2, cy + b),
            (cx - w / 2, cy - b), (cx - a, cy - b)]


def _clip(poly, width, height):
    return [(min(max(x, 0.0), width - 1.0), min(max(y, 0.0), height - 1.0)) for x, y in poly]


def generate(out_dir: str | Path, split: str, num_images: int, image_size: int = 128, num_classes: int = 3,
             max_objects: int = 8, seed: int = 0) -> tuple[Path, Path]:
    """Write ``out_dir/<split>/*.png`` and ``out_dir/<split>.json``; return (image dir, annotation file).

    Object counts vary from 0 (one image in ten) to ``max_objects``, with one crowded image in eight
    holding 3x as many, and a few ``iscrowd`` annotations, so the reader's filters are exercised.
    """
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be in 1..{len(SHAPES)}, got {num_classes}")
    out_dir = Path(out_dir)
    img_dir = out_dir / split
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, {"train": 0, "val": 1}.get(split, 2)])
    images, annotations = [], []
    ann_id = 1
    for i in range(num_images):
        size = image_size
        height = int(size * rng.uniform(0.75, 1.0))
        background = rng.integers(0, 60, size=(height, size, 3), dtype=np.uint8)
        img = Image.fromarray(background)
        draw = ImageDraw.Draw(img)
        if i % 10 == 9:
            n = 0
        elif i % 8 == 7:
            n = 3 * max_objects
        else:
            n = int(rng.integers(1, max_objects + 1))
        for _ in range(n):
            c = int(rng.integers(num_classes))
            w = float(rng.uniform(0.12, 0.45) * size)
            h = float(rng.uniform(0.12, 0.45) * height)
            cx = float(rng.uniform(w / 2, size - w / 2))
            cy = float(rng.uniform(h / 2, height - h / 2))
            poly = _clip(_polygon(SHAPES[c], cx, cy, w, h), size, height)
            jitter = rng.integers(-25, 25, size=3)
            colour = tuple(int(min(255, max(0, v + j))) for v, j in zip(COLOURS[c], jitter))
            draw.polygon(poly, fill=colour)
            xs, ys = [p[0] for p in poly], [p[1] for p in poly]
            x0, y0 = min(xs), min(ys)
            bw, bh = max(xs) - x0, max(ys) - y0
            flat = [round(v, 2) for p in poly for v in p]
            annotations.append({
                "id": ann_id, "image_id": i + 1, "category_id": CATEGORY_IDS[c],
                "bbox": [round(x0, 2), round(y0, 2), round(bw, 2), round(bh, 2)],
                "area": round(bw * bh * 0.7, 2), "segmentation": [flat],
                "iscrowd": int(n > 0 and rng.random() < 0.03),
            })
            ann_id += 1
        name = f"{split}_{i:05d}.png"
        img.save(img_dir / name)
        images.append({"id": i + 1, "file_name": name, "width": size, "height": height})
    categories = [{"id": CATEGORY_IDS[c], "name": SHAPES[c], "supercategory": "shape"} for c in range(num_classes)]
    ann_file = out_dir / f"{split}.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return img_dir, ann_file


def class_names(num_classes: int) -> list[str]:
    """The synthetic set's class names in category-id order (the classes of its VOC copy)."""
    return list(SHAPES[:num_classes])


def _build_once(out: Path, build) -> None:
    """``build(folder)`` aside, then rename to ``out``: concurrent trials never see a half-written set."""
    if out.exists():
        return
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    build(tmp)
    try:
        os.rename(tmp, out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)


def write_copy(coco_paths: dict[str, str], dest: Path, format: str) -> None:
    """The COCO-format train/val pair rewritten in another format under ``dest``: ``voc`` as a devkit
    (``dest/VOCdevkit``: train split in halves over VOC2007 and VOC2012 trainval, val as VOC2007 test, the
    paper's split names) or ``crowdhuman`` (``dest/Images``, ``dest/annotation_{train,val}.odgt``)."""
    from lgd.data.crowdhuman import write_odgt
    from lgd.data.voc import write_voc

    for split in ("train", "val"):
        coco = json.loads(Path(coco_paths[f"{split}_annotations"]).read_text())
        image_dir, ids = coco_paths[f"{split}_images"], [im["id"] for im in coco["images"]]
        if format == "crowdhuman":
            write_odgt(coco, image_dir, dest, split, ids)
        elif format == "voc" and split == "train":
            half = len(ids) // 2
            write_voc(coco, image_dir, dest / "VOCdevkit", "VOC2007", "trainval", ids[:half])
            write_voc(coco, image_dir, dest / "VOCdevkit", "VOC2012", "trainval", ids[half:])
        elif format == "voc":
            write_voc(coco, image_dir, dest / "VOCdevkit", "VOC2007", "test", ids)
        else:
            raise ValueError(f"unknown format {format!r}: coco, voc or crowdhuman")


def ensure_synthetic(root: str | Path, num_train: int, num_val: int, image_size: int, num_classes: int,
                     max_objects: int, seed: int, format: str = "coco") -> dict[str, str]:
    """Generate the train/val sets under ``root`` once (keyed by their parameters); return their paths: the COCO
    files, or for ``format`` voc / crowdhuman the ``root`` of a copy in that format (written once too)."""
    key = f"shapes_n{num_train}-{num_val}_s{image_size}_c{num_classes}_m{max_objects}_seed{seed}"
    out = Path(root) / key

    def build(tmp: Path) -> None:
        generate(tmp, "train", num_train, image_size, num_classes, max_objects, seed)
        generate(tmp, "val", num_val, image_size, num_classes, max_objects, seed)

    _build_once(out, build)
    paths = {
        "train_images": str(out / "train"), "train_annotations": str(out / "train.json"),
        "val_images": str(out / "val"), "val_annotations": str(out / "val.json"),
    }
    if format == "coco":
        return paths
    _build_once(out / format, lambda tmp: write_copy(paths, tmp, format))
    return {"root": str(out / format / ("VOCdevkit" if format == "voc" else ""))}
