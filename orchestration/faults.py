"""What ended a trial's attempt: a lost worker (retried from the last checkpoint while failures are left) or a
final fault (no progress, resources never given, an error of the trial's own that a retry repeats); and the
controller-side watchdog that turns a trial without progress into such a fault."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from ray.exceptions import RayError
from ray.train import ControllerError, TrainingFailedError, WorkerGroupError
from ray.train.v2._internal.exceptions import (
    InsufficientClusterResourcesError,
    WorkerGroupStartupFailedError,
    WorkerGroupStartupTimeoutError,
)
from ray.train.v2._internal.execution.callback import WorkerGroupCallback


# Raised by the trial's own code or configuration: the same on every attempt, so retrying only spends time. A
# lost worker shows as a Ray error (actor or node died) on its rank (its peers then raise torch.distributed errors, retried).
REPEATS_ON_RETRY = (ValueError, TypeError, KeyError, IndexError, AttributeError, AssertionError, NameError,
                    NotImplementedError, ZeroDivisionError, ImportError, torch.OutOfMemoryError)


class NoProgress(RuntimeError):
    """A trial's workers sent no report for the grid's ``progress_timeout_s``."""


class TrialFailed(RuntimeError):
    """Raised by the trainable to end its trial as failed (its fault was reported to Tune just before)."""


@dataclass(frozen=True)
class Fault:
    """One ended attempt: its cause in a line, and whether the trial must fail now (no retry helps)."""
    cause: str
    final: bool = False


def _line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


def classify(error: TrainingFailedError, timeout_s: float) -> Fault:
    """The fault behind a failed ``TorchTrainer.fit()`` (Ray Train retries nothing itself; see run_trial)."""
    if isinstance(error, ControllerError):
        inner = error.controller_failure
        if isinstance(inner, NoProgress):
            return Fault(str(inner), final=True)
        if isinstance(inner, WorkerGroupStartupTimeoutError):
            return Fault(f"waited {timeout_s:g} s for worker resources the cluster did not give", final=True)
        if isinstance(inner, InsufficientClusterResourcesError):
            return Fault(f"the cluster can never hold the trial's workers: {_line(inner)}", final=True)
        if isinstance(inner, WorkerGroupStartupFailedError):
            cause = inner.__cause__ or inner
            return Fault(f"worker lost while its group started: {_line(cause)}")
        return Fault(f"worker lost while the controller started or polled it: {_line(inner)}")
    if isinstance(error, WorkerGroupError):
        ranks = sorted(error.worker_failures)
        # a dead worker's poll carries the actor error
        failures = {r: getattr(f, "health_check_failure", f) for r, f in error.worker_failures.items()}
        first = failures[ranks[0]] if ranks else error
        own = [r for r in ranks if isinstance(failures[r], REPEATS_ON_RETRY)]
        if own and not any(isinstance(f, RayError) for f in failures.values()):
            e = failures[own[0]]
            hint = " (out of GPU memory: fewer images per worker, solver.amp, or a smaller input)" \
                if isinstance(e, torch.OutOfMemoryError) else ""
            return Fault(f"worker rank {', '.join(map(str, own))} raised {_line(e)}{hint}; not retried: the "
                         "trial's own error comes back on every attempt", final=True)
        return Fault(f"worker rank {', '.join(map(str, ranks))} lost: {_line(first)}")
    return Fault(_line(error))


class ProgressWatchdog(WorkerGroupCallback):
    """Runs in the Ray Train controller: a running worker group with no report for ``timeout_s`` is an error
    (the controller then shuts the group down, releasing its resources, and ``fit()`` raises it)."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._last: float | None = None

    def after_worker_group_training_start(self, worker_group) -> None:
        self._last = time.monotonic()

    def after_worker_group_poll_status(self, worker_group_status) -> None:
        now = time.monotonic()
        if self._last is None or any(s.training_report is not None
                                     for s in worker_group_status.worker_statuses.values()):
            self._last = now
        elif now - self._last > self.timeout_s:
            raise NoProgress(f"no progress: no report from the trial's workers for {self.timeout_s:g} s")
