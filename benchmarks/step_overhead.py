"""Training-step cost of LGD relative to the plain detector, measured on identical batches in one run.

    python benchmarks/step_overhead.py [--size 800] [--backbone resnet50] [--device cuda] [--steps 10]
    python benchmarks/step_overhead.py --detectors atss,poto            # Table 14's students
    python benchmarks/step_overhead.py --backbone swin_t --optimizer adamw --detectors retinanet,mask_rcnn  # Table 13
    python benchmarks/step_overhead.py --backend torchvision,detectron2 --detectors retinanet,faster_rcnn  # both

One line per detector (and backend, ``--backend``: torchvision's detectors or detectron2's, each with its own
defaults): step time, arithmetic (FLOPs, forward + backward, counted by
``torch.utils.flop_counter``), ops dispatched per step (every aten op, views included, counted by a
``TorchDispatchMode``: what a host-bound step pays for; ``kernels`` counts those that are not views, what a
launch-bound GPU pays for) and peak memory of baseline and LGD, and their ratios (LGD / baseline) as
``time N.NNx  flops N.NNx  ops N.NNx  kernels N.NNx  memory N.NNx``.
The paper's Table 7 implies 1.94x the baseline's training time; the targets are in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from lgd.config import config_from_dict
from lgd.engine import TrainingStep, build_model, build_optimizer, peak_memory_mb
from timing import device_name, seconds_per_call


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active (forward, backward and optimizer step), and among them
    the kernels: the ops that are not views (a view, e.g. detach/transpose/select, launches nothing)."""

    def __init__(self):
        super().__init__()
        self.count = self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        self.kernels += not func.is_view
        return func(*args, **(kwargs or {}))


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


def measure(detector: str, lgd: bool, args, device, backend: str = "torchvision") -> dict:
    """In a fresh process each, so that peak memory belongs to this configuration alone."""
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(_measure, detector, lgd, args, device, backend).result()


def _measure(detector: str, lgd: bool, args, device, backend: str = "torchvision") -> dict:
    torch.set_num_threads(args.threads)
    cfg = config_from_dict({
        "detector": detector, "backend": backend, "backbone": args.backbone, "fpn_channels": args.channels,
        "input": {"min_size": args.size, "max_size": int(args.size * 1.67)},
        "lgd": {"enabled": lgd, "segm_masks": lgd and detector == "mask_rcnn"},
        "solver": {"iter_scale": 1.0, "base_lr": 1e-4, "warmup_iters": 0, "amp": args.amp,
                   "optimizer": args.optimizer},
        "channels_last": args.channels_last, "device": device.type})
    torch.manual_seed(0)
    model = build_model(cfg, args.classes).to(device)
    model.train()
    opt, _ = build_optimizer(cfg, model)  # the engine's own optimizer (SGD or AdamW, foreach)
    images, targets = _batch(args.batch, args.size, args.classes, device, detector == "mask_rcnn")
    it = cfg.solver.scaled(cfg.lgd.distill_start) + 1  # full LGD: distillation on, student attached
    step = TrainingStep(model, model, opt, cfg, device)

    def step_once():
        step(images, targets, it)

    seconds = seconds_per_call(step_once, args.steps, args.warmup, device)
    memory = peak_memory_mb(device)
    ops = OpCounter()
    with ops:
        step_once()
    flops = FlopCounterMode(display=False)
    with flops:
        step_once()
    return {"time": seconds, "memory": memory, "ops": ops.count, "kernels": ops.kernels,
            "flops": flops.get_total_flops()}


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
    p.add_argument("--detectors", default=None,
                   help="any of retinanet, fcos, faster_rcnn, mask_rcnn, atss, poto (detectron2: the first, third and "
                        "fourth); default retinanet,fcos,faster_rcnn,mask_rcnn (detectron2: without fcos)")
    p.add_argument("--backend", default="torchvision",
                   help="torchvision, detectron2, or both comma-separated (each detector on each, side by side)")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"], help="solver.optimizer of both configs")
    p.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"], help="solver.amp of both configs")
    p.add_argument("--channels-last", action="store_true", help="channels_last of both configs")
    args = p.parse_args()
    device = torch.device(args.device)
    name = device_name(device) if device.type == "cuda" else f"CPU ({args.threads} threads per measurement)"
    backends = args.backend.split(",")
    print(f"# {name}, {args.backbone}, {args.optimizer}, short side {args.size}, batch {args.batch}, FPN {args.channels}, "
          f"{args.steps} timed steps; memory: {'peak CUDA allocation' if device.type == 'cuda' else 'process max RSS'}")
    default = "retinanet,fcos,faster_rcnn,mask_rcnn" if backends == ["torchvision"] else "retinanet,faster_rcnn,mask_rcnn"
    for det in (args.detectors or default).split(","):
        for backend in backends:
            b = measure(det, False, args, device, backend)
            m = measure(det, True, args, device, backend)
            label = det if backends == ["torchvision"] else f"{det}/{backend}"
            print(f"{label:24s} step {b['time'] * 1000:8.1f} ms -> {m['time'] * 1000:8.1f} ms  "
                  f"GFLOP {b['flops'] / 1e9:7.1f} -> {m['flops'] / 1e9:7.1f}  ops {b['ops']:6d} -> {m['ops']:6d}  "
                  f"kernels {b['kernels']:6d} -> {m['kernels']:6d}  memory {b['memory']:7.0f} MB -> {m['memory']:7.0f} MB   "
                  f"time {m['time'] / b['time']:.2f}x  flops {m['flops'] / b['flops']:.2f}x  ops {m['ops'] / b['ops']:.2f}x  "
                  f"kernels {m['kernels'] / b['kernels']:.2f}x  memory {m['memory'] / b['memory']:.2f}x", flush=True)

if __name__ == "__main__":
    main()
