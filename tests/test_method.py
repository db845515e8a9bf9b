"""The LGD modules of §3: per-image isolation, permutation, pooling, context, gradients of Eq. 5-7."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from lgd.appearance import AppearanceEncoder
from lgd.distillation import distillation_loss
from lgd.label_encoder import build_label_encoder
from lgd.objects import mask_codes, pack_objects
from lgd.pyramid import PyramidLayout
from lgd.relation_adapter import RelationAdapter
from lgd.teacher import ImplicitTeacher

K = 3


def _targets(seed=0, counts=(3, 2), size=64):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in counts:
        xy = torch.rand(n, 2, generator=g) * size * 0.6
        wh = torch.rand(n, 2, generator=g) * size * 0.3 + 4
        out.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(1, K + 1, (n,), generator=g)})
    return out


def _pack(targets, context=True):
    return pack_objects(targets, [(64, 64)] * len(targets), (64, 64), use_context=context)


@pytest.mark.parametrize("kind", ["pointnet", "mlp", "transformer"])
def test_label_encoder_output_of_an_image_ignores_other_images(kind):
    torch.manual_seed(0)
    enc = build_label_encoder(kind, 4 + K, 32, "layernorm", 4).eval()
    a, b = _targets(0), _targets(1, counts=(3, 5))
    b[0] = a[0]  # same first image, different second image (and more padding)
    pa, pb = _pack(a), _pack(b)
    ea = enc(pa.descriptors(K), pa.valid)
    eb = enc(pb.descriptors(K), pb.valid)
    n = int(pa.valid[0].sum())
    torch.testing.assert_close(ea[0, :n], eb[0, :n], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ea[1, :2], eb[1, :2])


def test_batchnorm_variant_does_mix_images_in_training():
    torch.manual_seed(0)
    enc = build_label_encoder("pointnet", 4 + K, 32, "batchnorm", 4).train()
    a, b = _targets(0), _targets(1)
    b[0] = a[0]
    pa, pb = _pack(a), _pack(b)
    assert not torch.allclose(enc(pa.descriptors(K), pa.valid)[0], enc(pb.descriptors(K), pb.valid)[0])


def test_pointnet_is_permutation_equivariant_within_an_image():
    torch.manual_seed(0)
    enc = build_label_encoder("pointnet", 4 + K, 32, "layernorm", 4).eval()
    t = _targets(2, counts=(4,))
    perm = torch.tensor([2, 0, 3, 1])
    tp = [{"boxes": t[0]["boxes"][perm], "labels": t[0]["labels"][perm]}]
    p, pp = _pack(t), _pack(tp)
    e, ep = enc(p.descriptors(K), p.valid), enc(pp.descriptors(K), pp.valid)
    torch.testing.assert_close(ep[0, 1:], e[0, 1:][perm], rtol=1e-5, atol=1e-5)  # slot 0 is the context
    torch.testing.assert_close(ep[0, 0], e[0, 0], rtol=1e-5, atol=1e-5)


def test_descriptor_layout_and_context_object():
    t = [{"boxes": torch.tensor([[0.0, 16.0, 32.0, 64.0]]), "labels": torch.tensor([2])}]
    p = pack_objects(t, [(48, 64)], (64, 128), use_context=True)
    d = p.descriptors(K)
    # object: box clamped to the padded batch (y2 64 -> 63), / (W=128, H=64), then one-hot, all mapped to [-1, 1]
    torch.testing.assert_close(d[0, 1], torch.tensor([-1.0, -0.5, -0.5, 63 / 32 - 1, -1.0, 1.0, -1.0]))
    # context: the whole padded batch, clamped to (W-1, H-1), zero class vector
    torch.testing.assert_close(d[0, 0], torch.tensor([-1.0, -1.0, 127 / 64 - 1, 63 / 32 - 1, -1.0, -1.0, -1.0]))
    m = p.level_masks((8, 16)).reshape(1, 2, 8, 16)
    assert m[0, 0].all()  # context: every cell of the level
    # object at stride 8: x 0..4, y 2..7.875 -> columns 0..4, rows 2..7
    assert m[0, 1, 2:8, 0:5].all() and m[0, 1].sum() == 30


def test_mask_code_of_a_half_filled_box():
    """Table 10: an object's mask inside its box at 7 x 7 (aligned RoIAlign, >= 0.5): a box 14 px wide whose mask
    fills its 7 left columns gives 2-px bins: bins 0-2 full, bin 3 half (pixels 6 and 7) -> 1, bins 4-6 empty."""
    masks = torch.zeros(1, 16, 16, dtype=torch.uint8)
    masks[0, 0:14, 0:7] = 1
    code = mask_codes(masks, torch.tensor([[0.0, 0.0, 14.0, 14.0]])).reshape(7, 7)
    assert code.tolist() == [[1, 1, 1, 1, 0, 0, 0]] * 7


def test_mask_descriptors_are_appended_and_used_by_the_teacher():
    """Table 10 (the reference's LOAD_LABELMAP): descriptors end with the 49-value mask code, ones for the context
    object, zeros for padding; the label encoder takes 4 + K + 49 inputs and the code changes its output."""
    boxes = torch.tensor([[4.0, 4.0, 18.0, 18.0], [20.0, 2.0, 30.0, 30.0]])
    full = torch.zeros(2, 32, 32, dtype=torch.uint8)
    full[0, 4:18, 4:18] = 1
    full[1, 2:30, 20:30] = 1
    half = full.clone()
    half[0, 4:18, 11:18] = 0  # the first object's right half
    targets = [{"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": m} for m in (full, half)]
    targets.append({"boxes": boxes[:1], "labels": torch.tensor([3]), "masks": full[:1]})  # one padding slot
    p = pack_objects(targets, [(32, 32)] * 3, (32, 32), use_context=True, with_masks=True)
    d = p.descriptors(K, with_mask_codes=True)
    assert d.shape == (3, 3, 4 + K + 49)
    torch.testing.assert_close(d[:, :, :4 + K], p.descriptors(K))  # box and class as before
    assert (d[:, 0, 4 + K:] == 1).all()  # the context object: a full mask
    assert (d[0, 1:, 4 + K:] == 1).all()  # full masks: every bin
    assert (d[1, 1, 4 + K:].reshape(7, 7)[:, 4:] == -1).all() and (d[1, 1, 4 + K:].reshape(7, 7)[:, :3] == 1).all()
    assert (d[2, 2] == 0).all()  # padding
    with pytest.raises(ValueError, match="instance masks"):
        _pack(_targets()).descriptors(K, with_mask_codes=True)
    torch.manual_seed(0)
    teacher = ImplicitTeacher(K, 16, 4, mask_descriptors=True).eval()
    assert teacher.label_encoder(d, p.valid).shape[:2] == (3, 3)
    f = [torch.randn(3, 16, 8, 8)]
    out = teacher(f, p)[0]
    ones = teacher(f, dataclasses.replace(p, mask_codes=torch.ones_like(p.mask_codes)))[0]  # same pooling masks
    torch.testing.assert_close(out[0], ones[0])  # image 0's masks are full: its codes are all ones already
    assert not torch.allclose(out[1], ones[1], atol=1e-4)  # image 1's half mask reaches the teacher's output


def test_mask_pooling_equals_hand_computed_mean():
    torch.manual_seed(0)
    enc = AppearanceEncoder(8, "mask")
    t = [{"boxes": torch.tensor([[8.0, 8.0, 24.0, 40.0]]), "labels": torch.tensor([1])}]
    p = pack_objects(t, [(64, 64)], (64, 64), use_context=True)
    f = torch.randn(1, 8, 8, 8)
    layout = PyramidLayout([(8, 8)], f.device)
    emb = enc(layout.pack([f]), p.pyramid_masks(layout), layout, p)
    proj = enc.proj(f)
    # stride 8: x 1..3, y 1..5 -> the cells with 1 <= column <= 3 and 1 <= row <= 5
    torch.testing.assert_close(emb[0, 0, 1], proj[0, :, 1:6, 1:4].mean(dim=(1, 2)))
    torch.testing.assert_close(emb[0, 0, 0], proj[0].mean(dim=(1, 2)))  # context: the whole padded batch


def test_padding_objects_have_empty_masks():
    t = [{"boxes": torch.tensor([[9.0, 9.0, 30.0, 30.0]]), "labels": torch.tensor([1])},
         {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    p = pack_objects(t, [(64, 64), (64, 64)], (64, 64), use_context=False)
    for cover in (False, True):
        m = p.level_masks((4, 4), cover_touched_cells=cover)
        assert m[0, 0].sum() > 0 and m[1].sum() == 0
    assert p.valid.tolist() == [[True], [False]]


def test_relation_adapter_attends_within_each_image_only():
    torch.manual_seed(0)
    ra = RelationAdapter(16, 4, "student").eval()
    valid = torch.tensor([[True, True, False], [True, True, True]])
    lab, app = torch.randn(2, 3, 16), torch.randn(2, 2, 3, 16)
    out = ra(lab, app, valid)
    lab2, app2 = lab.clone(), app.clone()
    lab2[1], app2[1] = torch.randn(3, 16), torch.randn(2, 3, 16)
    lab2[0, 2] = 100.0  # padding of image 0 changes too: it must be ignored
    out2 = ra(lab2, app2, valid)
    torch.testing.assert_close(out[0], out2[0])
    assert out[0, :, 2].abs().sum() == 0
    ra_label = RelationAdapter(16, 4, "label").eval()
    ra_label.load_state_dict(ra.state_dict())
    assert not torch.allclose(ra_label(lab, app, valid), out)


def test_distillation_loss_is_instance_normalised_and_stops_gradient():
    layout = PyramidLayout([(8, 8), (1, 1)], torch.device("cpu"))
    s = [torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(2, 4, 1, 1, requires_grad=True)]
    t = [torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(2, 4, 1, 1, requires_grad=True)]

    def loss_of(s, t):
        return distillation_loss(layout.pack(s), layout.pack(t), layout)

    loss = loss_of(s, t)
    loss.backward()
    assert t[0].grad is None and t[1].grad is None and s[0].grad is not None
    # Eq. 5 by hand: InstanceNorm per level, squared differences summed over the pyramid / its size
    ref = sum(((F.instance_norm(a) - F.instance_norm(b)) ** 2).sum() for a, b in zip(s[:1], t[:1])) / (2 * 4 * 65)
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-6)
    # invariant to per-channel affine changes of either side (InstanceNorm on both)
    same = loss_of([x * 3 + 1 for x in s], [x * 0.5 - 2 for x in t])
    torch.testing.assert_close(same, loss.detach(), rtol=1e-3, atol=1e-4)
    assert loss_of(s, s).item() == pytest.approx(0.0, abs=1e-8)


def test_distillation_loss_takes_one_image_with_1x1_maps():
    layout = PyramidLayout([(2, 3), (1, 1)], torch.device("cpu"))
    s = [torch.randn(1, 4, 2, 3, requires_grad=True), torch.randn(1, 4, 1, 1, requires_grad=True)]
    loss = distillation_loss(layout.pack(s), layout.pack([torch.randn(1, 4, 2, 3), torch.randn(1, 4, 1, 1)]), layout)
    loss.backward()
    assert torch.isfinite(loss) and s[0].grad is not None
