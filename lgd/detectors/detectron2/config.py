"""detectron2 CfgNodes of the paper's detectors, from detectron2's own model-zoo configs.

A detector's config is its R-50-FPN model-zoo file (RetinaNet, Faster R-CNN, Mask R-CNN) with the backbone's keys
on top, as detectron2's R-101 / X-101 / deformable zoo files and the reference LGD configs set them (those files
differ from R-50's only in these keys, the weights and the schedule; our solver is the trial's), then the trial's
classes, FPN width and input sizes, then the trial's ``detector_options`` (detectron2 config keys).

``detectron2.model_zoo.get_config_file`` imports ``pkg_resources``, which current setuptools no longer ships: the
zoo's files are found beside the ``detectron2.model_zoo`` package instead (detectron2 installs ``configs/`` there).
"""
from __future__ import annotations

import functools
import importlib.util
import logging
from pathlib import Path
from typing import Any

ZOO_FILES = {
    "retinanet": "COCO-Detection/retinanet_R_50_FPN_1x.yaml",
    "faster_rcnn": "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml",
    "mask_rcnn": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
}
# As detectron2's zoo files (R-101: *_R_101_FPN_3x.yaml; X-101: *_X_101_32x8d_FPN_3x.yaml, a C2 model with the
# ImageNet std) and the reference's "dcnv2" configs (deformable v2 in res3-res5). R-18: for tiny CPU runs.
BACKBONE_KEYS: dict[str, dict[str, Any]] = {
    "resnet18": {"MODEL.RESNETS.DEPTH": 18, "MODEL.RESNETS.RES2_OUT_CHANNELS": 64},
    "resnet50": {"MODEL.RESNETS.DEPTH": 50},
    "resnet101": {"MODEL.RESNETS.DEPTH": 101},
    "resnext101_32x8d": {"MODEL.RESNETS.DEPTH": 101, "MODEL.RESNETS.NUM_GROUPS": 32,
                         "MODEL.RESNETS.WIDTH_PER_GROUP": 8, "MODEL.RESNETS.STRIDE_IN_1X1": False,
                         "MODEL.PIXEL_STD": [57.375, 57.120, 58.395]},
}
DCN_KEYS = {"MODEL.RESNETS.DEFORM_ON_PER_STAGE": [False, True, True, True], "MODEL.RESNETS.DEFORM_MODULATED": True}
# Keys the trial config sets: a detector option may not (the trial key to use instead)
TRIAL_KEYS = {
    "MODEL.META_ARCHITECTURE": "detector", "MODEL.MASK_ON": "detector (mask_rcnn)",
    "MODEL.RETINANET.NUM_CLASSES": "the dataset's classes", "MODEL.ROI_HEADS.NUM_CLASSES": "the dataset's classes",
    "MODEL.FPN.OUT_CHANNELS": "fpn_channels", "MODEL.WEIGHTS": "weights", "MODEL.DEVICE": "device",
    "MODEL.RESNETS.DEPTH": "backbone", "MODEL.RESNETS.NUM_GROUPS": "backbone",
    "MODEL.RESNETS.WIDTH_PER_GROUP": "backbone", "MODEL.RESNETS.DEFORM_ON_PER_STAGE": "backbone (a _dcn variant)",
    "INPUT.MIN_SIZE_TRAIN": "input.min_size / input.multi_scale", "INPUT.MIN_SIZE_TEST": "input.min_size",
    "INPUT.MAX_SIZE_TRAIN": "input.max_size", "INPUT.MAX_SIZE_TEST": "input.max_size",
}
# Outside MODEL.*, the keys the model reads when it is built
MODEL_READS = ("INPUT.FORMAT", "TEST.DETECTIONS_PER_IMAGE")


def zoo_config_dir() -> Path:
    """detectron2's model-zoo ``configs/`` folder (installed inside ``detectron2/model_zoo/``), found without
    importing ``detectron2.model_zoo`` (which needs ``pkg_resources``)."""
    spec = importlib.util.find_spec("detectron2.model_zoo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("detectron2.model_zoo is not installed")
    d = Path(next(iter(spec.submodule_search_locations))) / "configs"
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: detectron2's model-zoo configs are not installed there")
    return d


def zoo_config_file(name: str) -> Path:
    path = zoo_config_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such detectron2 model-zoo config")
    return path


def backbone_problem(backbone: str) -> str | None:
    """Why detectron2 cannot build ``backbone``, or None."""
    dcn = backbone.endswith("_dcn")
    arch = backbone[: -len("_dcn")] if dcn else backbone
    if arch not in BACKBONE_KEYS:
        return (f"backend detectron2 has ResNet/ResNeXt backbones ({', '.join(BACKBONE_KEYS)}, and _dcn variants of "
                f"the bottleneck ones); not {backbone}")
    if dcn and arch == "resnet18":
        return "detectron2 has no deformable convolutions in R-18/R-34 (MODEL.RESNETS.DEFORM_ON_PER_STAGE)"
    return None


# detectron2's ImageNet checkpoints by backbone (its model zoo's ImageNetPretrained/MSRA/R-50.pkl, ...): a folder
# given as ``weights`` holds them under these names, so one grid setting serves every backbone
ZOO_WEIGHTS = {"resnet50": "R-50.pkl", "resnet101": "R-101.pkl", "resnext101_32x8d": "X-101-32x8d.pkl"}


def weights_problem(weights: str | None) -> str | None:
    """``weights`` of backend detectron2 that is a torchvision weights name rather than a checkpoint (None: fine)."""
    if weights is None or "/" in weights or "." in weights or "://" in weights:
        return None
    return (f"backend detectron2 takes detectron2's checkpoints (a file such as R-50.pkl, or a folder holding "
            f"{', '.join(ZOO_WEIGHTS.values())}), not the torchvision weights name {weights!r}")


def resolve_weights(weights: str | None, backbone: str) -> str | None:
    """A folder of detectron2's ImageNet checkpoints -> the file of ``backbone`` (``ZOO_WEIGHTS``); else as given."""
    if weights is None or not Path(weights).is_dir():
        return weights
    arch = backbone[: -len("_dcn")] if backbone.endswith("_dcn") else backbone
    if arch not in ZOO_WEIGHTS:
        raise ValueError(f"weights {weights!r}: a folder of detectron2 checkpoints has none for {backbone}; "
                         f"give the checkpoint file itself")
    path = Path(weights) / ZOO_WEIGHTS[arch]
    if not path.is_file():
        raise FileNotFoundError(f"weights {weights!r}: no {ZOO_WEIGHTS[arch]} in that folder (detectron2's model zoo: "
                                f"ImageNetPretrained/MSRA/R-50.pkl, MSRA/R-101.pkl, FAIR/X-101-32x8d.pkl)")
    return str(path)


def base_config(detector: str):
    """The model-zoo config of ``detector`` (R-50-FPN), unfrozen (a copy: change it freely)."""
    if detector not in ZOO_FILES:
        raise ValueError(f"backend detectron2 has {', '.join(ZOO_FILES)}; not {detector}")
    cfg = _zoo_config(ZOO_FILES[detector]).clone()
    cfg.defrost()
    return cfg


@functools.lru_cache(maxsize=None)
def _zoo_config(name: str):
    from detectron2.config import get_cfg

    cfg = get_cfg()
    # Base-RetinaNet.yaml computes its anchor sizes with a YAML python tag, which fvcore loads with unsafe_load and a
    # warning each time; the file is detectron2's own, installed with it
    quiet = logging.getLogger("fvcore.common.config")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        cfg.merge_from_file(str(zoo_config_file(name)))
    finally:
        quiet.setLevel(level)
    cfg.freeze()
    return cfg


def _set(cfg, key: str, value: Any) -> None:
    """``cfg[key] = value`` through yacs' own checks (existing key, compatible type); an int where the config holds
    a float is taken as that float (YAML's ``2`` for ``2.0``)."""
    from detectron2.config import CfgNode

    *path, leaf = key.split(".")
    node = cfg
    for p in path:
        node = node.get(p) if isinstance(node, CfgNode) else None
        if node is None:
            raise KeyError(f"no detectron2 config key {key}")
    if not isinstance(node, CfgNode) or leaf not in node:
        raise KeyError(f"no detectron2 config key {key}")
    if isinstance(node[leaf], CfgNode):
        raise KeyError(f"{key} is a section of detectron2's config, not a value")
    if isinstance(node[leaf], float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    cfg.merge_from_list([key, value])


def option_problems(detector: str, options: dict) -> list[tuple[str, str]]:
    """(key, message) for every ``detector_options`` key that detectron2's config of ``detector`` refuses."""
    if detector not in ZOO_FILES:
        return []  # the detector's own problem (TrainConfig names it)
    cfg = base_config(detector)
    problems = []
    for key, value in options.items():
        if key in TRIAL_KEYS:
            problems.append((key, f"set by the trial config ({TRIAL_KEYS[key]}), not by a detector option"))
            continue
        if not (key.startswith("MODEL.") or key in MODEL_READS):
            problems.append((key, f"not a key of the model: detectron2 options are MODEL.* keys (and "
                                  f"{', '.join(MODEL_READS)}); the solver, data and input sizes are the trial's"))
            continue
        try:
            _set(cfg, key, value)
        except (KeyError, ValueError, AssertionError, TypeError) as e:
            problems.append((key, str(e.args[0] if e.args else e)))
    return problems


def build_config(detector: str, backbone: str, num_classes: int, min_sizes: tuple[int, ...], max_size: int,
                 weights: str | None, channels: int, options: dict | None):
    """The frozen CfgNode of one detector; ``num_classes`` is K (no background), as detectron2 counts.

    Weights given: the zoo's FrozenBN and frozen stem + res2 (FREEZE_AT 2), for detectron2's ImageNet checkpoints.
    From scratch (weights None): BatchNorm in the ResNet and nothing frozen, as the torchvision backend does."""
    problem = backbone_problem(backbone)
    if problem:
        raise ValueError(problem)
    cfg = base_config(detector)
    dcn = backbone.endswith("_dcn")
    for k, v in {**BACKBONE_KEYS[backbone[: -len("_dcn")] if dcn else backbone], **(DCN_KEYS if dcn else {})}.items():
        _set(cfg, k, v)
    cfg.MODEL.RETINANET.NUM_CLASSES = num_classes
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    cfg.MODEL.FPN.OUT_CHANNELS = channels
    cfg.MODEL.DEVICE = "cpu"  # the engine moves the model to its device
    cfg.MODEL.WEIGHTS = weights or ""
    if weights is None:
        cfg.MODEL.RESNETS.NORM = "BN"
        cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.INPUT.MIN_SIZE_TRAIN = tuple(min_sizes)
    cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING = "choice"
    cfg.INPUT.MIN_SIZE_TEST = max(min_sizes)
    cfg.INPUT.MAX_SIZE_TRAIN = cfg.INPUT.MAX_SIZE_TEST = max_size
    problems = option_problems(detector, options or {})
    if problems:
        raise ValueError("; ".join(f"detector_options.{k}: {m}" for k, m in problems))
    for k, v in (options or {}).items():
        _set(cfg, k, v)
    cfg.freeze()
    return cfg
