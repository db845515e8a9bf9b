"""What the adapters' loss tests share: one pass over two feature sets gives each set's own losses; POTO head
outputs made by hand."""
import math

import torch


def poto_outputs(model, anchors, probs: dict, boxes: dict, max_filter: bool = False) -> dict:
    """POTO head outputs for one image: class-1 probability and predicted box per point (the rest: ~0, own box);
    with ``max_filter`` a 3D max filter score that lets everything through."""
    logits = torch.full((1, len(anchors), 3), -10.0)
    pred = anchors.clone()
    for i, p in probs.items():
        logits[0, i, 1] = math.log(p / (1 - p))
        pred[i] = torch.tensor(boxes[i], dtype=torch.float)
    out = {"cls_logits": logits, "bbox_regression": model.box_coder.encode(anchors, pred)[None]}
    if max_filter:
        out["filter_logits"] = torch.full((1, len(anchors), 1), 20.0)
    return out


def assert_pair_is_each_alone(adapter, feats, images, targets, alone_student: dict, rtol: float) -> dict:
    """``losses_pair(feats, other)`` == (``losses(feats)``, ``losses(other)``); returns the student's losses."""
    other = {k: v * 0.5 + 0.1 for k, v in feats.items()}
    student, tea = adapter.losses_pair(feats, other, images, targets, adapter.heads())
    alone = adapter.losses(other, images, targets, adapter.heads())
    assert student.keys() == tea.keys() == alone_student.keys()
    for k in alone_student:
        torch.testing.assert_close(student[k], alone_student[k], rtol=rtol, atol=1e-6)
        torch.testing.assert_close(tea[k], alone[k], rtol=rtol, atol=1e-6)
    return student
