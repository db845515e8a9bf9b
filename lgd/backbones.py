"""ResNet / ResNeXt (+ modulated deformable conv v2 in c3-c5, "DCN") with FPN, as in §4.1."""
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


def _load_weights(arch: str, weights: str | None) -> tuple[resnet.ResNet, bool]:
    builder = getattr(resnet, arch)
    if weights is None:
        return builder(weights=None), False
    norm = misc_nn_ops.FrozenBatchNorm2d
    if Path(weights).exists():
        model = builder(weights=None, norm_layer=norm)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = state.get("model", state) if isinstance(state, dict) else state
        missing, unexpected = model.load_state_dict(state, strict=False)
        unexpected = [k for k in unexpected if not k.startswith("fc.")]
        if unexpected or [k for k in missing if not k.startswith("fc.")]:
            raise ValueError(f"{weights}: not a {arch} state_dict (missing {missing[:3]}, unexpected {unexpected[:3]})")
        return model, True
    enum = resnet.__dict__[{"resnet18": "ResNet18_Weights", "resnet50": "ResNet50_Weights",
                            "resnet101": "ResNet101_Weights", "resnext101_32x8d": "ResNeXt101_32X8D_Weights"}[arch]]
    try:
        w = enum[weights]
    except KeyError:
        raise ValueError(f"weights {weights!r}: neither an existing file nor one of {[m.name for m in enum]}") from None
    return builder(weights=w, norm_layer=norm), True


def build_backbone(name: str, weights: str | None, detector: str, channels: int = 256) -> BackboneWithFPN:
    """ResNet-FPN for ``detector``: P3-P7 for RetinaNet/FCOS, P2-P6 for the R-CNNs (as torchvision)."""
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
    if detector in ("retinanet", "fcos"):
        returned, extra = [2, 3, 4], LastLevelP6P7(channels, channels)
    else:
        returned, extra = [1, 2, 3, 4], LastLevelMaxPool()
    c2 = body.inplanes // 8  # 64 for BasicBlock, 256 for Bottleneck
    in_channels = [c2 * 2 ** (i - 1) for i in returned]
    return BackboneWithFPN(body, {f"layer{k}": str(v) for v, k in enumerate(returned)}, in_channels, channels,
                           extra_blocks=extra)
