"""Typed, validated configuration of one training trial (detector, data, schedule, LGD §3 switches)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic.dataclasses import dataclass

from lgd.typed import STRICT, ConfigError, Section, build, deep_merge, load_yaml, set_dotted, to_dict

DETECTORS = ("retinanet", "fcos", "faster_rcnn", "mask_rcnn", "atss", "poto")
BACKBONES = (
    "resnet18", "resnet50", "resnet101", "resnext101_32x8d",
    "resnet18_dcn", "resnet50_dcn", "resnet101_dcn", "resnext101_32x8d_dcn", "swin_t",
)
DETECTRON2_DETECTORS = ("retinanet", "faster_rcnn", "mask_rcnn")  # the paper's own, from detectron2's model zoo
# §4.1: 1x = 90k iterations, lr /10 at 60k and 80k; 2x = 180k (120k, 160k); 3x = 270k (210k, 250k).
SCHEDULES = {"1x": (90_000, (60_000, 80_000)), "2x": (180_000, (120_000, 160_000)), "3x": (270_000, (210_000, 250_000))}
# Official LGD configs: context object for the dense detectors, detached appearance for the R-CNNs.
DETECTOR_DEFAULTS = {
    "retinanet": {"use_context": True, "detach_appearance": False},
    "fcos": {"use_context": True, "detach_appearance": False},
    "atss": {"use_context": True, "detach_appearance": False},  # the dense detectors' settings
    "poto": {"use_context": True, "detach_appearance": False},
    "faster_rcnn": {"use_context": False, "detach_appearance": True},
    "mask_rcnn": {"use_context": False, "detach_appearance": True},
}


def detector_option_problems(detector: str, options: dict, backend: str = "torchvision") -> list[tuple[str, str]]:
    """Keys of ``detector_options`` that the (torchvision or lgd) constructor of ``detector`` does not take
    (backend detectron2: keys that are not detectron2 config keys of the detector's model-zoo config)."""
    if not options:  # nothing to check: no torch/torchvision import (the report's path stays light)
        return []
    if backend == "detectron2":
        from lgd.detectors.detectron2 import option_problems

        return option_problems(detector, options)
    import inspect

    from lgd.detectors.registry import MODEL_CLASSES

    cls = MODEL_CLASSES[detector]
    taken_by_us = {"self", "backbone", "num_classes", "min_size", "max_size", "kwargs"}
    # Mask R-CNN passes its **kwargs on to Faster R-CNN: both signatures count
    allowed = {p for c in cls.__mro__ if "__init__" in vars(c) and c.__module__.startswith(("torchvision", "lgd."))
               for p in inspect.signature(c.__init__).parameters} - taken_by_us
    return [(k, f"{cls.__name__} takes no option {k!r}") for k in options if k not in allowed]


@dataclass(config=STRICT)
class SyntheticData(Section):
    """Parameters of the generated shapes dataset (lgd.data.synthetic)."""
    num_train: int = 48
    num_val: int = 16
    image_size: int = 128
    num_classes: int = 3
    max_objects: int = 8
    seed: int = 0

    def check(self):
        for name in ("num_train", "num_val", "num_classes", "max_objects"):
            if getattr(self, name) < 1:
                yield name, "must be >= 1"
        if self.image_size < 32:
            yield "image_size", "must be >= 32"


@dataclass(config=STRICT)
class DataConfig(Section):
    """The train/val sets by ``format``: ``coco`` (image folder + instances JSON each), ``voc`` (a VOCdevkit folder
    as ``root``: ``train_sets``/``val_sets`` name <folder>/<ImageSets/Main list>, default the paper's 07+12
    trainval / 07 test) or ``crowdhuman`` (``root`` holding Images/ and annotation_{train,val}.odgt); or, in any
    format, a synthetic set (written in that format).

    ``name`` identifies the dataset in the trial's digest; the paths do not, so data can move."""
    name: str = ""
    format: Literal["coco", "voc", "crowdhuman"] = "coco"
    root: Optional[str] = None  # voc, crowdhuman
    train_sets: Optional[list[str]] = None  # voc; None: VOC2007/trainval, VOC2012/trainval
    val_sets: Optional[list[str]] = None  # voc; None: VOC2007/test
    train_images: Optional[str] = None
    train_annotations: Optional[str] = None
    val_images: Optional[str] = None
    val_annotations: Optional[str] = None
    synthetic: Optional[SyntheticData] = None
    max_objects_per_image: int = 300
    loader_workers: Optional[int] = None  # None: 4 worker processes on a GPU, 0 (the main process) on CPU
    # images that pass the pre-training check but fail to decode later are skipped and counted
    # (data/unreadable_images); more than this fraction of a split stops the trial with a DataError
    max_unreadable_fraction: float = 0.001

    def check(self):
        paths = [self.train_images, self.train_annotations, self.val_images, self.val_annotations]
        if self.format == "coco":
            if self.root is not None:
                yield "root", ("format coco takes train_images, train_annotations, val_images, val_annotations; "
                               "'root' is for format voc or crowdhuman")
            if self.synthetic is None and any(p is None for p in paths):
                yield "", ("give either 'synthetic' or all of train_images, train_annotations, val_images, "
                           "val_annotations")
            if self.synthetic is not None and any(p is not None for p in paths):
                yield "", "'synthetic' and dataset paths are mutually exclusive"
        else:
            layout = "a VOCdevkit folder" if self.format == "voc" else "the folder of Images/ and annotation_*.odgt"
            given = [k for k in ("train_images", "train_annotations", "val_images", "val_annotations")
                     if getattr(self, k) is not None]
            if given:
                yield given[0], (f"format {self.format} reads its own layout under 'root' ({layout}): "
                                 f"drop {', '.join(given)}")
            if (self.root is None) == (self.synthetic is None):
                yield "", f"format {self.format}: give either 'root' ({layout}) or 'synthetic'"
        for key in ("train_sets", "val_sets"):
            sets = getattr(self, key)
            if sets is not None and self.format != "voc":
                yield key, "only format voc has image sets"
            elif sets is not None and not sets:
                yield key, "list at least one image set, e.g. VOC2007/trainval"
            for s in sets or ():
                if not s.strip("/").count("/") == 1:
                    yield key, (f"{s!r}: expected <folder>/<split> (a list under <folder>/ImageSets/Main), "
                                f"e.g. VOC2007/test")
        if self.max_objects_per_image < 1:
            yield "max_objects_per_image", "must be >= 1"
        if self.loader_workers is not None and self.loader_workers < 0:
            yield "loader_workers", "must be >= 0"
        if not 0 <= self.max_unreadable_fraction < 1:
            yield "max_unreadable_fraction", "must be in [0, 1)"


@dataclass(config=STRICT)
class InputConfig(Section):
    """Resizing (§4.1): short side ``min_size`` (ss), or sampled in [0.8, 1] x min_size (ms: 640..800)."""
    min_size: int = 800
    max_size: int = 1333
    multi_scale: bool = False
    # training images flipped left-right at random (p 0.5) with their boxes and masks, as detectron2's default
    # mapper does (RandomFlip after the resize); baseline and LGD alike. Evaluation never flips.
    horizontal_flip: bool = True

    def check(self):
        if self.min_size < 16:
            yield "min_size", "must be >= 16"
        if self.max_size < self.min_size:
            yield "max_size", "must be >= min_size"

    def train_sizes(self) -> tuple[int, ...]:
        if not self.multi_scale:
            return (self.min_size,)
        return tuple(int(round(self.min_size * f)) for f in (0.8, 0.84, 0.88, 0.92, 0.96, 1.0))


# Learning rate and weight decay of each optimizer where a config leaves them out: SGD as §4.1; AdamW as the
# Swin-T students' detection recipe (the reference configs of Table 13: lr 1e-4, weight decay 0.05).
OPTIMIZER_DEFAULTS = {"sgd": {"base_lr": 0.01, "weight_decay": 1e-4}, "adamw": {"base_lr": 1e-4, "weight_decay": 0.05}}


def _optimizer_settings(opt) -> dict:
    """lr, weight decay (None: ``OPTIMIZER_DEFAULTS`` of ``opt.optimizer``) and momentum of a solver section."""
    d = OPTIMIZER_DEFAULTS[opt.optimizer]
    return {"optimizer": opt.optimizer, "momentum": opt.momentum,
            "base_lr": d["base_lr"] if opt.base_lr is None else opt.base_lr,
            "weight_decay": d["weight_decay"] if opt.weight_decay is None else opt.weight_decay}


@dataclass(config=STRICT)
class SolverConfig(Section):
    """SGD or AdamW with linear warm-up and step decay (§4.1). Iteration counts are in the paper's units and
    are multiplied by ``iter_scale`` (also the LGD schedule's), so a grid can keep the paper's numbers.
    ``base_lr``/``weight_decay`` left out: the optimizer's own (``OPTIMIZER_DEFAULTS``); ``momentum``: SGD's
    momentum, AdamW's beta1."""
    schedule: Literal["1x", "2x", "3x"] = "1x"
    iter_scale: float = 1.0
    ims_per_batch: int = 16
    optimizer: Literal["sgd", "adamw"] = "sgd"
    base_lr: Optional[float] = None
    momentum: float = 0.9
    weight_decay: Optional[float] = None
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    gamma: float = 0.1
    checkpoint_period: int = 5000
    # the reference's base configs: every gradient element clipped to ±1.0 (detectron2's CLIP_TYPE "value"),
    # each optimizer (student, teacher) on its own; None: no element clipping
    clip_grad_value: Optional[float] = 1.0
    # global-norm clipping, applied per optimizer (the student's parameters, then the teacher's), not over both
    clip_grad_norm: Optional[float] = None
    amp: Literal["off", "bf16", "fp16"] = "off"  # mixed precision (autocast); fp16 with a grad scaler

    def check(self):
        if not 0 < self.iter_scale <= 10:
            yield "iter_scale", "must be in (0, 10]"
        if self.ims_per_batch < 1:
            yield "ims_per_batch", "must be >= 1"
        yield from _check_optimizer(self)
        if self.checkpoint_period < 1:
            yield "checkpoint_period", "must be >= 1"
        for name in ("clip_grad_value", "clip_grad_norm"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                yield name, "must be > 0 (or null: off)"

    def settings(self) -> dict:
        """optimizer, base_lr, momentum, weight_decay with the optimizer's defaults filled in."""
        return _optimizer_settings(self)

    def scaled(self, iters: int) -> int:
        return int(round(iters * self.iter_scale))

    @property
    def max_iter(self) -> int:
        return max(1, self.scaled(SCHEDULES[self.schedule][0]))

    @property
    def milestones(self) -> tuple[int, ...]:
        return tuple(self.scaled(m) for m in SCHEDULES[self.schedule][1])


# The reference freezes the student's trunk for PRE_FREEZE_STUDENT_BACKBONE_ITERS: its code's default 10k (the
# 1x configs), 20k in the released 2x/3x configs; paper units, scaled by iter_scale like the rest.
FREEZE_ITERS = {"1x": 10_000, "2x": 20_000, "3x": 20_000}
# FCOS's context object: off in the released R-50 FCOS config, on from R-101 up
FCOS_CONTEXT_BACKBONES = ("resnet101", "resnet101_dcn", "resnext101_32x8d", "resnext101_32x8d_dcn")


def _check_optimizer(opt):
    if opt.base_lr is not None and opt.base_lr <= 0:
        yield "base_lr", "must be > 0"
    if opt.weight_decay is not None and opt.weight_decay < 0:
        yield "weight_decay", "must be >= 0"
    if not 0 <= opt.momentum < 1:
        yield "momentum", "must be in [0, 1)"


@dataclass(config=STRICT)
class TeacherOptimizer(Section):
    """Optimizer settings of the implicit teacher's modules (official configs: like the student's; the Swin-T
    Mask R-CNN's: SGD for the teacher, AdamW for the student). A left-out ``base_lr``/``weight_decay`` is the
    student's (``solver``) where both use the same optimizer, else this optimizer's default."""
    optimizer: Literal["sgd", "adamw"] = "sgd"
    base_lr: Optional[float] = None
    momentum: float = 0.9
    weight_decay: Optional[float] = None

    def check(self):
        yield from _check_optimizer(self)

    def settings(self) -> dict:
        return _optimizer_settings(self)


@dataclass(config=STRICT)
class LGDConfig(Section):
    """Switches of the method (§3) and of the paper's ablations (Tables 4-6, Appendices A-B)."""
    enabled: bool = False
    label_encoder: Literal["pointnet", "mlp", "transformer"] = "pointnet"
    label_norm: Literal["layernorm", "batchnorm"] = "layernorm"
    appearance_pooling: Literal["mask", "roialign"] = "mask"
    detach_appearance: Optional[bool] = None  # None: the detector's default (DETECTOR_DEFAULTS)
    use_context: Optional[bool] = None  # None: the detector's default
    # Mask R-CNN (Table 10): instance masks instead of box masks for pooling and painting, and each object's mask
    # inside its box at 7 x 7 appended to its descriptor (the reference's LOAD_LABELMAP)
    segm_masks: bool = False
    attention_query: Literal["student", "label"] = "student"  # Table 5
    mapper_inputs: Optional[Literal["objects", "context", "both"]] = None  # Table 6(a); None: all available
    shared_head: bool = True  # Table 6(b)
    num_heads: int = 8
    # Alternatives to the reference teacher's behaviour (§3 is silent; default off = the reference's):
    image_level_tnet: bool = False  # one T-net transform per image, pooled over its objects (PointNet's own)
    masks_cover_touched_cells: bool = False  # masks mark every cell a box touches (>= 1), not the cells inside it
    context_box_per_image: bool = False  # the context object spans its image, not the whole padded batch
    distill_weight: float = 1.0  # λ of Eq. 7
    distill_start: int = 30_000
    # the last distill_stop_before_end iterations: the distillation loss is kept with the student detached (the
    # reference's POST_NONDISTILL_ITERS): the adaptation head and, through its own losses, the teacher still learn
    distill_stop_before_end: int = 0
    # the student's trunk (ResNet/Swin stages) gets no gradient for the first freeze_backbone_iters;
    # None: the reference's, 10k for 1x, 20k for 2x/3x (FREEZE_ITERS)
    freeze_backbone_iters: Optional[int] = None
    # what is frozen: "trunk" (the reference's student.raw_backbone) or "backbone" (trunk + FPN + P6/P7, as before)
    freeze_scope: Literal["trunk", "backbone"] = "trunk"
    optimizer: TeacherOptimizer = field(default_factory=TeacherOptimizer)

    def check(self):
        if self.distill_weight < 0:
            yield "distill_weight", "λ must be >= 0"
        if self.num_heads < 1:
            yield "num_heads", "must be >= 1"
        for name in ("distill_start", "distill_stop_before_end", "freeze_backbone_iters"):
            if (getattr(self, name) or 0) < 0:
                yield name, "must be >= 0"


@dataclass(config=STRICT)
class TrainConfig(Section):
    """One trial: what `python -m lgd.train` and each Ray Train worker run."""
    detector: Literal["retinanet", "fcos", "faster_rcnn", "mask_rcnn", "atss", "poto"] = "retinanet"
    # the detection library: torchvision's detectors (default), or detectron2's (the paper's; installed from source)
    backend: Literal["torchvision", "detectron2"] = "torchvision"
    backbone: str = "resnet50"
    weights: Optional[str] = None  # backbone weights: a state_dict path or a torchvision enum name
    fpn_channels: int = 256  # FPN width = LGD embedding width (paper: 256; small values for CPU tests)
    detector_options: dict[str, Any] = field(default_factory=dict)  # extra torchvision constructor arguments
    data: DataConfig = field(default_factory=lambda: DataConfig(synthetic=SyntheticData()))
    input: InputConfig = field(default_factory=InputConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    lgd: LGDConfig = field(default_factory=LGDConfig)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    output_dir: str = "output"
    log_period: int = 20
    eval_teacher: bool = False
    max_eval_images: Optional[int] = None
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    channels_last: bool = False  # NHWC memory format for the model and its input batch

    def check(self):
        if self.backbone not in BACKBONES:
            yield "backbone", f"unknown backbone {self.backbone!r}; known: {', '.join(BACKBONES)}"
        if self.fpn_channels < 8 or self.fpn_channels % max(1, self.lgd.num_heads):  # num_heads < 1: lgd's problem
            yield "fpn_channels", f"must be >= 8 and a multiple of lgd.num_heads ({self.lgd.num_heads})"
        for key, msg in detector_option_problems(self.detector, self.detector_options, self.backend):
            yield f"detector_options.{key}", msg
        if self.log_period < 1:
            yield "log_period", "must be >= 1"
        if self.backend == "detectron2":
            from lgd.detectors.detectron2.config import backbone_problem, weights_problem  # standard library only

            if self.detector not in DETECTRON2_DETECTORS:
                yield "detector", (f"backend detectron2 has {', '.join(DETECTRON2_DETECTORS)}; {self.detector} is "
                                   f"torchvision's only")
            problems = {"backbone": backbone_problem(self.backbone), "weights": weights_problem(self.weights)}
            yield from ((key, problem) for key, problem in problems.items() if problem)
        if self.detector == "mask_rcnn" and self.data.format != "coco":
            yield "detector", f"mask_rcnn needs instance masks, which data.format {self.data.format} does not have"
        if self.lgd.segm_masks and self.detector != "mask_rcnn":
            yield "lgd.segm_masks", "instance-mask pooling needs detector: mask_rcnn"
        if self.lgd.mapper_inputs in ("context", "both") and not self.use_context:
            yield "lgd.mapper_inputs", f"{self.lgd.mapper_inputs!r} needs the context object (lgd.use_context)"
        if self.eval_teacher and not self.lgd.enabled:
            yield "eval_teacher", "needs lgd.enabled"

    # --- resolved values -------------------------------------------------------------------------
    @property
    def use_context(self) -> bool:
        v = self.lgd.use_context
        if v is not None:
            return v
        if self.detector == "fcos":  # the released FCOS configs: no context box for R-50, context from R-101 up
            return self.backbone in FCOS_CONTEXT_BACKBONES
        return DETECTOR_DEFAULTS[self.detector]["use_context"]

    @property
    def freeze_backbone_iters(self) -> int:
        """Iterations (paper units) the student's trunk stays frozen (``lgd.freeze_backbone_iters`` or the
        reference's default for the schedule)."""
        v = self.lgd.freeze_backbone_iters
        return FREEZE_ITERS[self.solver.schedule] if v is None else v

    def teacher_optimizer_settings(self) -> dict:
        """The teacher's optimizer, lr and weight decay: a left-out lr or decay is the student's where both use
        the same optimizer (the reference configs set them equal), else the teacher optimizer's default."""
        t, student = self.lgd.optimizer, self.solver.settings()
        out = t.settings()
        if t.optimizer == student["optimizer"]:
            out.update({k: student[k] for k in ("base_lr", "weight_decay") if getattr(t, k) is None})
        return out

    @property
    def detach_appearance(self) -> bool:
        v = self.lgd.detach_appearance
        return DETECTOR_DEFAULTS[self.detector]["detach_appearance"] if v is None else v

    @property
    def mapper_inputs(self) -> str:
        if self.lgd.mapper_inputs is not None:
            return self.lgd.mapper_inputs
        return "both" if self.use_context else "objects"

    def to_dict(self) -> dict:
        return to_dict(self)

    def digest(self) -> str:
        """Identity of the trial: a hash of every setting that changes what is trained."""
        d = self.to_dict()
        for k in ("output_dir", "log_period", "threads", "channels_last"):  # how, not what, is computed
            d.pop(k)
        if not self.lgd.enabled:  # a baseline: no LGD setting changes what it trains
            d["lgd"] = {"enabled": False}
        for k in ("loader_workers", "max_unreadable_fraction", "train_images", "train_annotations", "val_images",
                  "val_annotations", "root"):
            d["data"].pop(k)
        for k, default in (("format", "coco"), ("train_sets", None), ("val_sets", None)):
            if d["data"][k] == default:  # as before these keys existed: the digests of COCO trials stay the same
                d["data"].pop(k)
        d["solver"].pop("checkpoint_period")
        # a left-out lr or decay is the optimizer's default (the same trial as one giving it); SGD, as before
        # the optimizer key existed: the digests of SGD trials stay the same
        sections = [d["solver"]] + ([d["lgd"]["optimizer"]] if self.lgd.enabled else [])
        for section, settings in zip(sections, (self.solver.settings(), self.teacher_optimizer_settings())):
            section.update(settings)
            if section["optimizer"] == "sgd":
                section.pop("optimizer")
        if self.lgd.enabled:  # resolved: a left-out value and the value it stands for are the same trial
            d["lgd"]["freeze_backbone_iters"] = self.freeze_backbone_iters
            d["lgd"]["use_context"] = self.use_context
            d["lgd"]["detach_appearance"] = self.detach_appearance
            d["lgd"]["mapper_inputs"] = self.mapper_inputs
            if self.lgd.segm_masks:  # Table 10's descriptor gained the mask code (2026-12-05): not the earlier trials
                d["lgd"]["descriptor"] = "box+class+mask7x7"
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise ConfigError([f"override {text!r}: expected key=value"])
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def config_from_dict(data: dict, overrides: list[str] = ()) -> TrainConfig:
    data = deep_merge({}, data or {})
    for o in overrides:
        key, value = parse_override(o)
        set_dotted(data, key, value)
    return build(TrainConfig, data)


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    return config_from_dict(load_yaml(path), overrides)
