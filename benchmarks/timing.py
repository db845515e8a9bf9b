"""Timing shared by the benchmarks: seconds per call after warm-up, synchronised on a GPU; the device's name."""
from __future__ import annotations

import time
from typing import Callable

import torch


def seconds_per_call(fn: Callable[[], object], steps: int, warmup: int, device: torch.device) -> float:
    """Mean wall time of ``fn`` over ``steps`` calls after ``warmup``; peak GPU memory counts the timed calls."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
