"""The implicit teacher (§3, Fig. 2): label encoder + appearance encoder + relation adapter + knowledge mapper."""
from __future__ import annotations

import torch
from torch import nn

from lgd.appearance import AppearanceEncoder
from lgd.knowledge_mapper import KnowledgeMapper
from lgd.label_encoder import build_label_encoder
from lgd.objects import PackedObjects
from lgd.relation_adapter import RelationAdapter


class ImplicitTeacher(nn.Module):
    """Student features + labels -> instructive features at every FPN level, all objects batched at once."""

    def __init__(self, num_classes: int, dim: int = 256, heads: int = 8, label_encoder: str = "pointnet",
                 label_norm: str = "layernorm", pooling: str = "mask", query: str = "student",
                 mapper_inputs: str = "both"):
        super().__init__()
        self.num_classes = num_classes
        self.label_encoder = build_label_encoder(label_encoder, 4 + num_classes, dim, label_norm, heads)
        self.appearance_encoder = AppearanceEncoder(dim, pooling)
        self.relation_adapter = RelationAdapter(dim, heads, query)
        self.knowledge_mapper = KnowledgeMapper(dim, mapper_inputs)

    def forward(self, features: list[torch.Tensor], objs: PackedObjects) -> list[torch.Tensor]:
        if not bool(objs.valid.any(dim=1).all()):
            raise ValueError("LGD needs at least one object (or the context object) in every training image")
        sizes = [tuple(f.shape[-2:]) for f in features]
        masks = [objs.level_masks(s) for s in sizes]  # computed once, used by pooling and painting
        label = self.label_encoder(objs.descriptors(self.num_classes), objs.valid)
        appearance = self.appearance_encoder(features, masks, objs)
        inter = self.relation_adapter(label, appearance, objs.valid)
        return self.knowledge_mapper(inter, masks, sizes, objs)
