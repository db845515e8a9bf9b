"""TrialSpec -> a Ray Tune function trainable that fits a Ray Train TorchTrainer (train_loop in every worker),
and the driver-side Tune callback that records every trial in MLflow."""
from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time

import pyarrow.fs
import ray.train
import yaml
from ray import tune
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.result import AUTO_RESULT_KEYS

from lgd.config import TrainConfig
from lgd.data.coco import DataError
from lgd.engine import CHECKPOINT_FILE, NonFiniteLossError, train_loop
from lgd.typed import build
from orchestration.grid import TrialSpec
from orchestration.tracking import Tracker

log = logging.getLogger("lgd.trial")
_SKIP = set(AUTO_RESULT_KEYS) | {"done", "trial_id", "experiment_id", "experiment_tag", "checkpoint_path",
                                  "should_checkpoint", "diverged_terms", "fatal_error"}


def worker_loop(loop_config: dict) -> None:
    """Runs in every Ray Train worker: train_loop with reports and checkpoints through ray.train."""
    cfg: TrainConfig = build(TrainConfig, loop_config["config"])
    ctx = ray.train.get_context()
    cfg.output_dir = tempfile.mkdtemp(prefix=f"lgd-{loop_config['digest']}-r{ctx.get_world_rank()}-")
    cfg.threads = loop_config["threads"]
    device = ray.train.torch.get_device() if loop_config["use_gpu"] else None

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        ckpt = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)

    checkpoint = ray.train.get_checkpoint() or _latest_checkpoint(loop_config["storage"], loop_config["digest"])
    with (checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None)) as resume:
        try:
            train_loop(cfg, report, resume_from=resume, device=device)
        except NonFiniteLossError as e:  # final: retrying from a checkpoint would diverge again
            ray.train.report({"diverged": 1, "iteration": e.iteration, "diverged_terms": json.dumps(e.terms)})
        except DataError as e:
            ray.train.report({"fatal_error": str(e)})


def _latest_checkpoint(storage: str, digest: str) -> Checkpoint | None:
    """The newest complete checkpoint of this trial in its storage folder, found by listing it.

    Ray Train hands a restarted worker group its latest checkpoint; this also covers a new trainer after the
    driver was lost (and restarts where Ray's hand-over came back empty).
    """
    fs, root = pyarrow.fs.FileSystem.from_uri(storage) if "://" in storage else (pyarrow.fs.LocalFileSystem(), storage)
    base = f"{root.rstrip('/')}/trial-{digest}"
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(base, allow_not_found=True))
    except OSError:
        return None
    names = sorted((i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory
                    and i.base_name.startswith("checkpoint_")), reverse=True)
    for name in names:  # names carry a sortable timestamp
        if fs.get_file_info(f"{base}/{name}/{CHECKPOINT_FILE}").type == pyarrow.fs.FileType.File:
            return Checkpoint(f"{base}/{name}", filesystem=fs)
    return None


def run_trial(config: dict) -> None:
    """The Tune function trainable of one trial: build and fit its TorchTrainer."""
    spec = TrialSpec.from_dict(config["trial"])
    res = config["resources"]
    per_worker = {"CPU": res["cpus_per_worker"]}
    if res["use_gpu"]:
        per_worker["GPU"] = res["gpus_per_worker"]
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"config": spec.config, "digest": spec.digest, "use_gpu": res["use_gpu"],
                           "storage": config["storage"],
                           "threads": max(1, int(res["cpus_per_worker"]))},
        scaling_config=ScalingConfig(num_workers=res["num_workers"], use_gpu=res["use_gpu"],
                                     resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            name=f"trial-{spec.digest}",  # the same name finds the same checkpoints after a restart
            storage_path=config["storage"],
            failure_config=FailureConfig(max_failures=config["max_failures"]),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback()],
        ),
    )
    # Divergence and bad data end the workers normally after a last report (so Ray Train does not retry
    # them); the MLflowRecorder reads that report and records the trial as failed.
    trainer.fit()


class MLflowRecorder(tune.Callback):
    """Driver-side: one MLflow child run per trial, metrics at step = iteration, never a step twice."""

    def __init__(self, tracker: Tracker, grid_name: str, parent_run_id: str, tags: dict[str, str],
                 resources: dict):
        self.tracker, self.grid_name, self.parent, self.tags = tracker, grid_name, parent_run_id, tags
        self.resources = resources
        self.state: dict[str, dict] = {}  # Tune trial id -> run bookkeeping
        self.failed: list[str] = []  # digests of trials recorded as failed

    def _spec(self, trial) -> TrialSpec:
        return TrialSpec.from_dict(trial.config["trial"])

    def on_trial_start(self, iteration, trials, trial, **info):
        spec = self._spec(trial)
        cells = [c.__dict__ for c in spec.cells]
        run_id, last = self.tracker.trial_run(spec.digest, self.grid_name, self.parent, spec.config, cells,
                                              {**self.tags, "lgd.early_stopping": spec.scheduler or "none"})
        if last == 0:
            self.tracker.log_text(run_id, yaml.safe_dump(spec.config, sort_keys=False), "config.yaml")
        self.state[trial.trial_id] = {"run_id": run_id, "last": last, "start": time.time(), "history": [],
                                      "final": {}, "digest": spec.digest, "failure": None}
        log.info("trial %s -> MLflow run %s (%s)", spec.digest, run_id, ", ".join(
            f"{c['table']}: {c['row']} / {c['column']}" for c in cells))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        st = self.state.get(trial.trial_id)
        if st is None:
            return
        metrics = {k: v for k, v in result.items() if k not in _SKIP and isinstance(v, (int, float))}
        if result.get("diverged"):
            st["failure"] = f"non-finite loss at iteration {result.get('iteration')}: {result.get('diverged_terms')}"
            self.tracker.set_tags(st["run_id"], {"lgd.failure": "non-finite loss",
                                                 "lgd.failure.iteration": result.get("iteration"),
                                                 "lgd.failure.terms": result.get("diverged_terms")})
            return
        if result.get("fatal_error"):
            st["failure"] = result["fatal_error"]
            self.tracker.set_tags(st["run_id"], {"lgd.failure": result["fatal_error"]})
            return
        step = int(metrics.get("iteration", 0))
        if metrics.get("finished"):
            st["final"] = metrics
            self.tracker.log_metrics(st["run_id"], metrics, step)
        elif step > st["last"]:  # after a restart from a checkpoint, steps already logged are skipped
            st["last"] = step
            st["history"].append(metrics)
            self.tracker.log_metrics(st["run_id"], metrics, step)

    def _close(self, trial, state: str, error: str | None = None):
        st = self.state.pop(trial.trial_id, None)
        if st is None:
            return
        wall = time.time() - st["start"]
        r = self.resources
        gpus = r["num_workers"] * r["gpus_per_worker"] if r["use_gpu"] else 0.0
        self.tracker.log_metrics(st["run_id"], {"wall_clock_s": wall, "gpu_hours": wall * gpus / 3600.0,
                                                "cpu_hours": wall * r["num_workers"] * r["cpus_per_worker"] / 3600.0},
                                 st["last"])
        if st["final"]:
            self.tracker.log_text(st["run_id"], json.dumps({"final": st["final"], "history": st["history"]}, indent=1),
                                  "metrics.json")
        if error:
            self.tracker.set_tags(st["run_id"], {"lgd.error": error})
        if state == "failed":
            self.failed.append(st["digest"])
            log.error("trial %s failed: %s", st["digest"], (error or "")[-500:])
        self.tracker.finish(st["run_id"], state)

    def on_trial_complete(self, iteration, trials, trial, **info):
        st = self.state.get(trial.trial_id, {})
        if st.get("failure"):
            self._close(trial, "failed", error=st["failure"])
        else:
            self._close(trial, "done" if st.get("final") else "stopped")

    def on_trial_error(self, iteration, trials, trial, **info):
        err = None
        try:
            err = trial.get_error()
        except Exception:  # the error file may be gone; the message below still says it failed
            pass
        self._close(trial, "failed", error=str(err or "trial raised an error (see the Ray logs)")[-4000:])
