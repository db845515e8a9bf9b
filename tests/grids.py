"""Tiny grids for the end-to-end tests: real Ray, real MLflow, seconds per trial."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def tiny_grid(name: str, tables: list[dict], iter_scale: float = 0.0001, checkpoint_period: int = 20000,
              max_failures: int = 2, num_workers: int = 1) -> dict:
    return {
        "name": name,
        "datasets": {"shapes": {"synthetic": {"num_train": 8, "num_val": 4, "image_size": 64, "num_classes": 2,
                                              "max_objects": 3, "seed": 3}}},
        "defaults": {"backbone": "resnet18", "fpn_channels": 32, "device": "cpu",
                     "input": {"min_size": 64, "max_size": 64},
                     "solver": {"iter_scale": iter_scale, "ims_per_batch": 2, "warmup_iters": 0,
                                "clip_grad_norm": 5.0, "checkpoint_period": checkpoint_period},
                     "lgd": {"num_heads": 4, "distill_start": 20000, "freeze_backbone_iters": 0},
                     "log_period": 2, "max_eval_images": 4},
        "resources": {"num_workers": num_workers, "cpus_per_worker": 1},
        "max_failures": max_failures,
        "tables": tables,
    }


def write_grid(tmp_path: Path, grid: dict) -> Path:
    p = tmp_path / f"{grid['name']}.yaml"
    p.write_text(yaml.safe_dump(grid, sort_keys=False, allow_unicode=True))
    return p


def run_grid_cmd(grid: Path, out: Path, *extra: str) -> list[str]:
    """The run_grid.py command line; a local Ray of 2 CPUs unless ``extra`` joins a cluster (--address)."""
    local = [] if "--address" in extra else ["--num-cpus", "2"]
    return [sys.executable, str(ROOT / "orchestration" / "run_grid.py"), "--grid", str(grid), "--output", str(out),
            *local, *extra]


def run_grid(grid: Path, out: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"}
    return subprocess.run(run_grid_cmd(grid, out, *extra), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def wait_for(pred, timeout, what):
    """Poll ``pred`` every 0.5 s until it returns something truthy (returned); fail after ``timeout`` s."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        got = pred()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")
