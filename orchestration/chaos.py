"""Planned worker loss for chaos tests: a trial's Ray Train worker process SIGKILLs itself at a named phase.

Off unless the environment variable ``LGD_CHAOS_PLAN`` names a JSON file with a list of kills, e.g.
``[{"trial": "<digest>", "phase": "checkpoint", "iteration": 4}]``. Phases (rank 0 of the trial):

- ``start``: while the controller starts the worker group (when it launches the training function);
- ``train``: at the first report of an iteration >= ``iteration``;
- ``checkpoint``: while the checkpoint of an iteration >= ``iteration`` is being uploaded to storage
  (a local ``--storage`` folder);
- ``eval``: while the final evaluation runs;
- ``hang``: SIGSTOP instead of SIGKILL at a report (a worker that stops making progress).

Each kill fires once: just before the signal it writes ``<plan>.fired/<n>.json`` (pid, process title,
phase, iteration, what it saw). The signal is real; nothing is simulated.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Literal, Optional

import ray.train
from pydantic.dataclasses import dataclass
from ray.train.v2._internal.execution.callback import WorkerCallback

from lgd.engine import CHECKPOINT_FILE
from lgd.typed import STRICT, ConfigError, Section, build

PLAN_ENV = "LGD_CHAOS_PLAN"
_POLL_S = 0.001


@dataclass(config=STRICT)
class Kill(Section):
    """One planned worker loss."""
    trial: str
    phase: Literal["start", "train", "checkpoint", "eval", "hang"]
    iteration: int = 0


class FaultPlan:
    """The kills planned in a JSON file, each fired at most once (a marker file per fired kill)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        data = json.loads(self.path.read_text())
        if not isinstance(data, list):
            raise ConfigError([f"{self.path}: expected a list of kills"])
        problems: list[str] = []
        self.kills: list[Kill] = [build(Kill, k, f"{self.path}[{i}]", problems) for i, k in enumerate(data)]
        if problems:
            raise ConfigError(problems)
        self.fired_dir = self.path.parent / (self.path.name + ".fired")

    @classmethod
    def from_env(cls) -> Optional["FaultPlan"]:
        path = os.environ.get(PLAN_ENV)
        return cls(path) if path else None

    def due(self, trial: str, phase: str, iteration: int = 0) -> Optional[int]:
        """Index of a kill not yet fired for this trial and phase, due at ``iteration``."""
        for i, k in enumerate(self.kills):
            if k.trial == trial and k.phase == phase and iteration >= k.iteration and not self._marker(i).exists():
                return i
        return None

    def _marker(self, index: int) -> Path:
        return self.fired_dir / f"{index}.json"

    def fire(self, index: int, iteration: int, seen: str, sig: int = signal.SIGKILL) -> None:
        """Record the kill, then send ``sig`` to this process (a SIGKILL does not return)."""
        self.fired_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self._marker(index), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        try:
            title = Path(f"/proc/{os.getpid()}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            title = ""
        with os.fdopen(fd, "w") as f:
            json.dump({**self.kills[index].__dict__, "pid": os.getpid(), "title": title, "time": time.time(),
                       "seen": seen, "at_iteration": iteration}, f)
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), sig)


def _watch(until: Callable[[], Optional[str]], then: Callable[[str], None], timeout_s: float = 120.0) -> None:
    """In a daemon thread: poll ``until`` (a description once the moment has come) and call ``then`` with it."""
    def loop():
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            seen = until()
            if seen:
                then(seen)
                return
            time.sleep(_POLL_S)
    threading.Thread(target=loop, daemon=True, name="lgd-chaos").start()


class StartupKill(WorkerCallback):
    """Ray Train worker callback: the planned ``start`` kill of ``trial``, at the moment the controller
    launches the training function (the worker group is built; the controller is still starting it)."""

    def __init__(self, trial: str):
        self.trial = trial

    def after_init_train_context(self):
        plan = FaultPlan.from_env()
        index = plan.due(self.trial, "start") if plan and ray.train.get_context().get_world_rank() == 0 else None
        if index is None:
            return

        def hook(frame, event, arg):  # this actor's tasks run on this (the main) thread
            if event == "call" and frame.f_code.co_name == "run_train_fn":
                plan.fire(index, 0, "the controller called run_train_fn")

        sys.setprofile(hook)


class WorkerChaos:
    """The planned ``train``/``hang``/``checkpoint``/``eval`` kills of one trial, from its rank-0 worker's reports."""

    def __init__(self, plan: FaultPlan, trial: str, storage: str, max_iter: int):
        self.plan, self.trial, self.max_iter = plan, trial, max_iter
        self.trial_dir = Path(storage) / f"trial-{trial}"

    @classmethod
    def from_env(cls, trial: str, storage: str, max_iter: int) -> Optional["WorkerChaos"]:
        plan = FaultPlan.from_env()
        if plan is None or ray.train.get_context().get_world_rank() != 0:
            return None
        return cls(plan, trial, storage, max_iter)

    def before_report(self, iteration: int, checkpoint_dir: Optional[str], finished: bool) -> None:
        if finished:
            return
        for phase, sig in (("train", signal.SIGKILL), ("hang", signal.SIGSTOP)):
            index = self.plan.due(self.trial, phase, iteration)
            if index is not None:
                self.plan.fire(index, iteration, f"report of iteration {iteration}", sig)
        index = self.plan.due(self.trial, "checkpoint", iteration) if checkpoint_dir else None
        if index is not None:
            size = (Path(checkpoint_dir) / CHECKPOINT_FILE).stat().st_size
            before = set(self.trial_dir.glob("checkpoint_*"))

            def uploading() -> Optional[str]:
                for d in set(self.trial_dir.glob("checkpoint_*")) - before:
                    try:
                        done = (d / CHECKPOINT_FILE).stat().st_size
                    except OSError:  # not there yet
                        continue
                    if done:
                        return f"{done} of {size} bytes of {d / CHECKPOINT_FILE} uploaded"
                return None
            _watch(uploading, lambda seen: self.plan.fire(index, iteration, seen))

    def after_report(self, iteration: int, finished: bool) -> None:
        index = self.plan.due(self.trial, "eval", iteration) if iteration >= self.max_iter and not finished else None
        if index is None:
            return
        trainer = threading.get_ident()  # the training thread: it evaluates next

        def evaluating() -> Optional[str]:
            frame = sys._current_frames().get(trainer)
            while frame is not None:
                code = frame.f_code
                if code.co_name == "evaluate" and code.co_filename.endswith(os.path.join("lgd", "evaluation",
                                                                                          "__init__.py")):
                    return f"{code.co_filename}:{frame.f_lineno} running"
                frame = frame.f_back
            return None
        _watch(evaluating, lambda seen: self.plan.fire(index, iteration, seen))


def train_worker_processes(driver_pid: int) -> list:
    """The Ray Train worker processes (psutil.Process) under the grid driver ``driver_pid``, i.e. of its own local
    Ray: no other Ray on the machine is touched. For outside chaos (benchmarks/chaos.py, the fault tests); needs
    psutil (the test extra)."""
    import psutil

    found = []
    for p in psutil.Process(driver_pid).children(recursive=True):
        try:
            if any("RayTrainWorker" in part for part in p.cmdline()):
                found.append(p)
        except psutil.Error:
            continue
    return found
