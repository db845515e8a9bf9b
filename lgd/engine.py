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
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lgd.config import TrainConfig
from lgd.data.coco import CocoDetection, collate
from lgd.data.synthetic import ensure_synthetic
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
    d = cfg.data
    if d.synthetic is not None:
        s = d.synthetic
        cache = os.environ.get("LGD_DATA_CACHE", os.path.join(tempfile.gettempdir(), "lgd-synthetic"))
        paths = ensure_synthetic(cache, s.num_train, s.num_val, s.image_size, s.num_classes, s.max_objects, s.seed)
    else:
        paths = {"train_images": d.train_images, "train_annotations": d.train_annotations,
                 "val_images": d.val_images, "val_annotations": d.val_annotations}
    masks = cfg.detector == "mask_rcnn"
    train = CocoDetection(paths["train_images"], paths["train_annotations"], train=True, with_masks=masks,
                          max_objects=d.max_objects_per_image)
    val = CocoDetection(paths["val_images"], paths["val_annotations"], train=False, with_masks=masks,
                        max_objects=d.max_objects_per_image)
    if val.cat_to_label != train.cat_to_label:
        raise ValueError(f"{paths['val_annotations']}: categories differ from {paths['train_annotations']}")
    return train, val


def build_model(cfg: TrainConfig, num_classes: int) -> Distiller:
    adapter = build_detector(cfg.detector, cfg.backbone, num_classes + 1, cfg.input.train_sizes(), cfg.input.max_size,
                             cfg.weights, cfg.fpn_channels, cfg.detector_options)
    return Distiller(adapter, cfg, num_classes)


def build_optimizer(cfg: TrainConfig, model: Distiller):
    """SGD (§4.1) with the teacher modules in their own group; warm-up + step decay for both."""
    teacher = {id(p) for p in model.teacher_parameters()}
    student = [p for p in model.parameters() if p.requires_grad and id(p) not in teacher]
    s, t = cfg.solver, cfg.lgd.optimizer
    groups = [{"params": student, "lr": s.base_lr, "momentum": s.momentum, "weight_decay": s.weight_decay}]
    if teacher:
        groups.append({"params": model.teacher_parameters(), "lr": t.base_lr, "momentum": t.momentum,
                       "weight_decay": t.weight_decay})
    opt = torch.optim.SGD(groups, lr=s.base_lr)
    warmup, milestones = s.scaled(s.warmup_iters), s.milestones

    def factor(it: int) -> float:
        f = s.gamma ** sum(it >= m for m in milestones)
        if it < warmup:
            a = it / warmup
            f *= s.warmup_factor * (1 - a) + a
        return f

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _batches(dataset, cfg: TrainConfig, rank: int, world: int, start_iter: int) -> Iterator:
    """Endless shuffled batches; each rank takes its shard; the order depends on (seed, epoch) only."""
    per_rank = max(1, cfg.solver.ims_per_batch // world)
    epoch = start_iter * per_rank * world // max(1, len(dataset))
    while True:
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        order = torch.randperm(len(dataset), generator=g).tolist()
        order = order[rank::world]
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, order), batch_size=per_rank,
                                             shuffle=False, drop_last=len(order) >= per_rank,
                                             collate_fn=collate, num_workers=cfg.data.loader_workers)
        yield from loader
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
    data_stats["resumed_from_iteration"] = start  # > 0 when this attempt continued from a checkpoint
    if rank == 0:
        log.info("training %s/%s (%s) for %d iterations on %s x%d; data: %s", cfg.detector, cfg.backbone,
                 "lgd" if cfg.lgd.enabled else "baseline", max_iter, device, world, train_ds.stats.as_dict())
    for row in history:  # rows logged before the checkpoint: a recorder that missed them (driver lost) gets them
        report({**row, **data_stats}, None)
    batches = _batches(train_ds, cfg, rank, world, start)
    frozen = model.backbone_parameters()
    model.train()
    t0, t_window, it_window = time.time(), time.time(), 0
    for it in range(start, max_iter):
        images, targets = _to(device, *next(batches))
        losses = net(images, targets, it)
        total = model.total_loss(losses)
        terms = {k: float(v.detach()) for k, v in losses.items()}
        finite = math.isfinite(float(total.detach()))
        if world > 1:  # every rank stops together, none waits forever in the next all-reduce
            flag = torch.tensor([1.0 if finite else 0.0], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = bool(flag.item())
        if not finite:
            terms["total_loss"] = float(total.detach())
            raise NonFiniteLossError(it + 1, terms)
        opt.zero_grad(set_to_none=True)
        total.backward()
        if cfg.lgd.enabled and schedule_phase(cfg, it).backbone_frozen:
            for p in frozen:
                p.grad = None
        if cfg.solver.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.solver.clip_grad_norm)
        opt.step()
        sched.step()
        it_window += 1
        step = it + 1
        is_ckpt = step % ckpt_period == 0 or step == max_iter
        if step % cfg.log_period == 0 or is_ckpt:
            now = time.time()
            student = sum(v for k, v in terms.items() if not k.endswith(".tea") and k != "distill")
            row = {"iteration": step, "total_loss": float(total.detach()), "student_loss": student, **terms,
                   "lr": opt.param_groups[0]["lr"], "time/iter_s": (now - t_window) / max(1, it_window)}
            t_window, it_window = now, 0
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
    metrics: dict = {"iteration": max_iter, "train_time_s": train_time,
                     "peak_memory_mb": peak_memory_mb(device), **data_stats}
    if rank == 0:
        model.eval()
        with_masks = cfg.detector == "mask_rcnn"
        metrics.update(evaluate(lambda ims, tg: model.export()(ims), val_ds, device,
                                max_images=cfg.max_eval_images, with_masks=with_masks))
        if cfg.eval_teacher:
            tea = evaluate(model.predict_teacher, val_ds, device, max_images=cfg.max_eval_images,
                           with_masks=with_masks)
            metrics.update({f"teacher/{k}": v for k, v in tea.items()})
        log.info("evaluation: %s", {k: round(v, 2) for k, v in metrics.items() if "/AP" in k})
        (out / "metrics.json").write_text(json.dumps({"final": metrics, "history": history}, indent=1))
        torch.save(model.export().state_dict(), out / "model_final.pt")
    metrics["finished"] = 1  # the last report of a trial: carries the evaluation
    report(metrics, None)
    return metrics
