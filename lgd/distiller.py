"""Student detector + implicit teacher + adaptation head: the losses of Eq. 5-7 and their schedule (§3.3)."""
from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from lgd.config import TrainConfig
from lgd.detectors import DetectorAdapter
from lgd.distillation import AdaptationHead, distillation_loss
from lgd.objects import pack_objects
from lgd.teacher import ImplicitTeacher


@dataclass(frozen=True)
class Phase:
    """Where an iteration sits in the LGD schedule (the reference's distill_flag and backbone freeze)."""
    # before distill_start and in the last distill_stop_before_end iterations: Eq. 5 is computed on the detached
    # student features, so only the adaptation head learns from it (the reference's DISTILL_OFF)
    student_detached: bool
    backbone_frozen: bool  # the student's trunk gets no gradient for the first freeze_backbone_iters


def schedule_phase(cfg: TrainConfig, iteration: int) -> Phase:
    s = cfg.solver
    last = s.max_iter - s.scaled(cfg.lgd.distill_stop_before_end)  # the last N iterations (the reference: N - 1)
    return Phase(
        student_detached=iteration < s.scaled(cfg.lgd.distill_start) or iteration >= last,
        backbone_frozen=iteration < s.scaled(cfg.freeze_backbone_iters),
    )


def _stand_in(target: dict) -> dict:
    """An image without objects (evaluation; training skips them) gets the reference's stand-in object:
    a one-pixel box at the origin, of the first class (with a one-pixel instance mask where masks are used)."""
    out = {**target, "boxes": target["boxes"].new_tensor([[0.0, 0.0, 1.0, 1.0]]),
           "labels": target["labels"].new_ones(1)}
    if "masks" in target:
        out["masks"] = target["masks"].new_zeros((1, *target["masks"].shape[-2:]))
        out["masks"][:, :1, :1] = 1
    return out


class Distiller(nn.Module):
    """One module for both methods: with ``lgd.enabled`` off it is the plain detector's training step."""

    def __init__(self, adapter: DetectorAdapter, cfg: TrainConfig, num_classes: int):
        super().__init__()
        self.adapter = adapter
        self.detector = adapter.model
        self.cfg = cfg
        self.lgd = cfg.lgd.enabled
        if self.lgd:
            lc = cfg.lgd
            self.teacher = ImplicitTeacher(num_classes, cfg.fpn_channels, lc.num_heads, lc.label_encoder, lc.label_norm,
                                           lc.appearance_pooling, lc.attention_query, cfg.mapper_inputs,
                                           lc.image_level_tnet, lc.masks_cover_touched_cells,
                                           mask_descriptors=lc.segm_masks)
            self.adaptation = AdaptationHead(cfg.fpn_channels)
            # Table 6(b): the instructive features go through the student's own head, or an unshared copy
            self.teacher_heads = None if lc.shared_head else copy.deepcopy(adapter.heads())

    def export(self) -> nn.Module:
        """The plain detector (torchvision's or detectron2's): everything LGD added is dropped at inference."""
        return self.detector

    def teacher_parameters(self) -> list[nn.Parameter]:
        """What the teacher's optimizer trains: the implicit teacher (and an unshared head copy, Table 6(b)).
        The adaptation head trains with the student, in the student's optimizer, as the reference's."""
        if not self.lgd:
            return []
        mods = [self.teacher] + ([self.teacher_heads] if self.teacher_heads is not None else [])
        return [p for m in mods for p in m.parameters() if p.requires_grad]

    def frozen_parameters(self) -> list[nn.Parameter]:
        """What the LGD schedule freezes first (``lgd.freeze_scope``): the student's trunk (the reference's
        ``student.raw_backbone``), or its whole backbone with the FPN and extra levels."""
        module = self.adapter.trunk() if self.cfg.lgd.freeze_scope == "trunk" else self.detector.backbone
        return [p for p in module.parameters() if p.requires_grad]

    def _heads(self):
        return self.teacher_heads if self.teacher_heads is not None else self.adapter.heads()

    def _instruct(self, canvas: torch.Tensor, layout, images, targets) -> torch.Tensor:
        """The implicit teacher on the student's levels packed into one canvas; returns the same canvas shape."""
        targets = [t if len(t["boxes"]) else _stand_in(t) for t in targets]
        objs = pack_objects(targets, images.image_sizes, tuple(images.tensors.shape[-2:]), self.cfg.use_context,
                            with_masks=self.cfg.lgd.segm_masks,
                            context_box_per_image=self.cfg.lgd.context_box_per_image)
        return self.teacher.instruct(canvas.detach() if self.cfg.detach_appearance else canvas, layout, objs)

    def _layout(self, features: OrderedDict):
        f = next(iter(features.values()))
        return self.teacher.layout([tuple(x.shape[-2:]) for x in features.values()], f.device)

    def instructive(self, features: OrderedDict, images, targets) -> OrderedDict:
        """The implicit teacher's output at every level, keyed like the student's features."""
        layout = self._layout(features)
        inst = self._instruct(layout.pack(list(features.values())), layout, images, targets)
        return OrderedDict(zip(features.keys(), layout.unpack(inst)))

    def forward(self, images: list[torch.Tensor], targets: list[dict], iteration: int) -> dict[str, torch.Tensor]:
        """Loss terms of one step; the weighted total is ``total_loss(terms)``."""
        images, targets = self.adapter.preprocess(images, targets)
        if self.cfg.channels_last:
            images.tensors = images.tensors.contiguous(memory_format=torch.channels_last)
        features = self.adapter.features(images)
        if not self.lgd:
            return self.adapter.losses(features, images, targets, self.adapter.heads())
        phase = schedule_phase(self.cfg, iteration)
        layout = self._layout(features)
        canvas = layout.pack(list(features.values()))  # teacher and adaptation run once over all levels
        inst_canvas = self._instruct(canvas, layout, images, targets)
        inst = OrderedDict(zip(features.keys(), layout.unpack(inst_canvas)))
        if self.teacher_heads is None:  # Eq. 6 through the student's own head: one pass for both
            losses, tea = self.adapter.losses_pair(features, inst, images, targets, self.adapter.heads())
        else:  # an unshared head (Table 6(b)): the same targets and assignment, the copy on the instructive features
            losses, tea = self.adapter.losses_pair(features, inst, images, targets, self.adapter.heads(),
                                                   instructive_heads=self.teacher_heads)
        losses.update({f"{k}.tea": v for k, v in tea.items()})
        student = self.adaptation(canvas.detach() if phase.student_detached else canvas, layout)
        losses["distill"] = distillation_loss(student, inst_canvas, layout)
        return losses

    def total_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """Eq. 7: detection losses (student and instructive) + λ · distillation."""
        lam = self.cfg.lgd.distill_weight
        return sum(v * lam if k == "distill" else v for k, v in losses.items())

    @torch.no_grad()
    def predict(self, images: list[torch.Tensor], targets: list[dict] | None = None) -> list[dict]:
        """The student's detections (boxes, labels, scores[, masks]) at each image's own size, as a torchvision
        detector returns them, whatever the backend."""
        original = [tuple(im.shape[-2:]) for im in images]
        images, _ = self.adapter.preprocess(images, None)
        return self.adapter.predict(self.adapter.features(images), images, original, self.adapter.heads())

    @torch.no_grad()
    def predict_teacher(self, images: list[torch.Tensor], targets: list[dict]) -> list[dict]:
        """``eval_teacher``: the detection head applied to the instructive features (needs the labels)."""
        original = [tuple(im.shape[-2:]) for im in images]
        images, targets = self.adapter.preprocess(images, targets)  # test-size resize, targets included
        inst = self.instructive(self.adapter.features(images), images, targets)
        return self.adapter.predict(inst, images, original, self._heads())
