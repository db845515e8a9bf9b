"""The training loop's overhead: `train_loop` time per iteration vs the pure training step, same config.

    python benchmarks/engine_throughput.py [--detector retinanet] [--lgd] [--iters 60] [--device cuda]

The loop adds data loading, the schedule, the finite check and logging to the step; the target is a loop
within 1.1x of the step. Both run the engine's own ``TrainingStep`` on the synthetic shapes set.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lgd.config import config_from_dict  # noqa: E402
from lgd.engine import TrainingStep, _to, build_datasets, build_model, build_optimizer, train_loop  # noqa: E402
from timing import device_name, seconds_per_call  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--detector", default="retinanet")
    p.add_argument("--lgd", action="store_true")
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--size", type=int, default=192)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--workers", type=int, default=None, help="data.loader_workers (default: the engine's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    log_period = 10
    if args.iters < 3 * log_period:  # the loop's time comes from the logged windows after the first
        p.error(f"--iters {args.iters}: at least {3 * log_period} (the loop is timed over logged windows of "
                f"{log_period} iterations, the first one left out)")
    out = tempfile.mkdtemp(prefix="lgd-throughput-")
    cfg = config_from_dict({
        "detector": args.detector, "backbone": args.backbone, "fpn_channels": args.channels, "device": args.device,
        "data": {"synthetic": {"num_train": 256, "num_val": 8, "image_size": args.size, "num_classes": 5},
                 "loader_workers": args.workers},
        "input": {"min_size": args.size, "max_size": int(args.size * 1.33)},
        "solver": {"iter_scale": args.iters / 90_000, "ims_per_batch": args.batch, "warmup_iters": 0,
                   "checkpoint_period": 10**9},
        "lgd": {"enabled": args.lgd, "distill_start": 0, "freeze_backbone_iters": 0},
        "log_period": log_period, "output_dir": out, "max_eval_images": 8})
    device = torch.device(args.device)
    rows = []
    train_loop(cfg, report=lambda m, c=None: rows.append(m) if "time/iter_s" in m else None)
    loop = sum(r["time/iter_s"] for r in rows[1:]) / max(1, len(rows) - 1)  # the first window warms up

    train_ds, _ = build_datasets(cfg)
    model = build_model(cfg, train_ds.num_classes).to(device).train()
    opt, _ = build_optimizer(cfg, model)
    step = TrainingStep(model, model, opt, cfg, device)
    batch = [train_ds[i] for i in range(args.batch)]
    images, targets = _to(device, [b[0] for b in batch], [b[1] for b in batch])
    pure = seconds_per_call(lambda: step(images, targets, 0), max(5, args.iters // 3), 3, device)
    name = device_name(device)
    print(f"# {name}: {args.detector} {'LGD' if args.lgd else 'baseline'}, {args.backbone}, {args.size} px, "
          f"batch {args.batch}, loader workers {'default' if args.workers is None else args.workers}")
    print(f"loop {loop * 1000:.1f} ms/iter  step {pure * 1000:.1f} ms/iter  loop/step {loop / pure:.2f}x")


if __name__ == "__main__":
    main()
