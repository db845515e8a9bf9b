"""Shared fixtures: a small synthetic COCO dataset and tiny trial configs (ResNet-18, 64 px, narrow FPN)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(2)

from lgd.config import config_from_dict  # noqa: E402
from lgd.data.synthetic import ensure_synthetic  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _data_cache(tmp_path_factory):
    os.environ["LGD_DATA_CACHE"] = str(tmp_path_factory.mktemp("data-cache"))


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> dict[str, str]:
    return ensure_synthetic(tmp_path_factory.mktemp("shapes"), num_train=12, num_val=6, image_size=64,
                            num_classes=3, max_objects=4, seed=1)


def tiny_config(**over):
    base = {
        "backbone": "resnet18", "fpn_channels": 32, "device": "cpu",
        "data": {"synthetic": {"num_train": 12, "num_val": 6, "image_size": 64, "num_classes": 3,
                               "max_objects": 4, "seed": 1}},
        "input": {"min_size": 64, "max_size": 64},
        "solver": {"iter_scale": 0.0001, "ims_per_batch": 2, "base_lr": 0.01, "warmup_iters": 0,
                   "clip_grad_norm": 5.0, "checkpoint_period": 40000},
        "lgd": {"num_heads": 4, "distill_start": 20000, "freeze_backbone_iters": 0},
        "log_period": 2,
    }
    from lgd.typed import deep_merge
    return config_from_dict(deep_merge(base, over))


@pytest.fixture
def make_config():
    return tiny_config
