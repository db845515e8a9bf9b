"""Swin-Tiny with FPN (Appendix D, Table 13): torchvision's ``swin_t`` stages at strides 4-32, as the Swin
detection backbones use them (a LayerNorm on each returned stage, nothing frozen, stochastic depth 0.2)."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models import swin_transformer
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7

from lgd.backbones import load_classifier_weights

_STAGE_OUTPUTS = (1, 3, 5, 7)  # indices in swin_t.features of the stages at strides 4, 8, 16, 32
_STAGE_CHANNELS = (96, 192, 384, 768)


class SwinFPN(nn.Module):
    """Swin-T stages (channels-last inside, normalised and NCHW on the way out) -> FPN (+ P6/P7 or max-pool P6)."""

    def __init__(self, swin: swin_transformer.SwinTransformer, stages: tuple[int, ...], channels: int,
                 extra_blocks: nn.Module):
        super().__init__()
        self.body = swin.features[: _STAGE_OUTPUTS[stages[-1]] + 1]
        self.returned = [_STAGE_OUTPUTS[s] for s in stages]
        self.norms = nn.ModuleList(nn.LayerNorm(_STAGE_CHANNELS[s]) for s in stages)
        self.fpn = FeaturePyramidNetwork([_STAGE_CHANNELS[s] for s in stages], channels, extra_blocks=extra_blocks)
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> OrderedDict:
        outs = OrderedDict()
        for i, block in enumerate(self.body):
            x = block(x)
            if i in self.returned:
                k = self.returned.index(i)
                outs[str(k)] = self.norms[k](x).permute(0, 3, 1, 2).contiguous()
        return self.fpn(outs)


def build_swin_backbone(weights: str | None, rcnn: bool, channels: int = 256) -> SwinFPN:
    """Swin-T-FPN: strides 4-32 + max-pool P6 for the R-CNNs, strides 8-32 + P6/P7 for the dense detectors.
    ``weights``: None (random init), a state_dict of torchvision's ``swin_t`` or a Swin_T_Weights name."""
    if weights is None:
        swin = swin_transformer.swin_t(weights=None)
    else:
        swin = load_classifier_weights(swin_transformer.swin_t, swin_transformer.Swin_T_Weights, weights, "swin_t",
                                       "head.")
    if rcnn:
        return SwinFPN(swin, (0, 1, 2, 3), channels, LastLevelMaxPool())
    return SwinFPN(swin, (1, 2, 3), channels, LastLevelP6P7(channels, channels))
