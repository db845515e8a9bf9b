"""Batched label assignment and the shared head pass give torchvision's own losses, to rounding."""
import pytest
import torch

from lgd.detectors import build_detector
from lgd.detectors.assignment import iou_assign

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
    adapter = build_detector(detector.split("_")[0], "resnet18", K + 1, (128,), 160, channels=32)
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
    else:
        ref = model.compute_loss(targets, out, anchors, [x.size(2) * x.size(3) for x in fl])
    assert ours.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-5, atol=1e-6)
    # one head pass over both feature sets gives each set's own losses
    other = {k: v * 0.5 + 0.1 for k, v in feats.items()}
    student, tea = adapter.losses_pair(feats, other, images, targets, adapter.heads())
    alone = adapter.losses(other, images, targets, adapter.heads())
    for k in ref:
        torch.testing.assert_close(student[k], ours[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(tea[k], alone[k], rtol=1e-5, atol=1e-6)


def test_iou_assign_thresholds_and_low_quality_matches_by_hand():
    anchors = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 6.0], [0.0, 0.0, 10.0, 4.5],
                             [50.0, 50.0, 60.0, 60.0], [40.0, 40.0, 44.0, 44.0]])]
    # box 0 = anchor 0 (IoU 1); anchors 1 and 2 overlap it by IoU 0.6 and 0.45; box 1 overlaps anchor 4 by 0.16 only
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [42.0, 42.0, 52.0, 52.0]])}]
    plain = iou_assign(targets, anchors, 0.5, 0.4, allow_low_quality=False)[0]
    assert plain.tolist() == [0, 0, -2, -1, -1]
    low = iou_assign(targets, anchors, 0.5, 0.4, allow_low_quality=True)[0]
    assert low.tolist() == [0, 0, -2, -1, 1]  # box 1 keeps its best anchor, however poor
