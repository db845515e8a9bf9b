"""TrialSpec -> a Ray Tune function trainable that fits a Ray Train TorchTrainer (train_loop in every worker)
until the trial finishes or its worker failures are spent, and the driver-side Tune callback that records
every trial in MLflow."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

import pyarrow.fs
import ray.train
import yaml
from ray import tune
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, ScalingConfig, TrainingFailedError
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.result import AUTO_RESULT_KEYS

from lgd.config import TrainConfig
from lgd.data.coco import DataError
from lgd.engine import CHECKPOINT_FILE, NonFiniteLossError, train_loop
from lgd.typed import build
from orchestration.chaos import PLAN_ENV, StartupKill, WorkerChaos
from orchestration.faults import ProgressWatchdog, TrialFailed, classify
from orchestration.grid import TrialSpec
from orchestration.tracking import Tracker
from orchestration.trial_resources import release_placement_groups, worker_runtime_env

log = logging.getLogger("lgd.trial")
_SKIP = set(AUTO_RESULT_KEYS) | {"done", "trial_id", "experiment_id", "experiment_tag", "checkpoint_path",
                                  "should_checkpoint", "diverged_terms", "fatal_error", "failure_cause"}


def worker_loop(loop_config: dict) -> None:
    """Runs in every Ray Train worker: train_loop with reports and checkpoints through ray.train."""
    cfg: TrainConfig = build(TrainConfig, loop_config["config"])
    ctx = ray.train.get_context()
    cfg.threads = loop_config["threads"]
    device = ray.train.torch.get_device() if loop_config["use_gpu"] else None
    chaos = WorkerChaos.from_env(loop_config["digest"], loop_config["storage"], cfg.solver.max_iter)
    # the node this worker runs on: rank 0's reports reach Tune, the MLflowRecorder tags the trial's run with it
    node = {"worker_node_id": ray.get_runtime_context().get_node_id(), "worker_node_ip": ray.util.get_node_ip_address()}

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        ckpt = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        step, finished = int(metrics.get("iteration", 0)), bool(metrics.get("finished"))
        if chaos:
            chaos.before_report(step, checkpoint_dir, finished)
        ray.train.report({**metrics, **node}, checkpoint=ckpt)
        if chaos:
            chaos.after_report(step, finished)

    checkpoint = ray.train.get_checkpoint() or _latest_checkpoint(loop_config["storage"], loop_config["digest"])
    # the worker's own files (its checkpoints are copied to the trial's storage when reported) go when it ends;
    # those of a killed worker of this trial and rank on this node go when the next one starts
    prefix = f"lgd-{loop_config['digest']}-r{ctx.get_world_rank()}-"
    _remove_orphans(Path(tempfile.gettempdir()), prefix)
    with tempfile.TemporaryDirectory(prefix=prefix, ignore_cleanup_errors=True) as work_dir, \
            (checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None)) as resume:
        (Path(work_dir) / OWNER_FILE).write_text(str(os.getpid()))
        cfg.output_dir = work_dir
        try:
            train_loop(cfg, report, resume_from=resume, device=device)
        except NonFiniteLossError as e:  # final: retrying from a checkpoint would diverge again
            ray.train.report({"diverged": 1, "iteration": e.iteration, "diverged_terms": json.dumps(e.terms)})
        except DataError as e:
            ray.train.report({"fatal_error": str(e)})


OWNER_FILE = ".lgd-owner-pid"


def _remove_orphans(tmp: Path, prefix: str) -> None:
    """Remove the work folders under ``tmp`` named ``prefix*`` whose owner process is gone (a killed worker
    never cleans up); a folder whose owner still runs (the same trial in another grid) is left alone."""
    for folder in tmp.glob(prefix + "*"):
        try:
            owner = folder / OWNER_FILE
            if not owner.exists():  # being created this moment, or older than owner files: by its age
                orphan = time.time() - folder.stat().st_mtime > 3600
            else:
                try:
                    os.kill(int(owner.read_text()), 0)  # signal 0: only asks whether the process exists
                    orphan = False
                except ProcessLookupError:
                    orphan = True
                except PermissionError:  # it exists, another user's
                    orphan = False
        except (OSError, ValueError):  # gone meanwhile, or an unreadable owner file
            continue
        if orphan:
            shutil.rmtree(folder, ignore_errors=True)


def _latest_checkpoint(storage: str, digest: str) -> Checkpoint | None:
    """The newest complete checkpoint of this trial in its storage folder, found by listing it.

    Ray Train hands a restarted worker group its latest registered checkpoint; this also covers a new trainer
    after the driver was lost (and restarts where Ray's hand-over came back empty). A folder whose upload a
    worker death cut short is passed over: its checkpoint file is not a complete zip archive.
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
        path = f"{base}/{name}/{CHECKPOINT_FILE}"
        if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
            continue
        with fs.open_input_file(path) as f:
            complete = zipfile.is_zipfile(f)  # torch.save writes a zip; a cut upload lacks its directory
        if complete:
            return Checkpoint(f"{base}/{name}", filesystem=fs)
        log.warning("checkpoint %s/%s is incomplete (its upload was cut short); passed over", base, name)
    return None


def _trainer(spec: TrialSpec, config: dict, to_tune: TuneReportCallback) -> TorchTrainer:
    res = config["resources"]
    per_worker = {"CPU": res["cpus_per_worker"]}
    if res["use_gpu"]:
        per_worker["GPU"] = res["gpus_per_worker"]
    callbacks = [to_tune, ProgressWatchdog(config["progress_timeout_s"])]
    if os.environ.get(PLAN_ENV):
        callbacks.append(StartupKill(spec.digest))
    return TorchTrainer(
        worker_loop,
        train_loop_config={"config": spec.config, "digest": spec.digest, "use_gpu": res["use_gpu"],
                           "storage": config["storage"],
                           "threads": max(1, int(res["cpus_per_worker"]))},
        scaling_config=ScalingConfig(num_workers=res["num_workers"], use_gpu=res["use_gpu"],
                                     resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            name=f"trial-{spec.digest}",  # the same name finds the same checkpoints after a restart
            storage_path=config["storage"],
            # Ray Train retries nothing itself: every failure, wherever the worker died (start-up, training,
            # checkpoint upload, evaluation), comes back to run_trial, which counts it against max_failures.
            failure_config=FailureConfig(max_failures=0, controller_failure_limit=0),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
            worker_runtime_env=worker_runtime_env(spec.digest),
        ),
    )


def run_trial(config: dict) -> None:
    """The Tune function trainable of one trial: fit its TorchTrainer, again after each lost worker.

    Each fit resumes from the trial's latest checkpoint (same run name and storage). A fault is reported to
    Tune (the MLflowRecorder tags its cause and iteration); the trial fails (TrialFailed) when more than
    ``max_failures`` faults happened, or at once on a final one (no progress, resources never given).
    Divergence and bad data end the workers normally after a last report, which the MLflowRecorder records
    as the trial's failure. Fault reports go through the workers' channel, so Tune gets everything in order,
    and a failing trial raises rather than returns: Tune delivers the reports still queued before the error.
    """
    spec = TrialSpec.from_dict(config["trial"])
    to_tune = TuneReportCallback()  # the workers' reports and the faults below reach Tune through it, in order
    failures = 0
    while True:
        fault = None
        try:
            _trainer(spec, config, to_tune).fit()
        except TrainingFailedError as e:
            fault = classify(e, config["progress_timeout_s"])
        finally:
            release_placement_groups(spec.digest)  # whatever Ray Train left of this attempt
        if fault is None:
            return
        if fault.final:
            to_tune.after_report(None, [{"fatal_error": fault.cause}], None)
            raise TrialFailed(fault.cause)
        failures += 1
        result = {"worker_failure": failures, "failure_cause": fault.cause}
        if failures > config["max_failures"]:
            result["fatal_error"] = (f"worker failures spent ({failures} > max_failures {config['max_failures']});"
                                     f" last: {fault.cause}")
        log.warning("trial %s: failure %d: %s", spec.digest, failures, fault.cause)
        to_tune.after_report(None, [result], None)
        if "fatal_error" in result:
            raise TrialFailed(result["fatal_error"])


class MLflowRecorder(tune.Callback):
    """Driver-side: one MLflow child run per trial, metrics at step = iteration, never a step twice."""

    def __init__(self, tracker: Tracker, grid_name: str, parent_run_id: str, tags: dict[str, str],
                 resources: dict):
        self.tracker, self.grid_name, self.parent, self.tags = tracker, grid_name, parent_run_id, tags
        self.resources = resources
        self.state: dict[str, dict] = {}  # Tune trial id -> run bookkeeping
        self.failed: list[str] = []  # digests of trials recorded as failed
        self.run_ids: dict[str, str] = {}  # digest -> its MLflow run (kept after the trial ends)

    def _spec(self, trial) -> TrialSpec:
        return TrialSpec.from_dict(trial.config["trial"])

    def on_trial_start(self, iteration, trials, trial, **info):
        spec = self._spec(trial)
        cells = [c.__dict__ for c in spec.cells]
        run_id, last = self.tracker.trial_run(spec.digest, self.grid_name, self.parent, spec.config, cells,
                                              {**self.tags, "lgd.early_stopping": spec.scheduler or "none"})
        if last == 0:
            self.tracker.log_text(run_id, yaml.safe_dump(spec.config, sort_keys=False), "config.yaml")
        self.run_ids[spec.digest] = run_id
        self.state[trial.trial_id] = {"run_id": run_id, "last": last, "seen": last, "start": time.time(),
                                      "history": [], "final": {}, "digest": spec.digest, "failure": None}
        log.info("trial %s -> MLflow run %s (%s)", spec.digest, run_id, ", ".join(
            f"{c['table']}: {c['row']} / {c['column']}" for c in cells))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        st = self.state.get(trial.trial_id)
        if st is None:
            return
        metrics = {k: v for k, v in result.items() if k not in _SKIP and isinstance(v, (int, float))}
        if result.get("worker_node_id") and result["worker_node_id"] != st.get("node"):  # first, or after a restart
            st["node"] = result["worker_node_id"]
            self.tracker.set_tags(st["run_id"], {"lgd.node_id": st["node"],
                                                 "lgd.node_ip": result.get("worker_node_ip")})
        if result.get("worker_failure"):  # a lost worker: the trial restarts from its checkpoint (or is spent)
            n = int(result["worker_failure"])
            self.tracker.set_tags(st["run_id"], {"lgd.worker_failures": n,
                                                 f"lgd.worker_failure.{n}.cause": result.get("failure_cause"),
                                                 f"lgd.worker_failure.{n}.iteration": st["seen"]})
        if result.get("fatal_error"):
            st["failure"] = result["fatal_error"]
            self.tracker.set_tags(st["run_id"], {"lgd.failure": result["fatal_error"],
                                                 "lgd.failure.iteration": st["seen"]})
            return
        if "worker_failure" in result:
            return
        if result.get("diverged"):
            st["failure"] = f"non-finite loss at iteration {result.get('iteration')}: {result.get('diverged_terms')}"
            self.tracker.set_tags(st["run_id"], {"lgd.failure": "non-finite loss",
                                                 "lgd.failure.iteration": result.get("iteration"),
                                                 "lgd.failure.terms": result.get("diverged_terms")})
            return
        step = int(metrics.get("iteration", 0))
        st["seen"] = max(st["seen"], step)
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
        self.tracker.log_metrics(st["run_id"], {"wall_clock_s": wall, "wall_clock_h": wall / 3600.0,
                                                "gpu_hours": wall * gpus / 3600.0,
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

    def close_open(self) -> int:
        """Close every run still open (the driver was interrupted) as ``interrupted``; how many."""
        open_ids = list(self.state)
        for trial_id in open_ids:
            st = self.state.pop(trial_id)
            self.tracker.finish(st["run_id"], "interrupted")
            log.warning("trial %s interrupted (MLflow run %s KILLED); --resume continues it", st["digest"],
                        st["run_id"])
        return len(open_ids)

    def on_trial_error(self, iteration, trials, trial, **info):
        failure = self.state.get(trial.trial_id, {}).get("failure")
        if failure:  # the trainable reported its fault, then raised TrialFailed
            self._close(trial, "failed", error=failure)
            return
        err = None
        try:
            err = trial.get_error()
        except Exception:  # the error file may be gone; the message below still says it failed
            pass
        self._close(trial, "failed", error=str(err or "trial raised an error (see the Ray logs)")[-4000:])
