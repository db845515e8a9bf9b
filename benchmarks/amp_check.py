"""Mixed precision changes no result that matters: fp32 vs ``solver.amp`` loss curves on the synthetic set.

    python benchmarks/amp_check.py [--amp bf16] [--iters 300] [--detector retinanet] [--lgd]
    python benchmarks/amp_check.py --floor [--iters 300] [--lgd]     # fp32 vs fp32 with the next seed

Both runs start from the same seed and see the same batches; the curves are compared as moving averages
(window 20): the largest relative gap, and the final windows' losses. ``--floor`` compares fp32 with fp32 of
another seed (another initialisation and batch order) instead: the gap two equally valid runs show, against
which the mixed-precision gap is read.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lgd.config import config_from_dict  # noqa: E402
from lgd.engine import train_loop  # noqa: E402


def curve(args, amp: str, seed: int) -> np.ndarray:
    cfg = config_from_dict({"seed": seed,
        "detector": args.detector, "backbone": "resnet18", "fpn_channels": 64, "device": args.device,
        "data": {"synthetic": {"num_train": 128, "num_val": 8, "image_size": 96, "num_classes": 3}},
        "input": {"min_size": 96, "max_size": 128},
        "solver": {"iter_scale": args.iters / 90_000, "ims_per_batch": 4, "base_lr": 0.02, "warmup_iters": 3000,
                   "clip_grad_norm": 5.0, "checkpoint_period": 10**9, "amp": amp},
        "lgd": {"enabled": args.lgd, "distill_start": 3000, "freeze_backbone_iters": 0},
        "log_period": 1, "output_dir": tempfile.mkdtemp(prefix="lgd-amp-"), "max_eval_images": 8})
    rows = []
    train_loop(cfg, report=lambda m, c=None: rows.append(m["total_loss"]) if "total_loss" in m else None)
    return np.asarray(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--amp", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--detector", default="retinanet")
    p.add_argument("--lgd", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--floor", action="store_true", help="fp32 vs fp32 of seed + 1, not vs --amp")
    args = p.parse_args()
    other = "fp32 seed+1" if args.floor else args.amp
    ref = curve(args, "off", args.seed)
    amp = curve(args, "off", args.seed + 1) if args.floor else curve(args, args.amp, args.seed)
    k = np.ones(20) / 20
    a, b = np.convolve(ref, k, "valid"), np.convolve(amp, k, "valid")
    gap = np.abs(a - b) / np.abs(a)
    print(f"# {args.detector} {'LGD' if args.lgd else 'baseline'}, {args.iters} iterations, {args.device}")
    print(f"fp32 vs {other}: max relative gap of the moving-average loss {gap.max():.3f} (mean {gap.mean():.3f}); "
          f"final window fp32 {a[-1]:.4f}, {other} {b[-1]:.4f}")


if __name__ == "__main__":
    main()
