"""detectron2's RetinaNet, Faster R-CNN and Mask R-CNN behind the seam of lgd.detectors.adapters.

The model is detectron2's own (``detectron2.modeling.build_model``; module names are detectron2's, so its
checkpoints map one to one), and so are its losses: the adapters only feed detectron2's heads with given features,
as the reference LGD code does (megvii-research/LGD, ``models/customized_detectors``):

- RetinaNet: the head on the student's and on the instructive features, anchors labelled once
  (``RetinaNet.label_anchors``) and ``RetinaNet.losses`` on each set with those labels (the reference reuses the
  student's ``gt_labels, gt_boxes`` for the teacher's losses). Both sets go through the head in one pass
  (concatenated along the batch) unless the head has BatchNorm, whose batch statistics that would change.
- Faster / Mask R-CNN: the RPN (``proposal_generator``) and the RoI heads on each feature set in turn, student then
  instructive, each with its own proposals and samples (the reference's ``RCNNCT.predict`` on both).

detectron2 logs to an ``EventStorage`` inside its losses; each call runs in a fresh one (nothing accumulates).
The input pipeline is detectron2's DatasetMapper + ``preprocess_image``: shortest-edge resize (sampled per image
from the train sizes in training), pixels as 0-255 in ``INPUT.FORMAT`` (BGR for the zoo), normalised and padded to
the backbone's size divisibility. Per-image steps are detectron2's own (its mapper and structures are per image).
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data.transforms import ResizeShortestEdge
from detectron2.modeling import build_model, detector_postprocess
from detectron2.structures import BitMasks, Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage
from torch import nn

from lgd.detectors.adapters import DetectorAdapter
from lgd.detectors.detectron2.config import build_config, resolve_weights


class Images(ImageList):
    """detectron2's ImageList with the seam's name for the padded batch (``tensors``, torchvision's)."""

    @property
    def tensors(self) -> torch.Tensor:
        return self.tensor

    @tensors.setter
    def tensors(self, value: torch.Tensor) -> None:
        self.tensor = value


class _Checkpointer(DetectionCheckpointer):
    """detectron2's checkpointer (it converts Caffe2 .pkl names), keeping what it could not load."""

    incompatible = None

    def _load_model(self, checkpoint):
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible


def load_weights(model: nn.Module, weights: str) -> None:
    """detectron2's ImageNet checkpoint (R-50.pkl, X-101-32x8d.pkl, ...) or a detectron2 .pth into ``model``
    with detectron2's own checkpointer; every parameter of the ResNet trunk must be found in it."""
    if "://" not in weights and not Path(weights).is_file():
        raise ValueError(f"weights {weights!r}: no such file; backend detectron2 takes a detectron2 checkpoint: an "
                         f"ImageNet .pkl of its model zoo (e.g. ImageNetPretrained/MSRA/R-50.pkl) or a detectron2 .pth")
    ck = _Checkpointer(model)
    ck.load(weights)
    inc = ck.incompatible
    trunk = {k for k, _ in model.backbone.bottom_up.named_parameters(prefix="backbone.bottom_up")}
    missing = sorted(trunk & set(inc.missing_keys)) if inc is not None else sorted(trunk)
    shapes = [k for k, *_ in (inc.incorrect_shapes if inc is not None else []) if k in trunk]
    if missing or shapes:
        raise ValueError(f"weights {weights}: not a checkpoint of this backbone for detectron2 "
                         f"(trunk parameters {'missing' if missing else 'of another shape'}: {(missing or shapes)[:4]})")


class Detectron2Adapter(DetectorAdapter):
    """The shared part: detectron2's input pipeline, its FPN, targets as detectron2 ``Instances``."""

    def __init__(self, model: nn.Module, cfg):
        super().__init__(model)
        self.cfg = cfg
        self.train_sizes = tuple(cfg.INPUT.MIN_SIZE_TRAIN)
        self.test_size = cfg.INPUT.MIN_SIZE_TEST
        self.max_size = cfg.INPUT.MAX_SIZE_TRAIN
        self.bgr = cfg.INPUT.FORMAT == "BGR"

    # --- input -----------------------------------------------------------------------------------
    def preprocess(self, images: list[torch.Tensor], targets: list[dict] | None):
        """Shortest-edge resize (detectron2's ResizeShortestEdge rule), 0-255 in INPUT.FORMAT, then the model's
        own ``preprocess_image`` (normalise, pad); boxes and masks resized with their image."""
        train = self.model.training
        shorts = (np.random.choice(self.train_sizes, len(images)) if train and len(self.train_sizes) > 1
                  else [self.train_sizes[0] if train else self.test_size] * len(images))
        inputs, out_targets = [], [] if targets is not None else None
        for i, im in enumerate(images):
            h, w = im.shape[-2:]
            nh, nw = ResizeShortestEdge.get_output_shape(h, w, int(shorts[i]), self.max_size)
            if (nh, nw) != (h, w):
                im = F.interpolate(im[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
            im = (im.flip(0) if self.bgr else im) * 255.0
            inputs.append({"image": im})
            if targets is not None:
                t = dict(targets[i])
                t["boxes"] = t["boxes"] * t["boxes"].new_tensor([nw / w, nh / h, nw / w, nh / h])
                if "masks" in t and (nh, nw) != (h, w):
                    t["masks"] = F.interpolate(t["masks"][None].float(), size=(nh, nw), mode="nearest")[0].to(
                        t["masks"].dtype)
                out_targets.append(t)
        il = self.model.preprocess_image(inputs)
        return Images(il.tensor, il.image_sizes), out_targets

    def instances(self, targets: list[dict], image_sizes) -> list[Instances]:
        """Targets (labels 1..K) as detectron2's ground truth (``gt_classes`` 0..K-1)."""
        out = []
        for t, size in zip(targets, image_sizes):
            inst = Instances(tuple(size), gt_boxes=Boxes(t["boxes"]), gt_classes=t["labels"] - 1)
            if self.uses_masks:
                inst.gt_masks = BitMasks(t["masks"].bool())
            out.append(inst)
        return out

    def features(self, images: ImageList) -> OrderedDict:
        return OrderedDict(self.model.backbone(images.tensor))

    def trunk(self) -> nn.Module:
        return self.model.backbone.bottom_up

    @staticmethod
    def to_dict(r: Instances) -> dict:
        out = {"boxes": r.pred_boxes.tensor, "scores": r.scores, "labels": r.pred_classes + 1}
        if r.has("pred_masks"):
            out["masks"] = r.pred_masks[:, None].float()
        return out

    def _postprocess(self, results: list[Instances], original_sizes) -> list[dict]:
        return [self.to_dict(detector_postprocess(r, int(h), int(w))) for r, (h, w) in zip(results, original_sizes)]


class RetinaNetAdapter(Detectron2Adapter):
    name = "retinanet"

    def heads(self) -> nn.Module:
        return self.model.head

    def features(self, images):
        feats = self.model.backbone(images.tensor)
        return OrderedDict((k, feats[k]) for k in self.model.head_in_features)

    def _one_pass(self) -> bool:
        return "BN" not in str(self.cfg.MODEL.RETINANET.NORM)

    def _predictions(self, feature_sets: list[OrderedDict], heads) -> list[tuple[list, list]]:
        """(logits, deltas) per feature set, each a list over levels of (N, A*K or A*4, H, W)."""
        levels = [list(fs.values()) for fs in feature_sets]
        if len(levels) == 1 or not self._one_pass():
            return [heads(lv) for lv in levels]
        B = levels[0][0].shape[0]
        logits, deltas = heads([torch.cat(x) for x in zip(*levels)])
        return [([x[i * B:(i + 1) * B] for x in logits], [x[i * B:(i + 1) * B] for x in deltas])
                for i in range(len(levels))]

    def _losses(self, feature_sets, images, targets, heads, set_heads=None) -> list[dict]:
        m = self.model
        if set_heads is None:
            preds = self._predictions(feature_sets, heads)
        else:  # an unshared teacher head (Table 6(b)) on the instructive features; the same anchor labels
            preds = [h(list(fs.values())) for h, fs in zip(set_heads, feature_sets)]
        first = list(feature_sets[0].values())
        with EventStorage():
            anchors = m.anchor_generator(first)
            gt_labels, gt_boxes = m.label_anchors(anchors, self.instances(targets, images.image_sizes))
            out = []
            for p in preds:  # student first: the loss normaliser's EMA is updated in the reference's order
                logits, deltas = m._transpose_dense_predictions(list(p), [m.num_classes, 4])
                out.append(m.losses(anchors, logits, gt_labels, deltas, gt_boxes))
        return out

    def losses(self, features, images, targets, heads):
        return self._losses([features], images, targets, heads)[0]

    def losses_pair(self, features, instructive, images, targets, heads, instructive_heads=None):
        set_heads = None if instructive_heads is None else [heads, instructive_heads]
        return tuple(self._losses([features, instructive], images, targets, heads, set_heads))

    def predict(self, features, images, original_sizes, heads):
        feats = list(features.values())
        results = self.model.forward_inference(images, feats, heads(feats))
        return self._postprocess(results, original_sizes)


class FasterRCNNAdapter(Detectron2Adapter):
    name = "faster_rcnn"

    def __init__(self, model, cfg):
        super().__init__(model, cfg)
        self._heads = nn.ModuleDict({"proposal_generator": model.proposal_generator, "roi_heads": model.roi_heads})

    def heads(self) -> nn.Module:
        return self._heads

    def _losses(self, features, images, gt, heads) -> dict:
        proposals, rpn = heads["proposal_generator"](images, features, gt)
        _, det = heads["roi_heads"](images, features, proposals, gt)
        return {**det, **rpn}

    def losses(self, features, images, targets, heads):
        with EventStorage():
            return self._losses(features, images, self.instances(targets, images.image_sizes), heads)

    def losses_pair(self, features, instructive, images, targets, heads, instructive_heads=None):
        gt = self.instances(targets, images.image_sizes)
        tea_heads = heads if instructive_heads is None else instructive_heads
        with EventStorage():
            return self._losses(features, images, gt, heads), self._losses(instructive, images, gt, tea_heads)

    def predict(self, features, images, original_sizes, heads):
        proposals, _ = heads["proposal_generator"](images, features, None)
        results, _ = heads["roi_heads"](images, features, proposals, None)
        return self._postprocess(results, original_sizes)


class MaskRCNNAdapter(FasterRCNNAdapter):
    name = "mask_rcnn"
    uses_masks = True


ADAPTERS = {a.name: a for a in (RetinaNetAdapter, FasterRCNNAdapter, MaskRCNNAdapter)}


def build(detector: str, backbone: str, num_classes: int, min_sizes, max_size: int, weights: str | None,
          channels: int, options: dict | None) -> Detectron2Adapter:
    """``num_classes`` counts the background (K + 1), as lgd's registry passes it; detectron2 takes K."""
    if detector not in ADAPTERS:
        raise ValueError(f"backend detectron2 has {', '.join(ADAPTERS)}; not {detector}")
    weights = resolve_weights(weights, backbone)  # a folder of the zoo's checkpoints: this backbone's file
    cfg = build_config(detector, backbone, num_classes - 1, tuple(min_sizes), max_size, weights, channels, options)
    model = build_model(cfg)
    if weights:
        load_weights(model, weights)
    return ADAPTERS[detector](model, cfg)
