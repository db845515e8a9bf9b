"""A rough cost estimate for --dry-run, scaled from the paper's Table 7 (RetinaNet R-50 2x on 8 V100s)."""
from __future__ import annotations

from lgd.config import TrainConfig

# Table 7: the baseline took 12.1 h on 8 V100 for 180k iterations; LGD 23.5 h (1.94x).
_V100_HOURS_PER_ITER = 12.1 * 8 / 180_000
_LGD_FACTOR = 23.5 / 12.1
_BACKBONE = {"resnet18": 0.6, "resnet50": 1.0, "resnet101": 1.35, "resnext101_32x8d": 2.2, "swin_t": 1.1}
_DETECTOR = {"retinanet": 1.0, "fcos": 0.95, "faster_rcnn": 0.9, "mask_rcnn": 1.2, "atss": 0.95, "poto": 1.0}


def v100_hours(cfg: TrainConfig) -> float:
    arch = cfg.backbone.removesuffix("_dcn")
    f = _BACKBONE[arch] * (1.15 if cfg.backbone.endswith("_dcn") else 1.0) * _DETECTOR[cfg.detector]
    f *= (cfg.input.min_size / 800) ** 2 * cfg.solver.ims_per_batch / 16
    if cfg.lgd.enabled:
        f *= _LGD_FACTOR
    return cfg.solver.max_iter * _V100_HOURS_PER_ITER * f
