"""The training recipe around the teacher, as the reference LGD code and its released configs train: what is frozen,
which optimizer holds what, gradient clipping per optimizer, random horizontal flips, the schedule defaults."""
import pytest
import torch

from lgd.config import FREEZE_ITERS
from lgd.data.coco import UnreadableImages, collate
from lgd.data.flip import FlippedSubset, hflip
from lgd.engine import TrainingStep, _batches, build_datasets, build_model, build_optimizer, clip_gradients


def _model(make_config, **over):
    cfg = make_config(**over)
    train, _ = build_datasets(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, train.num_classes)
    model.train()
    return cfg, model, train


def test_trunk_is_frozen_for_the_schedules_default_and_the_fpn_trains(make_config):
    """The reference drops the gradients of ``student.raw_backbone`` (the ResNet stages) for
    PRE_FREEZE_STUDENT_BACKBONE_ITERS: 10k for 1x, 20k for 2x/3x (paper units, scaled); the FPN and P6/P7 train."""
    assert FREEZE_ITERS == {"1x": 10_000, "2x": 20_000, "3x": 20_000}
    for schedule, iters in FREEZE_ITERS.items():
        cfg = make_config(solver={"schedule": schedule}, lgd={"enabled": True, "freeze_backbone_iters": None})
        assert cfg.freeze_backbone_iters == iters
    cfg, model, train = _model(make_config, solver={"iter_scale": 0.001},
                               lgd={"enabled": True, "freeze_backbone_iters": None})
    frozen = {id(p) for p in model.frozen_parameters()}
    trunk = {id(p) for p in model.detector.backbone.body.parameters() if p.requires_grad}
    fpn = [p for p in model.detector.backbone.fpn.parameters()]
    assert frozen == trunk and not frozen & {id(p) for p in fpn}
    opt, _ = build_optimizer(cfg, model)
    images, targets = collate([train[i] for i in range(2)])
    body = {k: v.clone() for k, v in model.detector.backbone.body.named_parameters()}
    fpn_before = [p.detach().clone() for p in fpn]
    step = TrainingStep(model, model, opt, cfg, torch.device("cpu"))
    step(images, targets, cfg.solver.scaled(10_000) - 1)  # the last frozen iteration
    assert all(torch.equal(v, dict(model.detector.backbone.body.named_parameters())[k]) for k, v in body.items())
    assert all(not torch.equal(b, p) for b, p in zip(fpn_before, fpn))
    step(images, targets, cfg.solver.scaled(10_000))  # the first free one
    moved = [k for k, v in model.detector.backbone.body.named_parameters()
             if v.requires_grad and not torch.equal(v, body[k])]
    assert moved


def test_freeze_scope_backbone_keeps_the_old_behaviour(make_config):
    cfg, model, _ = _model(make_config, lgd={"enabled": True, "freeze_scope": "backbone"})
    assert {id(p) for p in model.frozen_parameters()} == {
        id(p) for p in model.detector.backbone.parameters() if p.requires_grad}


def test_adaptation_head_trains_in_the_students_optimizer_and_the_teacher_takes_the_students_lr(make_config):
    """The reference's two optimizers: student + adapter in one, the teacher in the other; its configs give both
    the same lr and decay, so a left-out teacher lr or decay is the student's (0.02 here, not SGD's 0.01)."""
    cfg, model, _ = _model(make_config, solver={"base_lr": 0.02, "weight_decay": 5e-5}, lgd={"enabled": True})
    opt, _ = build_optimizer(cfg, model)
    groups = {g["role"]: g for g in opt.param_groups}
    assert set(groups) == {"student", "teacher"}
    ids = {role: {id(p) for p in g["params"]} for role, g in groups.items()}
    assert {id(p) for p in model.adaptation.parameters()} <= ids["student"]
    assert {id(p) for p in model.teacher.parameters()} == ids["teacher"]
    assert not ids["student"] & ids["teacher"]
    assert (groups["teacher"]["lr"], groups["teacher"]["weight_decay"]) == (0.02, 5e-5)
    cfg, model, _ = _model(make_config, solver={"base_lr": 0.02},
                           lgd={"enabled": True, "optimizer": {"base_lr": 0.005, "weight_decay": 1e-3}})
    teacher = next(g for g in build_optimizer(cfg, model)[0].param_groups if g["role"] == "teacher")
    assert (teacher["lr"], teacher["weight_decay"]) == (0.005, 1e-3)  # set in the config: kept
    # the Swin-T Mask R-CNN recipe: AdamW student, SGD teacher: the teacher's lr is SGD's own default
    cfg = make_config(solver={"optimizer": "adamw", "base_lr": None}, lgd={"enabled": True})
    assert cfg.teacher_optimizer_settings()["base_lr"] == 0.01


def _param(*grad):
    p = torch.nn.Parameter(torch.zeros(len(grad)))
    p.grad = torch.tensor(grad)
    return p


def test_every_gradient_element_is_clipped_to_one_and_the_norm_per_optimizer():
    a, b = _param(3.0, -0.5, -2.0), _param(0.25)
    clip_gradients([{"params": [a], "role": "student"}, {"params": [b], "role": "teacher"}], value=1.0, norm=None)
    assert a.grad.tolist() == [1.0, -0.5, -1.0] and b.grad.tolist() == [0.25]
    # the global norm per optimizer: the student's (norm 10) is scaled to 5, the teacher's (norm 1) is left alone,
    # where one norm over both would have scaled the teacher's too
    s, t, none = _param(6.0, 8.0), _param(0.6, 0.8), torch.nn.Parameter(torch.zeros(2))
    clip_gradients([{"params": [s, none], "role": "student"}, {"params": [t], "role": "teacher"}], None, 5.0)
    torch.testing.assert_close(s.grad, torch.tensor([3.0, 4.0]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t.grad, torch.tensor([0.6, 0.8]))
    assert none.grad is None


def test_default_solver_clips_each_element_at_one(make_config):
    cfg = make_config(solver={"clip_grad_norm": None})
    assert cfg.solver.clip_grad_value == 1.0
    with pytest.raises(Exception, match="clip_grad_value: must be > 0"):
        make_config(solver={"clip_grad_value": 0})


def test_a_flipped_box_and_mask():
    image = torch.arange(2 * 3 * 5, dtype=torch.float32).view(2, 3, 5)
    masks = torch.zeros(1, 3, 5, dtype=torch.uint8)
    masks[0, 1, 0:2] = 1  # columns 0-1 of row 1: the box (0, 1, 2, 2)
    target = {"boxes": torch.tensor([[0.0, 1.0, 2.0, 2.0]]), "labels": torch.tensor([1]), "masks": masks}
    flipped, t = hflip(image, target)
    assert torch.equal(flipped[:, :, 0], image[:, :, 4])
    assert t["boxes"].tolist() == [[3.0, 1.0, 5.0, 2.0]]  # x -> W - x, the sides swapped
    assert t["masks"][0, 1].tolist() == [0, 0, 0, 1, 1] and torch.equal(t["labels"], target["labels"])
    assert target["boxes"].tolist() == [[0.0, 1.0, 2.0, 2.0]]  # the dataset's own target is untouched
    subset = FlippedSubset([(image, target), (None, {"image_id": 7})], [1, 0], [True, True])
    assert subset[0] == (None, {"image_id": 7}) and torch.equal(subset[1][0], flipped)


def _first_epoch(cfg, train):
    batches = _batches(train, cfg, 0, 1, 0, UnreadableImages("x", len(train), 1.0))
    return [next(batches) for _ in range(len(train) // cfg.solver.ims_per_batch)]


def test_training_batches_flip_about_half_the_images_the_same_way_for_a_seed(make_config):
    cfg = make_config()
    assert cfg.input.horizontal_flip
    train, _ = build_datasets(cfg)
    by_id = {t["image_id"]: (im, t) for im, t in (train[i] for i in range(len(train)))}
    epoch, again = _first_epoch(cfg, train), _first_epoch(cfg, train)
    flipped = 0
    for (images, targets), (images2, targets2) in zip(epoch, again):
        for im, t, im2, t2 in zip(images, targets, images2, targets2):
            assert torch.equal(im, im2) and torch.equal(t["boxes"], t2["boxes"])  # (seed, epoch) decide
            orig, ot = by_id[t["image_id"]]
            if not torch.equal(im, orig):
                mirrored, mt = hflip(orig, ot)
                assert torch.equal(im, mirrored) and torch.equal(t["boxes"], mt["boxes"])
                flipped += 1
    assert 0 < flipped < len(train)
    plain = make_config(input={"horizontal_flip": False})
    for images, targets in _first_epoch(plain, train):
        assert all(torch.equal(im, by_id[t["image_id"]][0]) for im, t in zip(images, targets))


@pytest.mark.parametrize("backbone,context", [("resnet50", False), ("resnet18", False), ("resnet101", True),
                                              ("resnet101_dcn", True), ("resnext101_32x8d_dcn", True)])
def test_fcos_context_object_follows_the_released_configs(make_config, backbone, context):
    cfg = make_config(detector="fcos", backbone=backbone, lgd={"enabled": True})
    assert cfg.use_context is context
    assert make_config(detector="retinanet", backbone=backbone).use_context  # RetinaNet: always
    assert make_config(detector="fcos", backbone=backbone, lgd={"use_context": not context}).use_context is not context
