"""ResNet / ResNeXt (+ modulated deformable conv v2 in c3-c5, "DCN") with FPN, as in §4.1; Swin-T in backbones_swin."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import DeformConv2d
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

_ARCHS = {"resnet18": "resnet18", "resnet50": "resnet50", "resnet101": "resnet101",
          "resnext101_32x8d": "resnext101_32x8d"}


class ModulatedDeformConv(nn.Module):
    """DCN v2: a 3x3 deformable conv whose offsets and modulation masks are predicted from the input."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        k = conv.kernel_size[0]
        self.conv = DeformConv2d(conv.in_channels, conv.out_channels, k, stride=conv.stride, padding=conv.padding,
                                 dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None)
        self.conv.weight = conv.weight  # keep (pretrained) weights
        self.offset = nn.Conv2d(conv.in_channels, 3 * k * k, k, stride=conv.stride, padding=conv.padding,
                                dilation=conv.dilation)
        nn.init.zeros_(self.offset.weight)  # starts as a plain conv
        nn.init.zeros_(self.offset.bias)

    def forward(self, x):
        o = self.offset(x)
        n = o.shape[1] // 3
        return self.conv(x, o[:, : 2 * n], torch.sigmoid(o[:, 2 * n:]))


def _add_dcn(body: resnet.ResNet) -> None:
    for layer in (body.layer2, body.layer3, body.layer4):
        for block in layer:
            name = "conv2"  # the 3x3 conv of both Bottleneck and BasicBlock
            setattr(block, name, ModulatedDeformConv(getattr(block, name)))


def load_classifier_weights(builder, enum, weights: str, arch: str, classifier: str, **kwargs) -> nn.Module:
    """An ImageNet classifier built by ``builder`` with ``weights``: a state_dict file (its ``classifier.*``
    keys may be absent) or a name of the torchvision weights ``enum``."""
    if Path(weights).exists():
        model = builder(weights=None, **kwargs)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = state.get("model", state) if isinstance(state, dict) else state
        missing, unexpected = model.load_state_dict(state, strict=False)
        unexpected = [k for k in unexpected if not k.startswith(classifier)]
        if unexpected or [k for k in missing if not k.startswith(classifier)]:
            raise ValueError(f"{weights}: not a {arch} state_dict (missing {missing[:3]}, unexpected {unexpected[:3]})")
        return model
    try:
        w = enum[weights]
    except KeyError:
        raise ValueError(f"weights {weights!r}: neither an existing file nor one of {[m.name for m in enum]}") from None
    return builder(weights=w, **kwargs)


def _load_weights(arch: str, weights: str | None) -> tuple[resnet.ResNet, bool]:
    builder = getattr(resnet, arch)
    if weights is None:
        return builder(weights=None), False
    enum = resnet.__dict__[{"resnet18": "ResNet18_Weights", "resnet50": "ResNet50_Weights",
                            "resnet101": "ResNet101_Weights", "resnext101_32x8d": "ResNeXt101_32X8D_Weights"}[arch]]
    return load_classifier_weights(builder, enum, weights, arch, "fc.", norm_layer=misc_nn_ops.FrozenBatchNorm2d), True


RCNN_DETECTORS = ("faster_rcnn", "mask_rcnn")  # P2-P6; the dense detectors take P3-P7
# P6 from C5 for every dense detector: detectron2's and cvpods' build_retinanet_resnet_fpn_backbone (in_feature
# "res5"), which the reference's RetinaNet, FCOS, ATSS and POTO are built with (torchvision's RetinaNet v1 takes P5).
# Swin-T (lgd.backbones_swin): P5, as the reference's Swin-T FPN (``LastLevelP6P7(..., "p5")``).
P6_FROM_C5 = ("retinanet", "fcos", "atss", "poto")


class LastLevelP6P7FromC5OrP5(LastLevelP6P7):
    """torchvision's P6/P7 block with its input stated, not inferred (torchvision takes P5 whenever C5 has as
    many channels as the FPN, e.g. ResNet-18 with 512-channel FPN levels)."""

    def __init__(self, in_channels: int, out_channels: int, from_c5: bool):
        super().__init__(in_channels, out_channels)
        self.use_P5 = not from_c5


def set_p6_input(backbone: nn.Module, p6_from: str) -> None:
    """Rebuild the FPN's P6/P7 block of ``backbone`` (an FPN backbone of the dense detectors) to take ``p6_from``
    ("c5": the last backbone stage, "p5": the last FPN level), freshly initialised."""
    if p6_from not in ("c5", "p5"):
        raise ValueError(f"p6_from {p6_from!r}: 'c5' or 'p5'")
    fpn = backbone.fpn
    if not isinstance(fpn.extra_blocks, LastLevelP6P7):
        raise ValueError("p6_from: the backbone's FPN has no P6/P7 block (an R-CNN backbone?)")
    out = backbone.out_channels
    c5 = fpn.inner_blocks[-1][0].in_channels  # the lateral 1x1 conv of the last stage
    fpn.extra_blocks = LastLevelP6P7FromC5OrP5(c5 if p6_from == "c5" else out, out, p6_from == "c5")


def build_backbone(name: str, weights: str | None, detector: str, channels: int = 256) -> nn.Module:
    """ResNet-FPN (or Swin-T-FPN) for ``detector``: P3-P7 for the dense detectors (RetinaNet, FCOS, ATSS, POTO;
    P6 from C5, as detectron2 and cvpods), P2-P6 for the R-CNNs (as torchvision)."""
    if name == "swin_t":
        from lgd.backbones_swin import build_swin_backbone

        return build_swin_backbone(weights, detector in RCNN_DETECTORS, channels)
    dcn = name.endswith("_dcn")
    arch = name[: -len("_dcn")] if dcn else name
    if arch not in _ARCHS:
        raise ValueError(f"unknown backbone {name!r}")
    body, pretrained = _load_weights(arch, weights)
    if dcn:
        _add_dcn(body)
    # Pretrained: freeze the stem and c2 as detectron2 does; random init: train everything.
    trainable = ["layer4", "layer3", "layer2"] if pretrained else ["layer4", "layer3", "layer2", "layer1", "conv1", "bn1"]
    for pname, p in body.named_parameters():
        if not any(pname.startswith(t) for t in trainable):
            p.requires_grad_(False)
    if detector in RCNN_DETECTORS:
        returned, extra = [1, 2, 3, 4], LastLevelMaxPool()
    else:
        returned = [2, 3, 4]
    c2 = body.inplanes // 8  # 64 for BasicBlock, 256 for Bottleneck
    in_channels = [c2 * 2 ** (i - 1) for i in returned]
    if detector not in RCNN_DETECTORS:
        from_c5 = detector in P6_FROM_C5
        extra = LastLevelP6P7FromC5OrP5(in_channels[-1] if from_c5 else channels, channels, from_c5)
    return BackboneWithFPN(body, {f"layer{k}": str(v) for v, k in enumerate(returned)}, in_channels, channels,
                           extra_blocks=extra)
