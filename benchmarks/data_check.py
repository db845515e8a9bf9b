"""Cost of the pre-training data check (lgd.data.check) on a generated COCO-like set, extrapolated to COCO.

    python benchmarks/data_check.py --images 3000

Writes ``--images`` small JPEGs (some grey, some with an EXIF rotation, as in COCO) and an instances JSON with
COCO's density (7.3 objects per image, polygon masks), then times the two parts of the check separately: the
annotation validation (JSON parse, field types and values, ids and references) per annotation, and the image
header read (format, mode, size, EXIF orientation, end marker; no pixel decoding) per image. The header read
is timed with the files in the page cache (the best of ``--repeats``); on a network file system each file
costs one more open and two small reads of latency. COCO train2017: 118,287 images, 860,001 annotations.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lgd.data.check import HEADER_THREADS, check_annotations, check_image_files, load_annotations  # noqa: E402
from lgd.data.images import EXIF_ORIENTATION  # noqa: E402

COCO_IMAGES, COCO_ANNOTATIONS = 118_287, 860_001


def generate(root: Path, n: int, size: int, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rotated = Image.Exif()
    rotated[EXIF_ORIENTATION] = 6
    images, anns = [], []
    base = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    for i in range(n):
        w, h = int(size * rng.uniform(0.6, 1.0)), int(size * rng.uniform(0.6, 1.0))
        im = Image.fromarray(np.roll(base, i, axis=0)[:h, :w])
        if i % 20 == 0:
            im = im.convert("L")  # COCO has grey images
        name = f"{i:07d}.jpg"
        if i % 50 == 0:  # stored transposed, shown (and annotated) as w x h
            im.transpose(Image.Transpose.ROTATE_90).save(img_dir / name, quality=85, exif=rotated.tobytes())
        else:
            im.save(img_dir / name, quality=85)
        images.append({"id": i + 1, "file_name": name, "width": w, "height": h, "license": 1, "coco_url": ""})
        for _ in range(int(rng.poisson(7.3))):
            bw, bh = float(rng.uniform(4, w / 2)), float(rng.uniform(4, h / 2))
            x, y = float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh))
            k = int(rng.integers(6, 30))  # polygon points
            t = np.linspace(0, 2 * np.pi, k, endpoint=False)
            poly = np.stack([x + bw / 2 * (1 + np.cos(t)), y + bh / 2 * (1 + np.sin(t))], 1).round(2).ravel()
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(rng.integers(1, 81)),
                         "bbox": [round(x, 2), round(y, 2), round(bw, 2), round(bh, 2)], "area": round(bw * bh, 2),
                         "iscrowd": 0, "segmentation": [poly.tolist()]})
    cats = [{"id": c, "name": f"class{c}", "supercategory": "thing"} for c in range(1, 81)]
    ann_file = root / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return img_dir, ann_file


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--size", type=int, default=160, help="longest side of the generated JPEGs")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        img_dir, ann_file = generate(Path(tmp), args.images, args.size)
        print(f"generated {args.images} JPEGs and their annotations in {time.perf_counter() - t:.1f}s")
        ann_times, header_times = [], {1: [], HEADER_THREADS: []}
        for _ in range(args.repeats):
            t = time.perf_counter()
            data = load_annotations(ann_file)
            fixes = check_annotations(data, ann_file)
            ann_times.append(time.perf_counter() - t)
            for threads, times in header_times.items():
                fixes = dict.fromkeys(fixes, 0)
                t = time.perf_counter()
                check_image_files(data, img_dir, ann_file, fixes, threads=threads)
                times.append(time.perf_counter() - t)
    n_ann = len(data["annotations"])
    per_ann = min(ann_times) / n_ann
    print(f"fixes counted: { {k: v for k, v in fixes.items() if v} }")
    print(f"annotations: {n_ann} in {min(ann_times):.2f}s = {per_ann * 1e6:.1f} us per annotation "
          f"(JSON parse included)")
    for threads, times in header_times.items():
        print(f"image headers, {threads:2d} thread(s): {args.images} in {min(times):.2f}s = "
              f"{min(times) / args.images * 1e3:.3f} ms per image")
    per_img = min(header_times[HEADER_THREADS]) / args.images  # what the check uses
    coco_ann, coco_img = per_ann * COCO_ANNOTATIONS, per_img * COCO_IMAGES
    print(f"COCO train2017 estimate: annotations {coco_ann:.0f}s + headers {coco_img:.0f}s = "
          f"{coco_ann + coco_img:.0f}s ({(coco_ann + coco_img) / 60:.1f} min), once before the grid and once "
          f"per trial")


if __name__ == "__main__":
    main()
