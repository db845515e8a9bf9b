"""Faster / Mask R-CNN losses batched over images and feature sets give torchvision's own proposals and losses;
the batched sampler keeps torchvision's quotas and draws uniformly; grouped NMS is batched_nms."""
import pytest
import torch
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import batched_nms

from lgd.detectors import build_detector
from lgd.detectors.assignment import balanced_sample
from lgd.detectors.rcnn_losses import filter_proposals, grouped_nms
from pair_losses import assert_pair_is_each_alone

K = 4
EVERYTHING = 10 ** 7  # a sampler quota above every anchor and proposal: sampling is then deterministic


def _targets(seed, counts, sizes):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, (h, w) in zip(counts, sizes):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) * 0.6
        wh = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) * 0.35 + 4
        boxes = torch.cat([xy, xy + wh], 1)
        masks = torch.zeros(n, h, w, dtype=torch.uint8)
        for i, (x0, y0, x1, y1) in enumerate(boxes.round().int().tolist()):
            masks[i, y0:y1, x0:(x0 + x1) // 2 + 1] = 1  # the left half of the box: the targets differ from the box
        out.append({"boxes": boxes, "labels": torch.randint(1, K + 1, (n,), generator=g), "masks": masks})
    return out


@pytest.mark.parametrize("detector", ["faster_rcnn", "mask_rcnn"])
@pytest.mark.parametrize("counts", [(3, 7), (5, 0), (0, 0)])
def test_losses_and_proposals_equal_torchvisions(detector, counts):
    torch.manual_seed(0)
    adapter = build_detector(detector, "resnet18", K + 1, (128,), 160, channels=32,
                             options={"rpn_post_nms_top_n_train": 300})
    model = adapter.model.train()
    for sampler in (model.rpn.fg_bg_sampler, model.roi_heads.fg_bg_sampler):
        sampler.batch_size_per_image, sampler.positive_fraction = EVERYTHING, 1.0
    g = torch.Generator().manual_seed(1)
    sizes = [(128, 150), (110, 128)]  # two image sizes: the smaller image's masks are padded in the batch
    images = [torch.rand(3, h, w, generator=g) for h, w in sizes]
    images, targets = adapter.preprocess(images, _targets(2, counts, sizes))
    feats = adapter.features(images)
    ours = adapter.losses(feats, images, targets, adapter.heads())

    proposals, ref = model.rpn(images, feats, targets)
    _, roi = model.roi_heads(feats, proposals, images.image_sizes, targets)
    ref.update(roi)
    assert ours.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-4, atol=1e-6)

    # the proposals themselves: per image the same boxes, at most post_nms_top_n of them
    with torch.no_grad():
        objectness, deltas = model.rpn.head(list(feats.values()))
        per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        anchors = model.rpn.anchor_generator(images, list(feats.values()))
        decoded = model.rpn.box_coder.decode(deltas, anchors).view(len(anchors), -1, 4)
        boxes, image = filter_proposals(model.rpn, decoded, objectness.view(len(anchors), -1), per_level,
                                        images.image_sizes)
    for i, ref_boxes in enumerate(proposals):
        mine = boxes[image == i]
        assert len(mine) == len(ref_boxes) <= 300
        torch.testing.assert_close(mine[torch.argsort(mine[:, 0] * 1e4 + mine[:, 1])],
                                   ref_boxes[torch.argsort(ref_boxes[:, 0] * 1e4 + ref_boxes[:, 1])])

    student = assert_pair_is_each_alone(adapter, feats, images, targets, ours, rtol=1e-4)  # both sets, one pass
    sum(student.values()).backward()  # every parameter of the heads gets a gradient
    assert all(p.grad is not None for p in adapter.heads().parameters())


def test_balanced_sample_keeps_torchvisions_quotas_and_draws_uniformly():
    torch.manual_seed(0)
    # group 0: 10 positives, 30 negatives, 5 ignored; group 1: 1 positive, 2 negatives; group 2: nothing
    labels = torch.tensor([1] * 10 + [0] * 30 + [-1] * 5 + [2] + [0] * 2 + [-1] * 3)
    group = torch.tensor([0] * 45 + [1] * 6)
    counts = torch.zeros(len(labels))
    for _ in range(2000):
        pos, neg = balanced_sample(labels, group, 3, per_group=8, positive_fraction=0.25)
        assert not (pos & neg).any() and (labels[pos] >= 1).all() and (labels[neg] == 0).all()
        assert pos[group == 0].sum() == 2 and neg[group == 0].sum() == 6  # 8 * 0.25 positives, the rest negatives
        assert pos[group == 1].sum() == 1 and neg[group == 1].sum() == 2  # fewer than the quota: all of them
        counts += (pos | neg).float()
    freq = counts / 2000
    assert ((freq[:10] > 0.15) & (freq[:10] < 0.25)).all(), freq[:10]  # each positive of group 0: 2 of 10
    assert ((freq[10:40] > 0.14) & (freq[10:40] < 0.26)).all(), freq[10:40]  # each negative: 6 of 30
    assert (freq[40:45] == 0).all() and (freq[45:48] == 1).all()


def test_grouped_nms_equals_batched_nms():
    g = torch.Generator().manual_seed(3)
    xy = torch.rand(3000, 2, generator=g) * 300
    boxes = torch.cat([xy, xy + torch.rand(3000, 2, generator=g) * 60 + 1], 1)
    scores = torch.rand(3000, generator=g)
    image, level = torch.randint(0, 4, (3000,), generator=g), torch.randint(0, 5, (3000,), generator=g)
    ref = batched_nms(boxes, scores, image * 5 + level, 0.7)
    for per_level in (False, True):  # a CPU's default, a GPU's default
        assert torch.equal(grouped_nms(boxes, scores, image, level, 5, 0.7, per_level=per_level), ref)
