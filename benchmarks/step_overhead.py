"""Training-step cost of LGD relative to the plain detector, measured on identical batches in one run.

    python benchmarks/step_overhead.py [--size 800] [--backbone resnet50] [--device cuda] [--steps 10]

One line per detector: step time and peak memory of baseline and LGD, and their ratios (LGD / baseline).
The paper's Table 7 implies 1.94x the baseline's training time; the target here is <= 1.35x.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from lgd.config import config_from_dict
from lgd.engine import build_model, peak_memory_mb


def _batch(n: int, size: int, num_classes: int, device, masks: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        images.append(torch.rand(3, size, int(size * 1.33), generator=g).to(device))
        k = 12
        xy = torch.rand(k, 2, generator=g) * size * 0.7
        wh = torch.rand(k, 2, generator=g) * size * 0.25 + 8
        t = {"boxes": torch.cat([xy, xy + wh], 1).to(device),
             "labels": torch.randint(1, num_classes + 1, (k,), generator=g).to(device)}
        if masks:
            m = torch.zeros(k, size, int(size * 1.33), dtype=torch.uint8)
            for i, (x1, y1, x2, y2) in enumerate(t["boxes"].cpu().int().tolist()):
                m[i, y1:y2, x1:x2] = 1
            t["masks"] = m.to(device)
        targets.append(t)
    return images, targets


def measure(detector: str, lgd: bool, args, device) -> tuple[float, float]:
    """In a fresh process each, so that peak memory belongs to this configuration alone."""
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(_measure, detector, lgd, args, device).result()


def _measure(detector: str, lgd: bool, args, device) -> tuple[float, float]:
    torch.set_num_threads(args.threads)
    cfg = config_from_dict({
        "detector": detector, "backbone": args.backbone, "fpn_channels": args.channels,
        "input": {"min_size": args.size, "max_size": int(args.size * 1.67)},
        "lgd": {"enabled": lgd, "segm_masks": lgd and detector == "mask_rcnn"},
        "solver": {"iter_scale": 1.0}, "device": device.type})
    torch.manual_seed(0)
    model = build_model(cfg, args.classes).to(device)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    images, targets = _batch(args.batch, args.size, args.classes, device, detector == "mask_rcnn")
    it = cfg.solver.scaled(cfg.lgd.distill_start) + 1  # full LGD: distillation on, student attached

    def step():
        losses = model(images, targets, it)
        opt.zero_grad(set_to_none=True)
        model.total_loss(losses).backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / args.steps, peak_memory_mb(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=256, help="short side of the input (the paper: 800)")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--batch", type=int, default=2, help="images per step (the paper: 2 per GPU)")
    p.add_argument("--classes", type=int, default=80)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--detectors", default="retinanet,fcos,faster_rcnn,mask_rcnn")
    args = p.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({args.threads} threads)"
    print(f"# {name}, {args.backbone}, short side {args.size}, batch {args.batch}, FPN {args.channels}, "
          f"{args.steps} timed steps; memory: {'peak CUDA allocation' if device.type == 'cuda' else 'process max RSS'}")
    for det in args.detectors.split(","):
        tb, mb = measure(det, False, args, device)
        tl, ml = measure(det, True, args, device)
        print(f"{det:12s} step {tb * 1000:8.1f} ms -> {tl * 1000:8.1f} ms  time {tl / tb:.2f}x   "
              f"memory {mb:8.0f} MB -> {ml:8.0f} MB  memory {ml / mb:.2f}x", flush=True)


if __name__ == "__main__":
    main()
