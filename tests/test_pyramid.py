"""The pyramid canvas: layers shared by all FPN levels run once over the packed levels, exactly as per level."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lgd.knowledge_mapper import refinement
from lgd.pyramid import PyramidLayout

SIZES = [(6, 9), (3, 5), (2, 3), (1, 2), (1, 1)]  # an FPN's P3-P7 of a 48 x 72 input, rounded up


@pytest.fixture
def layout():
    return PyramidLayout(SIZES, torch.device("cpu"))


def _maps(sizes, channels=4, batch=2):
    torch.manual_seed(0)
    return [torch.randn(batch, channels, h, w, dtype=torch.float64) * 3 + 1 for h, w in sizes]


def test_pack_places_every_level_once_with_zeros_between(layout):
    maps = _maps(SIZES)
    canvas = layout.pack(maps)
    assert canvas.shape[-2:] == layout.canvas_size
    # every cell of every level is somewhere on the canvas, and everything else is zero
    assert canvas.ne(0).sum() == sum(m.ne(0).sum() for m in maps)
    assert all(torch.equal(a, b) for a, b in zip(layout.unpack(canvas), maps))
    # level 0 at the top left; a zero column between it and the column of the other levels
    assert torch.equal(canvas[..., :6, :9], maps[0]) and canvas[..., :, 9].abs().sum() == 0


def test_shared_layers_over_the_canvas_equal_the_layers_per_level(layout):
    torch.manual_seed(1)
    layers = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                           nn.GroupNorm(1, 4, affine=False), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)).double()
    maps = _maps(SIZES)
    packed = layout.unpack(layout.apply(layers, layout.pack(maps)))
    for got, m in zip(packed, maps):
        torch.testing.assert_close(got, layers(m), rtol=1e-10, atol=1e-10)
    r = refinement(4).double()  # the knowledge mapper's R, GroupNorm(1) at its end
    for got, m in zip(layout.unpack(layout.apply(r, layout.pack(maps))), maps):
        torch.testing.assert_close(got, r(m), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("per_channel", [False, True])
def test_level_norm_is_group_or_instance_norm_per_level_with_its_gradient(layout, per_channel):
    maps = _maps(SIZES[:3])
    small = PyramidLayout(SIZES[:3], torch.device("cpu"))
    canvas = small.pack(maps).requires_grad_(True)
    out = small.normalize(canvas, per_channel=per_channel)
    for got, m in zip(small.unpack(out), maps):
        ref = F.instance_norm(m) if per_channel else F.group_norm(m, 1)
        torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-8)
    assert out[..., :, 9].abs().sum() == 0  # cells between levels come out zero
    tiny = PyramidLayout([(3, 4), (2, 2), (1, 1)], torch.device("cpu"))  # the hand-written gradient, checked
    x = tiny.pack(_maps(tiny.sizes, channels=2)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: tiny.normalize(x, per_channel), (x,), fast_mode=True)


def test_a_level_of_one_cell_normalises_to_zero_with_zero_gradient(layout):
    canvas = layout.pack(_maps(SIZES, batch=1)).requires_grad_(True)
    out = layout.normalize(canvas, per_channel=True)
    last = layout.unpack(out)[-1]
    assert torch.equal(last, torch.zeros_like(last))
    out.sum().backward()
    assert torch.isfinite(canvas.grad).all()


def test_levels_must_be_ordered_largest_first():
    with pytest.raises(ValueError, match="largest first"):
        PyramidLayout([(2, 3), (6, 9)], torch.device("cpu"))
