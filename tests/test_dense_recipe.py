"""The dense detectors' recipe of the reference implementation (megvii-research/LGD's cvpods-style FCOS, ATSS and
POTO), each rule on a small hand-made case: the centerness-weighted box loss, POTO's instructive losses on the
student's matching, points at the cell centres, a scale per level before the box ReLU, normalisers averaged over
the workers, ATSS's inference thresholds on the class probability, P6 from C5."""
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.fcos import FCOSRegressionHead
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from lgd.backbones import build_backbone
from lgd.detectors import MODEL_CLASSES, build_detector
from lgd.detectors.dense_losses import fcos_losses, mean_over_workers
from lgd.detectors.fcos import FCOS, CellCentrePoints, ScaledFCOSHead
from lgd.detectors.poto import POTOHead
from pair_losses import poto_outputs

CODER = SimpleNamespace(box_coder=det_utils.BoxLinearCoder(normalize_by_size=True))  # what the losses use of a head


def test_fcos_is_the_reference_recipe_class():
    assert MODEL_CLASSES["fcos"] is FCOS  # lgd.detectors.registry: "fcos" -> lgd.detectors.fcos.FCOS
    m = build_detector("fcos", "resnet18", 3, (64,), 64, channels=32).model
    assert m.centerness_weighted_box and m.threshold_class_prob and m.score_thresh == 0.05
    assert isinstance(m.anchor_generator, CellCentrePoints) and isinstance(m.head, ScaledFCOSHead)


# --- FCOS box loss: centerness-weighted GIoU over the centerness sum ------------------------------------------

def _row_case(sets=1):
    """Four stride-8 points at x = 4, 12, 20, 28 (y = 4); one box [0, 0, 24, 8] holding points 0-2.
    Predicted (l, t, r, b) / stride: point 0 the exact box, points 1 and 2 their own 8 px cell."""
    anchors = torch.tensor([[x - 4.0, 0, x + 4, 8] for x in (4, 12, 20, 28)])
    targets = [{"boxes": torch.tensor([[0.0, 0, 24, 8]]), "labels": torch.tensor([1])}]
    reg = torch.tensor([[0.5, 0.5, 2.5, 0.5], [0.5] * 4, [0.5] * 4, [0.5] * 4])[None]
    out = {"cls_logits": torch.zeros(1, 4, 3), "bbox_regression": reg, "bbox_ctrness": torch.zeros(1, 4, 1)}
    out = {k: v.repeat(sets, 1, 1) for k, v in out.items()}
    return targets, out, [anchors], [torch.tensor([0, 0, 0, -1])]


def test_fcos_box_loss_is_centerness_weighted_giou_over_the_centerness_sum():
    targets, out, anchors, matched = _row_case()
    # centerness targets sqrt(min/max(l, r) * min/max(t, b)): l, r = 4, 20 / 12, 12 / 20, 4 and t = b = 4
    ctr_t = torch.tensor([math.sqrt(0.2), 1.0, math.sqrt(0.2)])
    # GIoU losses: point 0's box is the ground truth (0); points 1 and 2 predict [8, 0, 16, 8], [16, 0, 24, 8]:
    # IoU 1/3 inside the box (the enclosing box is the box itself): 1 - 1/3
    giou = torch.tensor([0.0, 2 / 3, 2 / 3])
    losses = fcos_losses(CODER, targets, out, anchors, matched, 1)[0]
    torch.testing.assert_close(losses["bbox_regression"], (ctr_t * giou).sum() / ctr_t.sum())  # 0.509
    # classification and centerness: over the foreground count, 3
    focal = sigmoid_focal_loss(torch.zeros(4, 3), torch.tensor([[0.0, 1, 0]] * 3 + [[0, 0, 0]]), reduction="sum")
    torch.testing.assert_close(losses["classification"], focal / 3)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(torch.zeros(3), ctr_t, reduction="sum")
    torch.testing.assert_close(losses["bbox_ctrness"], bce / 3)
    # torchvision's normalisation (the option): the plain sum over the foreground count, 4/9
    plain = fcos_losses(CODER, targets, out, anchors, matched, 1, centerness_weighted_box=False)[0]
    torch.testing.assert_close(plain["bbox_regression"], giou.sum() / 3)
    # two feature sets in one pass: each set its own sums, the same normalisers; ATSS's weight 2
    targets, out2, anchors, matched = _row_case(sets=2)
    pair = fcos_losses(CODER, targets, out2, anchors, matched, 2, box_weight=2.0)
    for one in pair:
        torch.testing.assert_close(one["bbox_regression"], 2 * (ctr_t * giou).sum() / ctr_t.sum())


def test_fcos_detector_option_keeps_the_foreground_count_normalisation():
    weighted = build_detector("fcos", "resnet18", 3, (64,), 64, channels=32).model
    plain = build_detector("fcos", "resnet18", 3, (64,), 64, channels=32,
                           options={"centerness_weighted_box": False}).model
    targets, out, anchors, matched = _row_case()
    for model, box in ((weighted, 0.5093), (plain, 4 / 9)):
        got = model.set_losses(model.head, targets, out, anchors, matched, 1)[0]["bbox_regression"]
        assert got.item() == pytest.approx(box, abs=1e-4)


# --- POTO: the instructive features' losses on the student's matching ------------------------------------------

def _poto_points():
    """Stride-8 points at x = 4 ... 60 (y = 4) and stride-16 points at x = 8 ... 56 (y = 8): 8 + 4."""
    return torch.tensor([[x - 4.0, 0, x + 4, 8] for x in range(4, 64, 8)]
                        + [[x - 8.0, 0, x + 8, 16] for x in (8, 24, 40, 56)])


def test_poto_instructive_losses_use_the_students_matching():
    model = build_detector("poto", "resnet18", 3, (64,), 64, channels=32).model
    assert not model.aux_loss and model.head.max_filter is None  # plain POTO by default
    a = _poto_points()
    targets = [{"boxes": torch.tensor([[0.0, 0, 16, 8]]), "labels": torch.tensor([1])}]
    # the student: p0 score .9 but IoU .5, p1 score .5 and the exact box: quality .87 vs .56 -> p1
    student = poto_outputs(model, a, {0: 0.9, 1: 0.5}, {0: [0, 0, 8, 8], 1: [0, 0, 16, 8]})
    # the instructive features: p0 score .9 and the exact box, p1 score .1 and half of it -> their own would be p0
    teacher = poto_outputs(model, a, {0: 0.9, 1: 0.1}, {0: [0, 0, 16, 8], 1: [8, 0, 16, 8]})
    assert model.assign(targets, student, a[None], [8, 4])[0][0].tolist() == [-1, 0] + [-1] * 10
    assert model.assign(targets, teacher, a[None], [8, 4])[0][0].tolist() == [0] + [-1] * 11
    both = {k: torch.cat([student[k], teacher[k]]) for k in student}
    _, tea = model.set_losses(model.head, targets, both, [a], [8, 4], 2)

    def expected(row, point):  # one foreground point: sums over 1
        onehot = torch.zeros(len(a), 3)
        onehot[point, 1] = 1
        cls = sigmoid_focal_loss(row["cls_logits"][0], onehot, reduction="sum")
        pred = model.box_coder.decode(row["bbox_regression"], a[None])[0, point]
        return cls, 2 * generalized_box_iou_loss(pred, targets[0]["boxes"][0])

    cls, box = expected(teacher, 1)  # the student's matching: p1
    torch.testing.assert_close(tea["classification"], cls)
    torch.testing.assert_close(tea["bbox_regression"], box)
    own = build_detector("poto", "resnet18", 3, (64,), 64, channels=32, options={"per_set_matching": True}).model
    _, tea_own = own.set_losses(own.head, targets, both, [a], [8, 4], 2)
    cls, box = expected(teacher, 0)  # the former rule: the instructive features' own matching, p0
    torch.testing.assert_close(tea_own["classification"], cls)
    torch.testing.assert_close(tea_own["bbox_regression"], box)


# --- points at the cell centres -------------------------------------------------------------------------------

def test_points_sit_at_the_cell_centres_with_the_levels_strides():
    gen = CellCentrePoints()
    # a 96 px padded input: P3 12x12 ... P6 2x2, P7 1x1 (96 // 2 = 48 would not be P6's stride)
    feats = [torch.zeros(1, 1, n, n) for n in (12, 6, 3, 2, 1)]
    pts = gen(ImageList(torch.zeros(1, 3, 96, 96), [(96, 96)]), feats)[0]
    assert pts[0].tolist() == [0.0, 0.0, 8.0, 8.0]  # stride 8: the first point at (4, 4), its anchor one stride wide
    assert pts[1].tolist() == [8.0, 0.0, 16.0, 8.0]  # (12, 4): row-major
    assert pts[12].tolist() == [0.0, 8.0, 8.0, 16.0]  # second row: (4, 12)
    p6 = pts[144 + 36 + 9:144 + 36 + 9 + 4]
    assert ((p6[:, :2] + p6[:, 2:]) / 2).tolist() == [[32, 32], [96, 32], [32, 96], [96, 96]]
    for det in ("fcos", "atss", "poto"):
        model = build_detector(det, "resnet18", 3, (64,), 64, channels=32).model
        assert isinstance(model.anchor_generator, CellCentrePoints) and model.anchor_generator.offset == 0.5
    corner = build_detector("fcos", "resnet18", 3, (64,), 64, channels=32, options={"point_offset": 0.0}).model
    assert corner.anchor_generator(ImageList(torch.zeros(1, 3, 96, 96), [(96, 96)]), feats)[0][0].tolist() == \
        [-4.0, -4.0, 4.0, 4.0]  # torchvision's corner points


# --- a learnable scale per level before the box branch's ReLU -------------------------------------------------

def test_scale_per_level_multiplies_before_the_relu_and_learns():
    torch.manual_seed(0)
    head = ScaledFCOSHead(32, 1, 3)
    scales = head.regression_head.scales
    assert len(scales) == 5 and all(s.scale.item() == 1.0 and s.scale.requires_grad for s in scales)
    x = [torch.randn(1, 32, n, n) for n in (4, 2, 2, 2, 2)]
    with torch.no_grad():
        scales[0].scale.fill_(-1.0)
    out = head(x)
    rh = head.regression_head
    raw = rh.bbox_reg(rh.conv(x[0])).flatten(2).transpose(1, 2)  # level 0, before scale and ReLU
    torch.testing.assert_close(out["bbox_regression"][:, :16], torch.relu(-raw))  # relu(s · z), not s · relu(z)
    assert not torch.allclose(torch.relu(-raw), -torch.relu(raw))
    out["bbox_regression"].sum().backward()
    assert all(s.scale.grad is not None and s.scale.grad.abs() > 0 for s in scales)
    # POTO's box branch: the same
    poto = POTOHead(32, 3)
    assert len(poto.scales) == 5
    poto(x)["bbox_regression"].sum().backward()
    assert all(s.scale.grad.abs() > 0 for s in poto.scales)
    # the option: torchvision's head, no scale
    plain = build_detector("fcos", "resnet18", 3, (64,), 64, channels=32, options={"scale_per_level": False}).model
    assert type(plain.head.regression_head) is FCOSRegressionHead


# --- normalisers averaged over the workers --------------------------------------------------------------------

def _worker_losses(rank: int, world: int, init_file: str, out_dir: str):
    torch.set_num_threads(1)  # a forked worker: no OpenMP region of the parent's pool
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        targets, out, anchors, _ = _row_case()
        matched = [torch.tensor([-1, 0, -1, -1]) if rank == 0 else torch.tensor([0, 0, 0, -1])]
        losses = fcos_losses(CODER, targets, out, anchors, matched, 1)[0]
        mean = mean_over_workers(torch.tensor([float(rank + 1), 10.0 * rank]))
        torch.save({"losses": losses, "mean": mean}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_foreground_count_and_centerness_sum_are_averaged_over_workers(tmp_path):
    """Two gloo workers, one foreground point on rank 0 (centerness 1), three on rank 1 (centerness sum 1.894):
    every worker divides its own sums by the mean count (2) and the mean centerness sum (1.447)."""
    # forked (spawned workers would import torch, torchvision and lgd again: seconds each)
    mp.start_processes(_worker_losses, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    got = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    assert [g["mean"].tolist() for g in got] == [[1.5, 5.0]] * 2
    ctr_sums = [1.0, 1.0 + 2 * math.sqrt(0.2)]
    mean_fg, mean_ctr = 2.0, sum(ctr_sums) / 2
    targets, out, anchors, _ = _row_case()
    for rank, (n_fg, ctr_sum) in enumerate(zip((1, 3), ctr_sums)):
        matched = [torch.tensor([-1, 0, -1, -1]) if rank == 0 else torch.tensor([0, 0, 0, -1])]
        alone = fcos_losses(CODER, targets, out, anchors, matched, 1)[0]  # no process group: its own normalisers
        dist_losses = got[rank]["losses"]
        for key in ("classification", "bbox_ctrness"):
            torch.testing.assert_close(dist_losses[key], alone[key] * n_fg / mean_fg)
        torch.testing.assert_close(dist_losses["bbox_regression"], alone["bbox_regression"] * ctr_sum / mean_ctr)


# --- ATSS (and FCOS) inference: threshold and top-k on the class probability ------------------------------------

def test_atss_inference_thresholds_and_ranks_the_class_probability():
    model = build_detector("atss", "resnet18", 3, (64,), 64, channels=32).model
    assert model.score_thresh == 0.05 and model.threshold_class_prob
    # four points, class 1, far apart (no NMS between them): (class probability, centerness)
    cls_ctr = [(0.1, 0.01), (0.04, 1.0), (0.9, 0.25), (0.8, 1.0)]
    logit = lambda p: 30.0 if p == 1 else math.log(p / (1 - p))  # noqa: E731
    logits = torch.full((1, 4, 3), -20.0)
    logits[0, :, 1] = torch.tensor([logit(c) for c, _ in cls_ctr])
    ctr = torch.tensor([[[logit(t)] for _, t in cls_ctr]])
    anchors = torch.tensor([[x - 4.0, 0, x + 4, 8] for x in (4, 36, 68, 100)])
    outputs = {"cls_logits": [logits], "bbox_regression": [torch.full((1, 4, 4), 0.5)], "bbox_ctrness": [ctr]}

    def detect(m, topk=1000):
        m.topk_candidates = topk
        d = m.postprocess_detections(outputs, [[anchors]], [(8, 128)])[0]
        order = d["scores"].argsort(descending=True)
        return [round(v, 4) for v in d["scores"][order].tolist()]

    # cls .1 kept (score sqrt(.1 x .01) = .032), cls .04 dropped (though its score would be .2)
    assert detect(model) == [0.8944, 0.4743, 0.0316]
    # top-1 by class probability: cls .9 (score .474), not the best score (.894)
    assert detect(model, topk=1) == [0.4743]
    # torchvision's rule (the option): threshold and rank sqrt(cls x ctr)
    tv = build_detector("atss", "resnet18", 3, (64,), 64, channels=32, options={"threshold_class_prob": False}).model
    assert detect(tv) == [0.8944, 0.4743, 0.2]
    assert detect(tv, topk=1) == [0.8944]


# --- P6 from C5 -----------------------------------------------------------------------------------------------

def test_p6_comes_from_c5_for_every_dense_detector():
    """detectron2's and cvpods' RetinaNet/FCOS backbone builder: P6 from res5 (torchvision's RetinaNet v1: P5)."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    for det, from_c5 in (("fcos", True), ("atss", True), ("poto", True), ("retinanet", True)):
        bb = build_backbone("resnet18", None, det, 32).eval()
        extra = bb.fpn.extra_blocks
        assert extra.use_P5 is not from_c5 and extra.p6.in_channels == (512 if from_c5 else 32)
        with torch.no_grad():
            feats = bb(x)
            source = bb.body(x)["2"] if from_c5 else feats["2"]  # C5 (512 channels) or P5
            torch.testing.assert_close(feats["p6"], extra.p6(source))
    # the detector option: P6 from P5 again (torchvision's FCOS)
    m = build_detector("fcos", "resnet18", 3, (64,), 64, channels=32, options={"p6_from": "p5"}).model
    assert m.backbone.fpn.extra_blocks.use_P5 and m.backbone.fpn.extra_blocks.p6.in_channels == 32


# --- an unshared teacher head (Table 6(b)): its own outputs, the student's assignment ----------------------------

def test_losses_pair_with_an_instructive_head_keeps_the_one_assignment():
    import copy

    torch.manual_seed(0)
    adapter = build_detector("poto", "resnet18", 3, (64,), 64, channels=32)
    boxes = [{"boxes": torch.tensor([[8.0, 8, 40, 48]]), "labels": torch.tensor([1])},
             {"boxes": torch.tensor([[20.0, 4, 60, 30], [2, 30, 30, 62]]), "labels": torch.tensor([2, 1])}]
    images, targets = adapter.preprocess([torch.rand(3, 64, 64), torch.rand(3, 64, 64)], boxes)
    feats = adapter.features(images)
    other = copy.deepcopy(adapter.heads())
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    student, tea = adapter.losses_pair(feats, feats, images, targets, adapter.heads(), instructive_heads=other)
    fl = list(feats.values())
    out = {k: torch.cat([a, b]) for (k, a), b in zip(adapter.heads()(fl).items(), other(fl).values())}
    anchors = adapter.model.anchor_generator(images, fl)
    per_level = [x.shape[-2] * x.shape[-1] for x in fl]
    ref_student, ref_tea = adapter.model.set_losses(adapter.heads(), targets, out, anchors, per_level, 2)
    for got, ref in ((student, ref_student), (tea, ref_tea)):
        for k in ref:
            torch.testing.assert_close(got[k], ref[k])
    alone = adapter.losses(feats, images, targets, adapter.heads())
    torch.testing.assert_close(student["classification"], alone["classification"])
