"""The implicit teacher is the reference LGD teacher: parity with a loop-by-loop oracle, and each rule by hand."""
import pytest
import torch

from lgd.knowledge_mapper import refinement
from lgd.label_encoder import SpatialTransformer
from lgd.objects import pack_objects
from lgd.teacher import ImplicitTeacher
from tests.reference_teacher import random_reference_state, reference_teacher

K, DIM, HEADS = 3, 16, 4


def _batch(dtype=torch.float64):
    """Three images in a 64 x 96 padded batch: a box past the padded edge, one thinner than a P6 cell, one image
    with a single object."""
    boxes = [torch.tensor([[3.5, 4.2, 40.7, 30.1], [50.3, 10.9, 101.0, 70.0], [20.2, 33.3, 21.9, 35.0]]),
             torch.tensor([[0.0, 0.0, 95.0, 63.0], [12.6, 8.1, 44.4, 52.7]]),
             torch.tensor([[30.0, 20.5, 58.25, 41.75]])]
    labels = [torch.tensor([1, 3, 2]), torch.tensor([2, 2]), torch.tensor([3])]
    targets = [{"boxes": b.to(dtype), "labels": lab} for b, lab in zip(boxes, labels)]
    sizes = [(60, 90), (64, 96), (48, 80)]
    return targets, sizes, (64, 96)


@pytest.mark.parametrize("context", [True, False])
def test_teacher_matches_the_reference_behaviour_with_the_reference_weights(context):
    torch.manual_seed(0)
    targets, sizes, pad = _batch()
    feats = [torch.randn(3, DIM, 64 // s, 96 // s, dtype=torch.float64) for s in (8, 16, 32, 64)]
    sd = random_reference_state(4 + K, DIM)
    teacher = ImplicitTeacher(K, DIM, HEADS, mapper_inputs="both" if context else "objects").double().eval()
    unused = teacher.load_reference_state_dict(sd)
    assert unused == ([] if context else ["global_ctx_proj_1D.bias", "global_ctx_proj_1D.weight"])
    objs = pack_objects(targets, sizes, pad, use_context=context)
    ours = teacher(feats, objs)
    ref = reference_teacher(sd, feats, [t["boxes"] for t in targets], [t["labels"] for t in targets], pad, K,
                            context, HEADS)
    for lvl, (a, b) in enumerate(zip(ours, ref)):
        rel = (a - b).abs().max() / b.abs().max()
        assert rel < 1e-10, f"level {lvl}: relative difference {rel:.2e}"
    # in float32 the same weights agree within the tolerance the outside parity check uses
    t32 = ImplicitTeacher(K, DIM, HEADS, mapper_inputs="both" if context else "objects").eval()
    t32.load_reference_state_dict({k: v.float() for k, v in sd.items()})
    objs32 = pack_objects([{"boxes": t["boxes"].float(), "labels": t["labels"]} for t in targets], sizes, pad,
                          use_context=context)
    for a, b in zip(t32([f.float() for f in feats], objs32), ref):
        assert ((a.double() - b).abs().max() / b.abs().max()) < 1e-5


def test_every_teacher_parameter_has_its_reference_tensor():
    teacher = ImplicitTeacher(K, DIM, HEADS, mapper_inputs="both")
    sd = random_reference_state(4 + K, DIM, dtype=torch.float32)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher.load_reference_state_dict({f"distiller.teacher.{k}": v for k, v in sd.items()}, prefix="distiller.teacher.")
    assert all(not torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    # the reference has no affine GroupNorm, so neither has the teacher: nothing of ours is left unmapped
    assert len(teacher.state_dict()) == len(sd)
    with pytest.raises(KeyError, match="label_encoder.fuse"):
        ImplicitTeacher(K, DIM, HEADS).load_reference_state_dict(
            {k: v for k, v in sd.items() if not k.startswith("label_encoder_.conv4")})


def _one(boxes, pad=(64, 64), sizes=None, context=False, **kw):
    t = [{"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.ones(len(boxes), dtype=torch.long)}]
    return pack_objects(t, sizes or [pad], pad, use_context=context, **kw)


def test_box_marks_the_cells_inside_it_at_each_level():
    objs = _one([[10.0, 20.0, 30.0, 40.0]])
    # stride 8: x 1.25..3.75 -> columns 2, 3; y 2.5..5.0 -> rows 3, 4, 5 (a border on a cell counts)
    m = objs.level_masks((8, 8)).reshape(8, 8)
    expected = torch.zeros(8, 8)
    expected[3:6, 2:4] = 1
    assert torch.equal(m, expected)
    # the alternative marks every cell the box touches: columns 1..3, rows 2..4
    touched = objs.level_masks((8, 8), cover_touched_cells=True).reshape(8, 8)
    expected = torch.zeros(8, 8)
    expected[2:5, 1:4] = 1
    assert torch.equal(touched, expected)


def test_box_smaller_than_a_cell_marks_no_cell_unless_asked():
    objs = _one([[9.0, 9.0, 10.0, 10.0]])  # at stride 16: 0.5625..0.625, no cell index inside
    assert objs.level_masks((4, 4)).sum() == 0
    assert objs.level_masks((4, 4), cover_touched_cells=True).sum() == 1


def test_boxes_are_clamped_to_the_padded_batch():
    objs = _one([[-5.0, 10.0, 60.0, 40.0]], pad=(32, 48))
    assert objs.boxes[0, 0].tolist() == [0.0, 10.0, 47.0, 31.0]


def test_context_box_is_the_whole_padded_batch():
    t = [{"boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0]]), "labels": torch.tensor([1])}] * 2
    sizes = [(20, 30), (32, 40)]
    ref = pack_objects(t, sizes, (32, 48), use_context=True)
    assert ref.boxes[:, 0].tolist() == [[0.0, 0.0, 47.0, 31.0]] * 2
    assert ref.level_masks((4, 6))[:, 0].sum(-1).tolist() == [24.0, 24.0]  # every cell of the P3-like level
    own = pack_objects(t, sizes, (32, 48), use_context=True, context_box_per_image=True)
    assert own.boxes[:, 0].tolist() == [[0.0, 0.0, 30.0, 20.0], [0.0, 0.0, 40.0, 31.0]]


@pytest.mark.parametrize("per_image", [False, True])
def test_an_objects_transform_ignores_the_other_objects_unless_pooled_per_image(per_image):
    torch.manual_seed(0)
    stn = SpatialTransformer(7, "layernorm", per_image=per_image).eval()
    x = torch.randn(3, 7)  # one image's three objects, flattened as rows
    valid = torch.ones(1, 3, dtype=torch.bool)
    y = x.clone()
    y[1:] = torch.randn(2, 7)  # same first object, different others
    same = torch.allclose(stn(x, valid)[0], stn(y, valid)[0], atol=1e-6)
    assert same is (not per_image)


def test_refinement_output_is_normalised_per_image():
    torch.manual_seed(0)
    r = refinement(8)
    x = torch.randn(2, 8, 5, 6)
    x[1] = x[1] * 50 + 7
    out = r(x)
    assert not any(p.shape == (8,) and n.startswith(("2", "5", "8")) for n, p in r.named_parameters())  # no affine GN
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(dim=(1, 2, 3), unbiased=False), torch.ones(2), atol=1e-3, rtol=0)
