"""The implicit teacher (§3, Fig. 2): label encoder + appearance encoder + relation adapter + knowledge mapper."""
from __future__ import annotations

import torch
from torch import nn

from lgd.appearance import AppearanceEncoder
from lgd.knowledge_mapper import KnowledgeMapper
from lgd.label_encoder import build_label_encoder
from lgd.objects import PackedObjects, descriptor_size
from lgd.pyramid import PyramidLayout
from lgd.relation_adapter import RelationAdapter


def _reference_names() -> dict[str, str]:
    """Our parameter prefix -> the reference teacher's (megvii-research/LGD ``DynamicTeacher``), one to one."""
    names = {}
    for ours, ref in (("stn_in", "stn_desc"), ("stn_feat", "stn_feat")):
        for i in range(3):
            names[f"label_encoder.{ours}.point.fcs.{i}"] = f"label_encoder_.{ref}.conv{i + 1}"
        names[f"label_encoder.{ours}.head.fcs.0"] = f"label_encoder_.{ref}.fc1"
        names[f"label_encoder.{ours}.head.fcs.1"] = f"label_encoder_.{ref}.fc2"
        names[f"label_encoder.{ours}.out"] = f"label_encoder_.{ref}.fc3"
    names.update({
        "label_encoder.mlp1.fcs.0": "label_encoder_.conv1",
        "label_encoder.mlp2.fcs.0": "label_encoder_.conv2",
        "label_encoder.mlp2.fcs.1": "label_encoder_.conv3",
        "label_encoder.fuse.fcs.0": "label_encoder_.conv4",
        "appearance_encoder.proj.0": "student_proj_2D.0.0",
        "relation_adapter.label_proj": "canoni_proj_1D.0.0",
        "relation_adapter.attn": "multi_head_attn",
        "knowledge_mapper.obj_fc": "local_inst_proj_1D",
        "knowledge_mapper.paint_conv": "local_inst_proj_2D",
        "knowledge_mapper.ctx_fc": "global_ctx_proj_1D",
        "knowledge_mapper.refine.1": "refinement_module.0",
        "knowledge_mapper.refine.4": "refinement_module.3",
        "knowledge_mapper.refine.7": "refinement_module.6",
    })
    return names


REFERENCE_NAMES = _reference_names()


class ImplicitTeacher(nn.Module):
    """Student features + labels -> instructive features at every FPN level, all objects batched at once.

    The defaults are the reference implementation's behaviour; ``image_level_tnet`` and
    ``masks_cover_touched_cells`` are named alternatives (see ``PointNetEncoder`` and ``level_masks``).
    """

    def __init__(self, num_classes: int, dim: int = 256, heads: int = 8, label_encoder: str = "pointnet",
                 label_norm: str = "layernorm", pooling: str = "mask", query: str = "student",
                 mapper_inputs: str = "both", image_level_tnet: bool = False,
                 masks_cover_touched_cells: bool = False, mask_descriptors: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.mask_descriptors = mask_descriptors  # Table 10: descriptors end with the 7 x 7 mask code
        self.masks_cover_touched_cells = masks_cover_touched_cells
        self._layouts: dict[tuple, PyramidLayout] = {}
        self.label_encoder = build_label_encoder(label_encoder, descriptor_size(num_classes, mask_descriptors), dim,
                                                 label_norm, heads, image_level_tnet)
        self.appearance_encoder = AppearanceEncoder(dim, pooling)
        self.relation_adapter = RelationAdapter(dim, heads, query)
        self.knowledge_mapper = KnowledgeMapper(dim, mapper_inputs)

    def forward(self, features: list[torch.Tensor], objs: PackedObjects) -> list[torch.Tensor]:
        """Student maps (B, C, h, w) per level -> instructive maps per level."""
        layout = self.layout([tuple(f.shape[-2:]) for f in features], features[0].device)
        return layout.unpack(self.instruct(layout.pack(features), layout, objs))

    def instruct(self, canvas: torch.Tensor, layout: PyramidLayout, objs: PackedObjects) -> torch.Tensor:
        """The same on the levels packed into ``layout``'s canvas (what the training step uses)."""
        if objs.empty_images:
            raise ValueError("LGD needs at least one object (or the context object) in every training image")
        masks = objs.pyramid_masks(layout, self.masks_cover_touched_cells)  # once, for pooling and painting
        label = self.label_encoder(objs.descriptors(self.num_classes, self.mask_descriptors), objs.valid)
        appearance = self.appearance_encoder(canvas, masks, layout, objs)
        inter = self.relation_adapter(label, appearance, objs.valid)
        return self.knowledge_mapper(inter, masks, layout, objs)

    def layout(self, sizes: list[tuple[int, int]], device: torch.device) -> PyramidLayout:
        """The pyramid's cells and canvas, built once per input size (a handful of sizes in a run)."""
        key = (tuple(sizes), str(device))
        if key not in self._layouts:
            self._layouts[key] = PyramidLayout(sizes, device)
        return self._layouts[key]

    def load_reference_state_dict(self, state_dict: dict[str, torch.Tensor], prefix: str = "") -> list[str]:
        """Load the reference teacher's weights (keys after ``prefix``), tensor by tensor.

        Its Conv1d weights (out, in, 1) become our Linear weights (out, in). Every parameter of ours must be
        found; returns the reference keys that this teacher has no place for (e.g. the context projection
        when the context object is off). Needs the PointNet label encoder with LayerNorm.
        """
        ours = self.state_dict()
        loaded, used = {}, set()
        for name in ours:
            module, _, leaf = name.rpartition(".")
            ref_module = next((REFERENCE_NAMES[m] + module[len(m):] for m in REFERENCE_NAMES
                               if module == m or module.startswith(m + ".")), None)
            key = f"{prefix}{ref_module}.{leaf}" if ref_module is not None else None
            if key not in state_dict:
                raise KeyError(f"reference state dict has no tensor for {name!r} (looked for {key!r})")
            loaded[name] = state_dict[key].reshape(ours[name].shape)
            used.add(key)
        self.load_state_dict(loaded)
        return sorted(k for k in state_dict if k.startswith(prefix) and k not in used)
