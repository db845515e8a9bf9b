"""The implicit teacher alone: forward + backward time and peak memory on a COCO-sized batch.

    python benchmarks/teacher.py [--images 16] [--objects 50] [--size 800] [--device cuda] [--steps 5]

Student features of a 5-level pyramid (strides 8-128, as RetinaNet's) at short side ``--size``, ``--objects``
boxes per image over 80 classes; the reference teacher's own time on the same batch is measured outside.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lgd.engine import peak_memory_mb  # noqa: E402
from lgd.objects import pack_objects  # noqa: E402
from lgd.teacher import ImplicitTeacher  # noqa: E402
from timing import device_name, seconds_per_call  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--objects", type=int, default=50)
    p.add_argument("--size", type=int, default=800)
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--classes", type=int, default=80)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    dev, dt = torch.device(args.device), getattr(torch, args.dtype)
    H, W = args.size, int(args.size * 1333 / 800) // 32 * 32 + 32
    g = torch.Generator().manual_seed(0)
    targets = []
    for _ in range(args.images):
        xy = torch.rand(args.objects, 2, generator=g) * torch.tensor([W * 0.8, H * 0.8])
        wh = torch.rand(args.objects, 2, generator=g) * torch.tensor([W * 0.3, H * 0.3]) + 4
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).to(dev),
                        "labels": torch.randint(1, args.classes + 1, (args.objects,), generator=g).to(dev)})
    feats = [torch.randn(args.images, args.channels, -(-H // s), -(-W // s), device=dev, dtype=dt,
                         requires_grad=True) for s in (8, 16, 32, 64, 128)]
    teacher = ImplicitTeacher(args.classes, args.channels).to(dev, dt)

    def step():
        objs = pack_objects(targets, [(H, W)] * args.images, (H, W), use_context=True)
        out = teacher(feats, objs)
        sum(o.float().square().mean() for o in out).backward()

    ms = seconds_per_call(step, args.steps, args.warmup, dev) * 1000
    name = device_name(dev)
    print(f"# {name}, {args.dtype}: {args.images} images x {args.objects} objects, {H}x{W} input, "
          f"{args.channels} channels, {args.classes} classes")
    print(f"teacher forward+backward {ms:.1f} ms  peak memory {peak_memory_mb(dev):.0f} MB")


if __name__ == "__main__":
    main()
