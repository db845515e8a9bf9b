"""train_loop(config, report): one trial's training and evaluation, on a laptop or inside a Ray Train worker.

The engine knows no Ray and no MLflow: it calls ``report(metrics, checkpoint_dir)`` and the caller decides
where that goes. Under torch.distributed it wraps the model in DDP and shards the data.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import resource
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lgd.config import TrainConfig
from lgd.data.coco import CocoDetection, DataError, UnreadableImages, collate_checked
from lgd.data.flip import FlippedSubset
from lgd.data.formats import load_splits
from lgd.detectors import build_detector
from lgd.distiller import Distiller, schedule_phase
from lgd.evaluation import evaluate

log = logging.getLogger("lgd")
Report = Callable[[dict, Optional[str]], None]
CHECKPOINT_FILE = "checkpoint.pt"


class NonFiniteLossError(FloatingPointError):
    """Training diverged: a loss term became NaN or infinite."""

    def __init__(self, iteration: int, terms: dict[str, float]):
        self.iteration, self.terms = iteration, terms
        bad = {k: v for k, v in terms.items() if not math.isfinite(v)}
        super().__init__(f"non-finite loss at iteration {iteration}: {bad}")


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for but no CUDA device is visible")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return torch.device("cuda", local % torch.cuda.device_count())


def build_datasets(cfg: TrainConfig) -> tuple[CocoDetection, CocoDetection]:
    """The train/val splits by ``data.format`` (lgd.data.formats: each reader checks its split first)."""
    return load_splits(cfg.data, with_masks=cfg.detector == "mask_rcnn")


def build_model(cfg: TrainConfig, num_classes: int) -> Distiller:
    adapter = build_detector(cfg.detector, cfg.backbone, num_classes + 1, cfg.input.train_sizes(), cfg.input.max_size,
                             cfg.weights, cfg.fpn_channels, cfg.detector_options, backend=cfg.backend)
    model = Distiller(adapter, cfg, num_classes)
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


class JointOptimizer(torch.optim.Optimizer):
    """Several optimizers stepped as one (the student's AdamW and the teacher's SGD, say): their param groups
    are this optimizer's (shared dicts, so the LR schedule and the grad scaler reach every one)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers
        super().__init__([g for o in optimizers for g in o.param_groups], {})

    @torch.no_grad()
    def step(self, closure=None):
        for o in self.optimizers:
            o.step()

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        for o, s in zip(self.optimizers, state_dict["optimizers"]):
            o.load_state_dict(s)


def _torch_optimizer(kind: str, groups: list[dict]) -> torch.optim.Optimizer:
    """foreach: one kernel per op for all parameters (SGD, and AdamW's betas (momentum, 0.999), eps 1e-8)."""
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], foreach=True)
    for g in groups:
        g["betas"] = (g.pop("momentum"), 0.999)
    return torch.optim.AdamW(groups, lr=groups[0]["lr"], foreach=True)


def build_optimizer(cfg: TrainConfig, model: Distiller):
    """SGD (§4.1) or AdamW (``solver.optimizer``; the teacher's ``lgd.optimizer.optimizer``): the student's
    optimizer holds the student detector and the adaptation head, the teacher's the implicit teacher (the
    reference's two optimizers; as param groups of one torch optimizer where both are of one kind, each group
    tagged ``role`` student / teacher); warm-up + step decay for both. Weight decay on every parameter."""
    teacher = {id(p) for p in model.teacher_parameters()}
    student = [p for p in model.parameters() if p.requires_grad and id(p) not in teacher]
    s = cfg.solver
    sections = [("student", student, s.settings())]
    if teacher:
        sections.append(("teacher", model.teacher_parameters(), cfg.teacher_optimizer_settings()))
    by_kind: dict[str, list[dict]] = {}
    for role, params, o in sections:
        by_kind.setdefault(o["optimizer"], []).append(
            {"params": params, "lr": o["base_lr"], "momentum": o["momentum"], "weight_decay": o["weight_decay"],
             "role": role})
    opts = [_torch_optimizer(kind, groups) for kind, groups in by_kind.items()]
    opt = opts[0] if len(opts) == 1 else JointOptimizer(opts)
    warmup, milestones = s.scaled(s.warmup_iters), s.milestones

    def factor(it: int) -> float:
        f = s.gamma ** sum(it >= m for m in milestones)
        if it < warmup:
            a = it / warmup
            f *= s.warmup_factor * (1 - a) + a
        return f

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def loss_values(losses: dict[str, torch.Tensor], total: torch.Tensor) -> dict[str, float]:
    """Every loss term and the total as Python floats, in one device-to-host transfer."""
    values = torch.stack([v.detach().float() for v in (*losses.values(), total)]).tolist()
    return dict(zip([*losses, "total_loss"], values))


def clip_gradients(groups: list[dict], value: float | None, norm: float | None) -> None:
    """The reference's clipping, each optimizer on its own: every gradient element to ±``value`` (detectron2's
    CLIP_TYPE "value"), then the global norm of each role's gradients (student, teacher) to ``norm``."""
    by_role: dict[str, list[torch.Tensor]] = {}
    for g in groups:
        by_role.setdefault(g.get("role", "student"), []).extend(p for p in g["params"] if p.grad is not None)
    for params in by_role.values():
        if value is not None:
            torch.nn.utils.clip_grad_value_(params, value, foreach=True)
        if norm is not None:
            torch.nn.utils.clip_grad_norm_(params, norm, foreach=True)


class TrainingStep:
    """One optimisation step: forward under ``solver.amp`` autocast, one finite check (the step's only host
    sync), backward (grad-scaled for fp16), the LGD schedule's trunk freeze, clipping per optimizer, update."""

    def __init__(self, model: Distiller, net: torch.nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig,
                 device: torch.device):
        self.model, self.net, self.opt, self.cfg, self.device = model, net, opt, cfg, device
        self.amp_dtype = AMP_DTYPES[cfg.solver.amp]
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.solver.amp == "fp16")
        self.frozen = model.frozen_parameters()

    def forward(self, images, targets, it: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, bool]:
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            losses = self.net(images, targets, it)
            total = self.model.total_loss(losses)
        return losses, total, bool(torch.isfinite(total.detach()))

    def backward_and_update(self, total: torch.Tensor, it: int) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.cfg.lgd.enabled and schedule_phase(self.cfg, it).backbone_frozen:
            for p in self.frozen:
                p.grad = None
        s = self.cfg.solver
        if s.clip_grad_value is not None or s.clip_grad_norm is not None:
            self.scaler.unscale_(self.opt)
            clip_gradients(self.opt.param_groups, s.clip_grad_value, s.clip_grad_norm)
        self.scaler.step(self.opt)
        self.scaler.update()

    def __call__(self, images, targets, it: int) -> dict[str, torch.Tensor]:
        """The whole step (benchmarks): raises NonFiniteLossError like the training loop."""
        losses, total, finite = self.forward(images, targets, it)
        if not finite:
            raise NonFiniteLossError(it + 1, loss_values(losses, total))
        self.backward_and_update(total, it)
        return losses


def _batches(dataset, cfg: TrainConfig, rank: int, world: int, start_iter: int,
             unreadable: UnreadableImages, on_gpu: bool = False) -> Iterator:
    """Endless shuffled batches; each rank takes its shard; the order and the random horizontal flips
    (``input.horizontal_flip``, p 0.5) depend on (seed, epoch) only. Images that do not decode are left out of
    their batch and counted in ``unreadable``."""
    per_rank = max(1, cfg.solver.ims_per_batch // world)
    workers = cfg.data.loader_workers if cfg.data.loader_workers is not None else (4 if on_gpu else 0)
    epoch = start_iter * per_rank * world // max(1, len(dataset))
    while True:
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        order = torch.randperm(len(dataset), generator=g).tolist()
        flips = (torch.rand(len(dataset), generator=g) < 0.5).tolist() if cfg.input.horizontal_flip else None
        order = order[rank::world]
        subset = (FlippedSubset(dataset, order, flips[rank::world]) if flips is not None
                  else torch.utils.data.Subset(dataset, order))
        loader = torch.utils.data.DataLoader(subset, batch_size=per_rank,
                                             shuffle=False, drop_last=len(order) >= per_rank,
                                             collate_fn=collate_checked, num_workers=workers, pin_memory=on_gpu)
        yielded = False
        for images, targets, skipped in loader:
            if skipped:
                unreadable.add(skipped)
            if images:
                yielded = True
                yield images, targets
        if not yielded:  # not one image of this shard decodes
            raise unreadable.error()
        epoch += 1


def _to(device, images, targets):
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
               for t in targets]
    return images, targets


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def save_checkpoint(path: Path, model: Distiller, opt, sched, iteration: int, history: list[dict]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (CHECKPOINT_FILE + ".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "iteration": iteration, "history": history}, tmp)
    os.replace(tmp, path / CHECKPOINT_FILE)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    return torch.load(path, map_location="cpu", weights_only=True)


def train_loop(cfg: TrainConfig, report: Optional[Report] = None, resume_from: Optional[str] = None,
               device: Optional[torch.device] = None) -> dict:
    """Train and evaluate one trial; return the final metrics (also written to ``output_dir/metrics.json``).

    ``report(metrics, checkpoint_dir)`` is called every ``log_period`` iterations (checkpoint_dir None), at
    every checkpoint, and once at the end with the evaluation; on every rank, at the same iterations.
    A non-finite loss raises :class:`NonFiniteLossError` naming the iteration and the offending terms.
    """
    report = report or (lambda metrics, checkpoint=None: None)
    rank, world = _rank_world()
    device = device or resolve_device(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    train_ds, val_ds = build_datasets(cfg)
    model = build_model(cfg, train_ds.num_classes).to(device)
    opt, sched = build_optimizer(cfg, model)
    start, history = 0, []
    if resume_from:
        state = load_checkpoint(resume_from)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, history = int(state["iteration"]), list(state["history"])
        log.info("resumed from %s at iteration %d", resume_from, start)
    net = model
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=cfg.lgd.enabled)

    max_iter = cfg.solver.max_iter
    ckpt_period = max(1, cfg.solver.scaled(cfg.solver.checkpoint_period))
    data_stats = {f"data/{k}": v for k, v in train_ds.stats.as_dict().items()}
    data_stats.update({f"data/val_{k}": v for k, v in val_ds.stats.as_dict().items()})
    data_stats["resumed_from_iteration"] = start  # > 0 when this attempt continued from a checkpoint
    if rank == 0:
        log.info("training %s/%s (%s) for %d iterations on %s x%d; data: %s", cfg.detector, cfg.backbone,
                 "lgd" if cfg.lgd.enabled else "baseline", max_iter, device, world, train_ds.stats.as_dict())
    unreadable = UnreadableImages(train_ds.ann_file, math.ceil(len(train_ds) / world),
                                  cfg.data.max_unreadable_fraction)
    data_stats["data/unreadable_images"] = 0
    for row in history:  # rows logged before the checkpoint: a recorder that missed them (driver lost) gets them
        report({**row, **data_stats}, None)
    batches = _batches(train_ds, cfg, rank, world, start, unreadable, on_gpu=device.type == "cuda")
    step_fn = TrainingStep(model, net, opt, cfg, device)
    model.train()
    t0, t_window, it_window = time.time(), time.time(), 0
    for it in range(start, max_iter):
        images, targets = _to(device, *next(batches))
        losses, total, finite = step_fn.forward(images, targets, it)
        data_ok = not unreadable.exceeded
        if world > 1:  # every rank stops together, none waits forever in the next all-reduce
            flag = torch.tensor([1.0 if finite else 0.0, 1.0 if data_ok else 0.0], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite, data_ok = bool(flag[0].item()), bool(flag[1].item())
        if not data_ok:
            raise unreadable.error() if unreadable.exceeded else DataError(
                f"{unreadable.source}: images that do not decode exceed data.max_unreadable_fraction on another rank")
        if not finite:
            raise NonFiniteLossError(it + 1, loss_values(losses, total))
        step_fn.backward_and_update(total, it)
        sched.step()
        it_window += 1
        step = it + 1
        is_ckpt = step % ckpt_period == 0 or step == max_iter
        if step % cfg.log_period == 0 or is_ckpt:
            now = time.time()
            terms = loss_values(losses, total)  # one transfer for every term, on logged iterations only
            total_value = terms.pop("total_loss")
            student = sum(v for k, v in terms.items() if not k.endswith(".tea") and k != "distill")
            row = {"iteration": step, "total_loss": total_value, "student_loss": student, **terms,
                   "lr": opt.param_groups[0]["lr"], "time/iter_s": (now - t_window) / max(1, it_window)}
            t_window, it_window = now, 0
            data_stats["data/unreadable_images"] = unreadable.count
            history.append(row)
            if rank == 0:
                log.info("iter %d/%d  loss %.4f  %s", step, max_iter, row["total_loss"],
                         "  ".join(f"{k} {v:.4f}" for k, v in terms.items()))
            ckpt = None
            if is_ckpt:
                ckpt = str(out / "checkpoints" / f"iter_{step:07d}")
                if rank == 0:
                    save_checkpoint(Path(ckpt), model, opt, sched, step, history)
            report({**row, **data_stats}, ckpt if rank == 0 else None)

    train_time = time.time() - t0
    data_stats["data/unreadable_images"] = unreadable.count
    metrics: dict = {"iteration": max_iter, "train_time_s": train_time,
                     "peak_memory_mb": peak_memory_mb(device), **data_stats}
    if rank == 0:
        model.eval()
        with_masks = cfg.detector == "mask_rcnn"
        metrics.update(evaluate(model.predict, val_ds, device,
                                max_images=cfg.max_eval_images, with_masks=with_masks,
                                max_unreadable_fraction=cfg.data.max_unreadable_fraction))
        if cfg.eval_teacher:
            tea = evaluate(model.predict_teacher, val_ds, device, max_images=cfg.max_eval_images,
                           with_masks=with_masks, max_unreadable_fraction=cfg.data.max_unreadable_fraction)
            metrics.update({f"teacher/{k}": v for k, v in tea.items()})
        log.info("evaluation: %s", {k: round(v, 2) for k, v in metrics.items()  # the means, not per class
                                    if "/" in k and k.rsplit("/", 1)[1].startswith(("AP", "mMR", "recall"))})
        (out / "metrics.json").write_text(json.dumps({"final": metrics, "history": history}, indent=1))
        torch.save(model.export().state_dict(), out / "model_final.pt")
    metrics["finished"] = 1  # the last report of a trial: carries the evaluation
    report(metrics, None)
    return metrics
