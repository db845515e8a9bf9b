"""Batched label assignment and the shared head pass give torchvision's own losses, to rounding; ATSS's and
POTO's assignments on hand-made cases."""

import pytest
import torch

from torchvision.models.detection import FCOS as TorchvisionFCOS

from lgd.detectors import build_detector
from lgd.detectors.assignment import atss_assign, hungarian_assign, iou_assign
from pair_losses import assert_pair_is_each_alone, poto_outputs

K = 4


def _targets(seed, counts, size=128):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in counts:
        xy = torch.rand(n, 2, generator=g) * size * 0.7
        wh = torch.rand(n, 2, generator=g) * size * 0.4 + 3
        out.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(1, K + 1, (n,), generator=g)})
    return out


@pytest.mark.parametrize("detector", ["retinanet", "retinanet_giou", "fcos"])
@pytest.mark.parametrize("counts", [(3, 7), (5, 0), (0, 0), (12, 1)])
def test_adapter_losses_equal_torchvisions(detector, counts):
    torch.manual_seed(0)
    # FCOS: the reference's head and points, with torchvision's box-loss normalisation (the foreground count)
    opts = {"centerness_weighted_box": False} if detector == "fcos" else {}
    adapter = build_detector(detector.split("_")[0], "resnet18", K + 1, (128,), 160, channels=32, options=opts)
    if detector == "retinanet_giou":  # RetinaNet v2's box loss
        adapter.model.head.regression_head._loss_type = "giou"
    model = adapter.model.train()
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 128, 150, generator=g), torch.rand(3, 110, 128, generator=g)]
    images, targets = adapter.preprocess(images, _targets(2, counts))
    feats = adapter.features(images)
    ours = adapter.losses(feats, images, targets, adapter.heads())
    fl = list(feats.values())
    out, anchors = model.head(fl), model.anchor_generator(images, fl)
    if detector.startswith("retinanet"):
        ref = model.compute_loss(targets, out, anchors)
    else:  # torchvision's own per-image matching and losses, on our head's outputs and points
        ref = TorchvisionFCOS.compute_loss(model, targets, out, anchors, [x.size(2) * x.size(3) for x in fl])
    assert ours.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-5, atol=1e-6)
    assert_pair_is_each_alone(adapter, feats, images, targets, ours, rtol=1e-5)  # one head pass, both sets


def test_iou_assign_thresholds_and_low_quality_matches_by_hand():
    anchors = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 6.0], [0.0, 0.0, 10.0, 4.5],
                             [50.0, 50.0, 60.0, 60.0], [40.0, 40.0, 44.0, 44.0]])]
    # box 0 = anchor 0 (IoU 1); anchors 1 and 2 overlap it by IoU 0.6 and 0.45; box 1 overlaps anchor 4 by 0.16 only
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [42.0, 42.0, 52.0, 52.0]])}]
    plain = iou_assign(targets, anchors, 0.5, 0.4, allow_low_quality=False)[0]
    assert plain.tolist() == [0, 0, -2, -1, -1]
    low = iou_assign(targets, anchors, 0.5, 0.4, allow_low_quality=True)[0]
    assert low.tolist() == [0, 0, -2, -1, 1]  # box 1 keeps its best anchor, however poor


def _two_level_points(level0=range(4, 32, 8), level1=(8, 24)):
    """Points of two pyramid levels on one row: stride-8 anchors (8 px squares) at y = 4, stride-16 at y = 8."""
    return torch.tensor([[x - 4, 0, x + 4, 8] for x in level0] + [[x - 8, 0, x + 8, 16] for x in level1],
                        dtype=torch.float)


def test_atss_assign_adaptive_iou_threshold_and_centre_inside_by_hand():
    """Points 0-3 (stride 8, x = 4..28) and 4-5 (stride 16, x = 8, 24); top-2 per level, anchor_scale 1."""
    a = _two_level_points()
    targets = [
        # box 0: candidates p0, p1 (level 0), p4, p5 (level 1) with IoU .8, .125, .3125, 0: mean + std = .66 -> p0;
        # box 1: candidates p2, p3, p5, p4 with IoU .2, .2, .8, .06: threshold .645 -> p5 only
        {"boxes": torch.tensor([[0.0, 0, 10, 8], [14, 0, 34, 16]])},
        # candidates p1, p2, p4, p5 with IoU .26, .21, .32, .26: only p4 reaches mean + std (.306), but its point
        # (8, 8) lies outside the box (x < 9): no positive at all
        {"boxes": torch.tensor([[9.0, 0, 22, 16]])},
        {"boxes": torch.zeros(0, 4)},  # padded to the batch's boxes: still nothing
    ]
    matched = atss_assign(targets, [a, a, a], [4, 2], topk=2, anchor_scale=1.0)
    assert [m.tolist() for m in matched] == [[0, -1, -1, -1, -1, 1], [-1] * 6, [-1] * 6]
    # the box widened by 2 px to the left ([7, 0, 22, 16]) holds p4's point: IoU .27, .19, .41, .24 -> p4 alone
    wider = [{"boxes": torch.tensor([[7.0, 0, 22, 16]])}]
    assert atss_assign(wider, [a], [4, 2], topk=2, anchor_scale=1.0)[0].tolist() == [-1, -1, -1, -1, 0, -1]


def test_hungarian_assign_is_one_to_one_and_globally_optimal():
    # greedy (box 0 takes its best, anchor 0) would total 0.9 + 0.1; the optimum gives anchor 0 to box 1
    quality = torch.tensor([[[0.9, 0.8, 0.1], [0.85, 0.1, 0.2]], [[0.3, 0.2, 0.9], [0.0, 0.0, 0.0]]])
    valid = torch.tensor([[True, True], [True, False]])  # image 1 has one real box (the other is padding)
    assert hungarian_assign(quality, valid).tolist() == [[1, 0, -1], [-1, -1, 0]]


def _poto_outputs(model, anchors, probs: dict, boxes: dict):
    return poto_outputs(model, anchors, probs, boxes, max_filter=True)


def test_poto_assigns_one_point_per_box_by_quality_within_the_prior_and_aux_one_to_many():
    a = _two_level_points(level0=range(4, 64, 8), level1=(8, 24, 40, 56))  # points 0-7, 8-11
    # one box [0, 0, 16, 8] of class 1; p0: score .9 but box IoU .5; p1: score .5, exact box; p2: score .95,
    # IoU .8, but its point (20, 4) lies outside the box (and its centre region)
    out_probs = {0: 0.9, 1: 0.5, 2: 0.95}
    out_boxes = {0: [0, 0, 8, 8], 1: [0, 0, 16, 8], 2: [0, 0, 20, 8]}
    targets = [{"boxes": torch.tensor([[0.0, 0, 16, 8]]), "labels": torch.tensor([1])}]
    model = build_detector("poto", "resnet18", 3, (64,), 64, channels=32, options={"aux_loss": True}).model
    matched, aux = model.assign(targets, _poto_outputs(model, a, out_probs, out_boxes), a[None], [8, 4])
    # quality .5^0.2 * 1^0.8 = .87 beats .9^0.2 * .5^0.8 = .56: one positive, p1
    assert matched[0].tolist() == [-1, 0] + [-1] * 10
    # the auxiliary one-to-many loss: qualities over all 12 candidates .56, .87, .83, 0...: mean + std = .54;
    # p0 and p1 pass, p2 too but its point is outside the box
    assert aux[0].tolist() == [0, 0] + [-1] * 10
    # α = 0: the classification score alone decides
    scores_only = build_detector("poto", "resnet18", 3, (64,), 64, channels=32, options={"alpha": 0.0}).model
    matched, _ = scores_only.assign(targets, _poto_outputs(model, a, out_probs, out_boxes), a[None], [8, 4])
    assert matched[0].tolist() == [0] + [-1] * 11
