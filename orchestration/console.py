"""What a person sees while a grid runs: a line when a trial starts, loses a worker, finishes or fails (with
its MLflow run id), and every ``period_s`` one status line (trials done / running / pending / failed, each
running trial's iteration and loss, an ETA). Ray's and the workers' own output goes to Ray's log files unless
--verbose."""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

from ray import tune


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class ConsoleProgress(tune.Callback):
    """Driver-side Tune callback; ``run_id_of(digest)`` names a trial's MLflow run (the recorder knows it)."""

    def __init__(self, specs: list, max_iter: dict[str, int], run_id_of: Callable[[str], str | None],
                 period_s: float = 30.0, stream: TextIO = sys.stdout):
        self.cells = {s.digest: s.cells_text() for s in specs}
        self.max_iter = max_iter  # digest -> the trial's iterations
        self.run_id_of, self.period_s, self.stream = run_id_of, period_s, stream
        self.running: dict[str, tuple[int, float | None]] = {}  # digest -> (iteration, total loss)
        self.done: set[str] = set()
        self.failed: set[str] = set()
        self.reasons: dict[str, str] = {}  # digest -> why it failed, when its trainable ended normally
        self.start = self.last = time.time()
        self.progressed = 0  # iterations trained in this invocation, all trials: the ETA's rate

    def _print(self, text: str) -> None:
        print(f"[{_clock(time.time() - self.start)}] {text}", file=self.stream, flush=True)

    @staticmethod
    def _digest(trial) -> str:
        return trial.config["trial"]["digest"]

    def on_trial_start(self, iteration, trials, trial, **info):
        d = self._digest(trial)
        self.running[d] = (0, None)
        self._print(f"start   trial-{d}  {self.cells.get(d, '')}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        d = self._digest(trial)
        if result.get("worker_failure"):  # a lost worker: the trial goes on from its checkpoint, or is spent
            self._print(f"retry   trial-{d}  worker failure {int(result['worker_failure'])}: "
                        f"{result.get('failure_cause', '')}"[:300])
        if result.get("diverged"):  # recorded as failed; Tune sees the trainable end normally
            self.reasons[d] = f"non-finite loss at iteration {result.get('iteration')}"
        elif result.get("fatal_error"):
            self.reasons[d] = str(result["fatal_error"])[:200]
        if "iteration" in result and "total_loss" in result:
            it = int(result["iteration"])
            before = self.running.get(d, (0, None))[0]
            self.progressed += max(0, it - before)
            self.running[d] = (it, float(result["total_loss"]))

    def _end(self, trial, failed: bool) -> None:
        d = self._digest(trial)
        self.running.pop(d, None)
        failed = failed or d in self.reasons
        (self.failed if failed else self.done).add(d)
        why = f"  ({self.reasons[d]})" if d in self.reasons else ""
        self._print(f"{'FAILED' if failed else 'done':7s} trial-{d}  MLflow run {self.run_id_of(d) or '-'}{why}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, failed=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, failed=True)

    def on_step_end(self, iteration, trials, **info):
        now = time.time()
        if now - self.last < self.period_s:
            return
        self.last = now
        pending = [d for d in self.cells if d not in self.done and d not in self.failed and d not in self.running]
        parts = [f"{len(self.done)} done, {len(self.running)} running, {len(pending)} pending, "
                 f"{len(self.failed)} failed"]
        for d, (it, loss) in sorted(self.running.items()):
            parts.append(f"trial-{d[:8]} {it}/{self.max_iter.get(d, '?')}" + (f" loss {loss:.3f}" if loss else ""))
        rate = self.progressed / max(now - self.start, 1e-9)
        left = sum(self.max_iter[d] - it for d, (it, _) in self.running.items() if d in self.max_iter) + \
            sum(self.max_iter[d] for d in pending)
        if rate > 0 and left > 0:
            parts.append(f"ETA {_clock(left / rate)}")
        self._print(" | ".join(parts))
