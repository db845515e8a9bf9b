"""A slow, loop-by-loop statement of the reference LGD teacher's behaviour, used as a test oracle.

Written from the behaviour of megvii-research/LGD's ``DynamicTeacher`` (per image, per object, per level,
per cell, plain tensor arithmetic), with its parameter names and shapes, so that the vectorised
``lgd.teacher.ImplicitTeacher`` can be checked against it after ``load_reference_state_dict``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reference_shapes(k: int, dim: int, context: bool = True) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the reference teacher for descriptors of length ``k`` and width ``dim``."""
    shapes = {}
    for stn, kk in (("stn_desc", k), ("stn_feat", 64)):
        for i, (a, b) in enumerate([(kk, 64), (64, 128), (128, 1024)], 1):
            shapes[f"label_encoder_.{stn}.conv{i}.weight"], shapes[f"label_encoder_.{stn}.conv{i}.bias"] = (b, a, 1), (b,)
        for i, (a, b) in enumerate([(1024, 512), (512, 256), (256, kk * kk)], 1):
            shapes[f"label_encoder_.{stn}.fc{i}.weight"], shapes[f"label_encoder_.{stn}.fc{i}.bias"] = (b, a), (b,)
    for i, (a, b) in enumerate([(k, 64), (64, 128), (128, 1024), (1088, dim)], 1):
        shapes[f"label_encoder_.conv{i}.weight"], shapes[f"label_encoder_.conv{i}.bias"] = (b, a, 1), (b,)
    for name in ("canoni_proj_1D.0.0", "local_inst_proj_1D", "global_ctx_proj_1D"):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (dim, dim), (dim,)
    for name in ("student_proj_2D.0.0", "local_inst_proj_2D", "refinement_module.0", "refinement_module.3",
                 "refinement_module.6"):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (dim, dim, 3, 3), (dim,)
    shapes["multi_head_attn.in_proj_weight"], shapes["multi_head_attn.in_proj_bias"] = (3 * dim, dim), (3 * dim,)
    shapes["multi_head_attn.out_proj.weight"], shapes["multi_head_attn.out_proj.bias"] = (dim, dim), (dim,)
    return shapes


def random_reference_state(k: int, dim: int, seed: int = 0, dtype=torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in reference_shapes(k, dim).items():
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
        out[name] = (torch.randn(shape, generator=g, dtype=dtype) / math.sqrt(fan_in))
    return out


def _lin(sd, name, x):
    w = sd[f"{name}.weight"]
    return x @ w.reshape(w.shape[0], -1).T + sd[f"{name}.bias"]


def _ln(x):
    return (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-5)


def _gn(x):  # GroupNorm(1) without affine on one image (C, h, w)
    return (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-5)


def _conv(sd, name, x):
    return F.conv2d(x[None], sd[f"{name}.weight"], sd[f"{name}.bias"], padding=1)[0]


def _tnet(sd, stn, x):
    """One object's own transform: the T-net sees a set of one point."""
    h = x
    for i in (1, 2, 3):
        h = torch.relu(_ln(_lin(sd, f"label_encoder_.{stn}.conv{i}", h)))
    for i in (1, 2):
        h = torch.relu(_ln(_lin(sd, f"label_encoder_.{stn}.fc{i}", h)))
    t = _lin(sd, f"label_encoder_.{stn}.fc3", h)
    k = x.shape[0]
    return x @ t.reshape(k, k)


def _attention(sd, q_in, kv_in, heads):
    dim = q_in.shape[-1]
    wq, wk, wv = sd["multi_head_attn.in_proj_weight"].split(dim)
    bq, bk, bv = sd["multi_head_attn.in_proj_bias"].split(dim)
    q, kk, v = q_in @ wq.T + bq, kv_in @ wk.T + bk, kv_in @ wv.T + bv
    d = dim // heads
    outs = []
    for h in range(heads):
        s = slice(h * d, (h + 1) * d)
        a = torch.softmax(q[:, s] @ kk[:, s].T / math.sqrt(d), dim=-1)
        outs.append(a @ v[:, s])
    return torch.cat(outs, -1) @ sd["multi_head_attn.out_proj.weight"].T + sd["multi_head_attn.out_proj.bias"]


def reference_teacher(sd, features, boxes, labels, pad_size, num_classes, context: bool, heads: int):
    """features: L maps (B, C, h, w); boxes: B of (Ni, 4) x1y1x2y2; labels: B of (Ni,) in 1..K."""
    H, W = pad_size
    out = [[] for _ in features]
    for b in range(len(boxes)):
        bx = boxes[b].clone()
        if context:
            bx = torch.cat([bx, bx.new_tensor([[0.0, 0.0, W, H]])])
        bx[:, 0::2] = bx[:, 0::2].clamp(0, W - 1)
        bx[:, 1::2] = bx[:, 1::2].clamp(0, H - 1)
        n = len(bx)
        onehot = torch.zeros(n, num_classes, dtype=bx.dtype)
        for i, lab in enumerate(labels[b].tolist()):
            onehot[i, lab - 1] = 1.0
        desc = torch.cat([bx / bx.new_tensor([W, H, W, H]), onehot], 1) * 2 - 1
        # label encoder, one object at a time, then the max over the image's objects
        local, deep = [], []
        for i in range(n):
            x = _tnet(sd, "stn_desc", desc[i])
            x = torch.relu(_ln(_lin(sd, "label_encoder_.conv1", x)))
            x = _tnet(sd, "stn_feat", x)
            local.append(x)
            y = torch.relu(_ln(_lin(sd, "label_encoder_.conv2", x)))
            deep.append(torch.relu(_ln(_lin(sd, "label_encoder_.conv3", y))))
        glob = torch.stack(deep).max(0).values
        label = torch.stack([torch.relu(_ln(_lin(sd, "label_encoder_.conv4", torch.cat([local[i], glob]))))
                             for i in range(n)])
        label = torch.stack([torch.relu(_ln(_lin(sd, "canoni_proj_1D.0.0", e))) for e in label])
        for lvl, f in enumerate(features):
            C, h, w = f.shape[1:]
            proj = torch.relu(_gn(_conv(sd, "student_proj_2D.0.0", f[b])))
            masks = torch.zeros(n, h, w, dtype=f.dtype)
            for i in range(n):
                x1, x2 = bx[i, 0] * w / W, bx[i, 2] * w / W
                y1, y2 = bx[i, 1] * h / H, bx[i, 3] * h / H
                for r in range(h):
                    for c in range(w):
                        masks[i, r, c] = float(x1 <= c <= x2 and y1 <= r <= y2 and x2 > x1 and y2 > y1)
            app = torch.stack([(proj * masks[i]).sum((1, 2)) / max(float(masks[i].sum()), 1.0) for i in range(n)])
            inter = _attention(sd, app, label, heads)
            objs = n - 1 if context else n
            painted = torch.zeros(C, h, w, dtype=f.dtype)
            for i in range(objs):
                painted += _lin(sd, "local_inst_proj_1D", inter[i])[:, None, None] * masks[i]
            x = _conv(sd, "local_inst_proj_2D", painted)
            if context:
                x = x + _lin(sd, "global_ctx_proj_1D", inter[-1])[:, None, None]
            x = torch.relu(x)
            x = torch.relu(_gn(_conv(sd, "refinement_module.0", x)))
            x = torch.relu(_gn(_conv(sd, "refinement_module.3", x)))
            out[lvl].append(_gn(_conv(sd, "refinement_module.6", x)))
    return [torch.stack(o) for o in out]
