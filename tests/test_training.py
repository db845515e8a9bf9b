"""Distiller on the detectors (torchvision's four, ATSS, POTO; ResNet and Swin-T backbones): gradients of Eq. 5-7,
the schedule, training and resuming."""
import json
import math

import pytest
import torch
import torchvision

from lgd.data.coco import collate
from lgd.distiller import schedule_phase
from lgd.engine import (NonFiniteLossError, TrainingStep, build_datasets, build_model, build_optimizer,
                        load_checkpoint, train_loop)

DETECTORS = ["retinanet", "fcos", "faster_rcnn", "mask_rcnn", "atss", "poto"]
RCNN_OPTS = {"rpn_post_nms_top_n_train": 100, "box_batch_size_per_image": 32}


def _setup(make_config, detector, lgd=True, config=None, **lgd_over):
    opts = RCNN_OPTS if "rcnn" in detector else {}
    cfg = make_config(detector=detector, detector_options=opts,
                      lgd={"enabled": lgd, "segm_masks": detector == "mask_rcnn" and lgd, **lgd_over}, **(config or {}))
    train, _ = build_datasets(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, train.num_classes)
    model.train()
    images, targets = collate([train[i] for i in range(2)])
    return cfg, model, images, targets


def _trains_on_one_batch(cfg, model, images, targets, lgd, iters=8):
    """The same batch again and again: every term finite, the loss falls; the export is the plain detector."""
    opt, sched = build_optimizer(cfg, model)
    totals = []
    for it in range(iters):
        losses = model(images, targets, iteration=5)
        total = model.total_loss(losses)
        assert all(math.isfinite(v.item()) for v in losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(total.item())
    k = max(1, (iters + 1) // 3)  # 8 iterations: the first and last 3
    assert sum(totals[-k:]) / k < sum(totals[:k]) / k, totals
    if lgd:
        assert "distill" in losses and any(k.endswith(".tea") for k in losses)
    exported = model.export()
    # a torchvision detector (ATSS and POTO: subclasses of its FCOS)
    assert any(c.__module__.startswith("torchvision.models.detection") for c in type(exported).__mro__)
    assert not any(k.startswith(("teacher", "adaptation")) for k in exported.state_dict())
    return opt, losses


@pytest.mark.parametrize("detector", DETECTORS)
@pytest.mark.parametrize("lgd", [False, True], ids=["baseline", "lgd"])
def test_every_detector_trains_with_finite_decreasing_loss(make_config, detector, lgd):
    # POTO at 0.01: on one repeated 64 px batch its one-to-one (and mean + std auxiliary) assignment jumps between
    # points after ~5 steps and the loss with it; at 0.005 it falls steadily
    solver = {"base_lr": 0.005} if detector == "poto" else {}
    cfg, model, images, targets = _setup(make_config, detector, lgd, config={"solver": solver})
    _trains_on_one_batch(cfg, model, images, targets, lgd)


ADAMW = {"optimizer": "adamw"}  # the Swin-T students' recipe: lr 1e-4, weight decay 0.05 by default


@pytest.mark.parametrize("detector,lgd,teacher", [("retinanet", False, ADAMW), ("retinanet", True, ADAMW),
                                                  ("mask_rcnn", True, {"optimizer": "sgd", "base_lr": 0.02})],
                         ids=["retinanet-baseline", "retinanet-lgd", "mask_rcnn-lgd-sgd_teacher"])
def test_swin_t_students_train_with_adamw(make_config, detector, lgd, teacher):
    """Table 13's students: Swin-T-FPN, AdamW (the Mask R-CNN's teacher modules keep SGD: one joint step)."""
    cfg, model, images, targets = _setup(make_config, detector, lgd, optimizer=teacher,
                                         config={"backbone": "swin_t", "solver": {**ADAMW, "base_lr": None}})
    assert cfg.solver.settings()["base_lr"] == 1e-4 and cfg.solver.settings()["weight_decay"] == 0.05
    opt, _ = _trains_on_one_batch(cfg, model, images, targets, lgd, iters=4)
    kinds = [type(o).__name__ for o in getattr(opt, "optimizers", [opt])]
    assert kinds == (["AdamW", "SGD"] if teacher["optimizer"] == "sgd" else ["AdamW"])
    assert [g["lr"] for g in opt.param_groups] == [1e-4] + ([teacher.get("base_lr", 1e-4)] if lgd else [])
    # the engine's step (grad clipping, grad scaler) drives the AdamW or joint optimizer too
    params = [p for p in model.adapter.heads().parameters()]
    before = [p.detach().clone() for p in params]
    TrainingStep(model, model, opt, cfg, torch.device("cpu"))(images, targets, 5)
    assert any(not torch.equal(b, p) for b, p in zip(before, params))
    state = opt.state_dict()  # a checkpoint of the joint optimizer restores every part
    again, _ = build_optimizer(cfg, model)
    again.load_state_dict(state)
    first = next(p for p in model.detector.backbone.parameters() if p.requires_grad)
    inner = getattr(again, "optimizers", [again])[0]
    torch.testing.assert_close(inner.state[first]["exp_avg"], getattr(opt, "optimizers", [opt])[0].state[first]["exp_avg"])


def _grads(params):
    return [p.grad for p in params]


def test_distillation_gives_no_gradient_to_the_teacher_and_none_to_the_student_before_start(make_config):
    cfg, model, images, targets = _setup(make_config, "retinanet")
    start = cfg.solver.scaled(cfg.lgd.distill_start)
    assert schedule_phase(cfg, start - 1).student_detached and not schedule_phase(cfg, start).student_detached
    teacher = [p for p in model.teacher.parameters()]
    backbone = [p for p in model.detector.backbone.parameters() if p.requires_grad]
    adaptation = list(model.adaptation.parameters())

    model.zero_grad()
    model(images, targets, iteration=start - 1)["distill"].backward()
    assert all(g is None or g.abs().sum() == 0 for g in _grads(teacher))
    assert all(g is None or g.abs().sum() == 0 for g in _grads(backbone))
    assert all(g is not None and g.abs().sum() > 0 for g in _grads(adaptation))

    model.zero_grad()
    model(images, targets, iteration=start)["distill"].backward()
    assert all(g is None or g.abs().sum() == 0 for g in _grads(teacher))
    assert any(g is not None and g.abs().sum() > 0 for g in _grads(backbone))


def test_teacher_detection_losses_reach_every_teacher_module(make_config):
    cfg, model, images, targets = _setup(make_config, "faster_rcnn")
    losses = model(images, targets, iteration=0)
    model.zero_grad()
    sum(v for k, v in losses.items() if k.endswith(".tea")).backward()
    for name in ("label_encoder", "appearance_encoder", "relation_adapter", "knowledge_mapper"):
        mod = getattr(model.teacher, name)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in mod.parameters()), name
    # Faster R-CNN detaches the appearance features: teacher losses leave the backbone alone
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.detector.backbone.parameters())


def test_unshared_head_and_stop_before_end(make_config):
    """After distillation stops the reference keeps Eq. 5 with the student detached: it trains the adaptation
    head only, while the teacher still learns from its own detection losses."""
    cfg, model, images, targets = _setup(make_config, "retinanet", shared_head=False, distill_stop_before_end=10000,
                                         distill_start=0)
    assert model.teacher_heads is not None
    stop = cfg.solver.scaled(10000)
    assert not schedule_phase(cfg, cfg.solver.max_iter - stop - 1).student_detached
    assert schedule_phase(cfg, cfg.solver.max_iter - stop).student_detached
    losses = model(images, targets, iteration=cfg.solver.max_iter - 1)
    model.zero_grad()
    losses["distill"].backward(retain_graph=True)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.detector.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.adaptation.parameters())
    model.zero_grad()
    sum(v for k, v in losses.items() if k.endswith(".tea")).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.detector.head.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.teacher_heads.parameters())


@pytest.mark.parametrize("variant", [{"label_encoder": "mlp"}, {"label_encoder": "transformer"},
                                     {"label_norm": "batchnorm"}, {"appearance_pooling": "roialign"},
                                     {"attention_query": "label"}, {"mapper_inputs": "context"},
                                     {"mapper_inputs": "objects"}])
def test_ablation_variants_run(make_config, variant):
    cfg, model, images, targets = _setup(make_config, "retinanet", **variant)
    losses = model(images, targets, iteration=5)
    model.total_loss(losses).backward()
    assert all(math.isfinite(v.item()) for v in losses.values())


def test_train_loop_end_to_end_reports_checkpoints_and_resumes(make_config, tmp_path):
    cfg = make_config(lgd={"enabled": True, "freeze_backbone_iters": 30000}, output_dir=str(tmp_path / "a"),
                      eval_teacher=True, solver={"checkpoint_period": 40000})
    reports = []
    metrics = train_loop(cfg, lambda m, c=None: reports.append((m, c)))
    assert cfg.solver.max_iter == 9
    steps = [m["iteration"] for m, _ in reports if "total_loss" in m]
    assert steps == [2, 4, 6, 8, 9]
    ckpts = [c for _, c in reports if c]
    assert [c[-2:] for c in ckpts] == ["04", "08", "09"]  # every 4 iterations and the last
    assert reports[-1][0]["finished"] == 1 and "bbox/AP" in metrics and "teacher/bbox/AP" in metrics
    saved = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert saved["final"]["bbox/AP"] == metrics["bbox/AP"] and saved["history"][-1]["iteration"] == 9
    state = load_checkpoint(ckpts[0])
    assert state["iteration"] == 4
    plain = torchvision.models.detection.RetinaNet.__name__
    assert type(build_model(cfg, 3).export()).__name__ == plain
    # resume from iteration 4: only the remaining iterations run
    cfg2 = make_config(lgd={"enabled": True, "freeze_backbone_iters": 30000}, output_dir=str(tmp_path / "b"),
                       solver={"checkpoint_period": 40000})
    again = []
    train_loop(cfg2, lambda m, c=None: again.append(m), resume_from=ckpts[0])
    # the rows of the checkpoint's history are reported again first (for a recorder that missed them), then 6..9
    assert [m["iteration"] for m in again if "total_loss" in m] == [2, 4, 6, 8, 9]
    assert again[-1]["resumed_from_iteration"] == 4


def test_frozen_trunk_does_not_move_while_the_fpn_trains(make_config, tmp_path):
    """The reference freezes the trunk (``student.raw_backbone``), not the FPN and P6/P7."""
    cfg = make_config(lgd={"enabled": True, "freeze_backbone_iters": 100000}, output_dir=str(tmp_path),
                      max_eval_images=1)
    train, _ = build_datasets(cfg)
    torch.manual_seed(0)
    before = {k: v.clone() for k, v in build_model(cfg, train.num_classes).detector.backbone.state_dict().items()}
    train_loop(cfg)
    state = torch.load(tmp_path / "model_final.pt", weights_only=True)
    moved = [k for k, v in before.items() if v.is_floating_point() and "running" not in k
             and not torch.equal(v, state["backbone." + k])]
    assert moved and all(k.startswith("fpn.") for k in moved), moved


def test_non_finite_loss_names_iteration_and_terms(make_config, tmp_path):
    cfg = make_config(output_dir=str(tmp_path), solver={"base_lr": 1e12, "clip_grad_norm": None})
    with pytest.raises(NonFiniteLossError) as e:
        train_loop(cfg)
    assert e.value.iteration >= 1 and any(not math.isfinite(v) for v in e.value.terms.values())
    assert f"iteration {e.value.iteration}" in str(e.value)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_and_channels_last_train_lgd(make_config, tmp_path, amp):
    # 96 px, not 64: at 64 px P6 is 1x1 and the stride-2 P7 conv's bf16 weight gradient on a 1x1 CPU input is
    # garbage in torch 2.14 (oneDNN; reproduced with aten.convolution_backward alone), see the README's speed knobs
    cfg = make_config(lgd={"enabled": True, "distill_start": 0}, output_dir=str(tmp_path), max_eval_images=2,
                      solver={"amp": amp}, channels_last=True, input={"min_size": 96, "max_size": 96})
    train, _ = build_datasets(cfg)
    model = build_model(cfg, train.num_classes)
    assert model.detector.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    rows = []
    metrics = train_loop(cfg, lambda m, c=None: rows.append(m) if "total_loss" in m else None)
    assert rows and all(math.isfinite(r["total_loss"]) and math.isfinite(r["distill"]) for r in rows)
    assert "bbox/AP" in metrics


def test_fp16_non_finite_loss_still_names_the_term(make_config, tmp_path):
    cfg = make_config(output_dir=str(tmp_path), solver={"base_lr": 1e12, "clip_grad_norm": None, "amp": "fp16"})
    with pytest.raises(NonFiniteLossError) as e:
        train_loop(cfg)
    bad = [k for k, v in e.value.terms.items() if not math.isfinite(v)]
    assert bad and set(bad) <= {"classification", "bbox_regression", "total_loss"}


def test_teacher_evaluates_images_without_objects(make_config):
    """eval_teacher on a validation image with no box, without the context object (the R-CNN default)."""
    cfg, model, images, targets = _setup(make_config, "faster_rcnn")
    model.eval()
    targets[1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    dets = model.predict_teacher(images, targets)
    assert len(dets) == len(images) and all(torch.isfinite(d["boxes"]).all() for d in dets)


def test_swin_t_weights_from_a_state_dict_file_or_a_clear_error(tmp_path):
    from lgd.backbones import build_backbone

    swin = torchvision.models.swin_t()
    torch.nn.init.constant_(swin.features[0][0].weight, 0.5)
    torch.save({k: v for k, v in swin.state_dict().items() if not k.startswith("head.")}, tmp_path / "swin.pth")
    backbone = build_backbone("swin_t", str(tmp_path / "swin.pth"), "retinanet", 32)
    assert torch.equal(backbone.body[0][0].weight, swin.features[0][0].weight)
    assert all(p.requires_grad for p in backbone.parameters())  # nothing frozen, as the Swin detectors
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match=r"r18.pth: not a swin_t state_dict"):
        build_backbone("swin_t", str(tmp_path / "r18.pth"), "retinanet", 32)
    with pytest.raises(ValueError, match="neither an existing file nor one of"):
        build_backbone("swin_t", "IMAGENET_V9", "retinanet", 32)
