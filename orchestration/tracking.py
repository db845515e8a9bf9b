"""MLflow: one parent run per grid invocation, one child run per trial, found again by config digest.

Only the grid driver talks to MLflow (workers never need to reach the store). Every write is retried
with back-off; metrics that still fail are kept and sent with the next write, so a brief outage loses none.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable, Iterable, Optional

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

log = logging.getLogger("lgd.tracking")

TAG_KIND = "lgd.kind"  # "grid" | "trial"
TAG_GRID = "lgd.grid"
TAG_DIGEST = "lgd.digest"
TAG_STATE = "lgd.state"  # running | done | failed | stopped | interrupted
TAG_CELLS = "lgd.cells"  # JSON list of {table, row, column}
PARENT = "mlflow.parentRunId"


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking store cannot be reached."""


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class Tracker:
    def __init__(self, tracking_uri: str, experiment: str, artifact_location: str | None = None,
                 retries: int = 8, backoff_s: float = 0.5):
        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.experiment_name = experiment
        self.artifact_location = artifact_location
        self.retries, self.backoff_s = retries, backoff_s
        self._pending: dict[str, list[Metric]] = {}
        self._experiment_id: str | None = None

    # --- plumbing -------------------------------------------------------------------------------
    def _call(self, fn: Callable, *args, **kwargs):
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # the store's errors come in many types (HTTP, SQL, OS)
                if attempt == self.retries:
                    raise
                log.warning("MLflow call %s failed (%s); retry %d/%d in %.1fs", fn.__name__, e, attempt + 1,
                            self.retries, delay)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)

    def check(self) -> None:
        """Raise :class:`TrackingUnavailable` unless the store answers (no retries: called before any trial)."""
        try:
            self.client.search_experiments(max_results=1)
        except Exception as e:
            raise TrackingUnavailable(f"MLflow tracking store {self.uri} is unreachable: {e}") from None

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            exp = self._call(self.client.get_experiment_by_name, self.experiment_name)
            if exp is None:
                self._experiment_id = self._call(self.client.create_experiment, self.experiment_name,
                                                 artifact_location=self.artifact_location)
            else:
                self._experiment_id = exp.experiment_id
        return self._experiment_id

    def _search(self, filter_string: str):
        runs, token = [], None
        while True:
            page = self._call(self.client.search_runs, [self.experiment_id], filter_string=filter_string,
                              max_results=1000, page_token=token)
            runs += list(page)
            token = page.token
            if not token:
                return runs

    # --- runs -----------------------------------------------------------------------------------
    def start_parent(self, grid_name: str, tags: dict[str, str], resume: bool) -> str:
        """The invocation's parent run; with ``resume`` the latest parent of this grid is continued."""
        if resume:
            parents = self._search(f"tags.`{TAG_KIND}` = 'grid' and tags.`{TAG_GRID}` = '{grid_name}'")
            if parents:
                latest = max(parents, key=lambda r: r.info.start_time)
                self._call(self.client.update_run, latest.info.run_id, status="RUNNING")
                return latest.info.run_id
        run = self._call(self.client.create_run, self.experiment_id, run_name=f"grid-{grid_name}",
                         tags={TAG_KIND: "grid", TAG_GRID: grid_name, **tags})
        return run.info.run_id

    def end_parent(self, run_id: str, ok: bool, interrupted: bool = False) -> None:
        self._call(self.client.set_terminated, run_id, "KILLED" if interrupted else "FINISHED" if ok else "FAILED")

    def trial_runs(self, grid_name: str | None = None) -> list:
        f = f"tags.`{TAG_KIND}` = 'trial'"
        if grid_name:
            f += f" and tags.`{TAG_GRID}` = '{grid_name}'"
        return self._search(f)

    def finished_digests(self) -> set[str]:
        """Digests of the trials recorded as done (the store filters: unfinished runs are not fetched)."""
        done = self._search(f"tags.`{TAG_KIND}` = 'trial' and tags.`{TAG_STATE}` = 'done'")
        return {r.data.tags[TAG_DIGEST] for r in done}

    def trial_run(self, digest: str, grid_name: str, parent_id: str, config: dict, cells: list[dict],
                  tags: dict[str, str]) -> tuple[str, int]:
        """The one run of this digest: an unfinished earlier one is reused. Returns (run_id, last logged step)."""
        existing = self._search(f"tags.`{TAG_KIND}` = 'trial' and tags.`{TAG_DIGEST}` = '{digest}'")
        existing = [r for r in existing if r.data.tags.get(TAG_STATE) != "done"]
        all_tags = {TAG_KIND: "trial", TAG_GRID: grid_name, TAG_DIGEST: digest, TAG_STATE: "running",
                    PARENT: parent_id, TAG_CELLS: json.dumps(cells), **tags}
        if existing:
            run = max(existing, key=lambda r: r.info.start_time)
            run_id = run.info.run_id
            self._call(self.client.update_run, run_id, status="RUNNING")
            self._call(self.client.log_batch, run_id, tags=[RunTag(k, str(v)) for k, v in all_tags.items()])
            history = self._call(self.client.get_metric_history, run_id, "total_loss")
            return run_id, max((m.step for m in history), default=0)
        run = self._call(self.client.create_run, self.experiment_id, run_name=f"trial-{digest}", tags=all_tags)
        run_id = run.info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):
            self._call(self.client.log_batch, run_id, params=params[i:i + 100])
        return run_id, 0

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        """Log numeric metrics at ``step``; on failure they wait for the next call (or :meth:`flush`)."""
        now = int(time.time() * 1000)
        batch = self._pending.pop(run_id, [])
        batch += [Metric(k, float(v), now, step) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)]
        try:
            for i in range(0, len(batch), 900):
                self._call(self.client.log_batch, run_id, metrics=batch[i:i + 900])
        except Exception as e:
            self._pending[run_id] = batch
            log.error("MLflow unreachable; %d metric values kept for the next attempt (%s)", len(batch), e)

    def flush(self, run_id: str) -> None:
        if self._pending.get(run_id):
            self.log_metrics(run_id, {}, 0)
        if self._pending.get(run_id):
            raise TrackingUnavailable(f"could not record {len(self._pending[run_id])} metric values of run {run_id}")

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        self._call(self.client.log_batch, run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self._call(self.client.log_text, run_id, text, name)

    def finish(self, run_id: str, state: str) -> None:
        """state: done | failed | stopped (early stopping) | interrupted (the driver was)."""
        self.flush(run_id)
        self.set_tags(run_id, {TAG_STATE: state})
        status = {"done": "FINISHED", "failed": "FAILED", "stopped": "KILLED", "interrupted": "KILLED"}[state]
        self._call(self.client.set_terminated, run_id, status)


def runs_by_digest(runs: Iterable) -> dict[str, Any]:
    """One run per digest: a finished one if there is one, else the latest."""
    best: dict[str, Any] = {}
    for r in runs:
        d = r.data.tags.get(TAG_DIGEST)
        cur = best.get(d)
        done = r.data.tags.get(TAG_STATE) == "done"
        if cur is None or (done and cur.data.tags.get(TAG_STATE) != "done") or (
                done == (cur.data.tags.get(TAG_STATE) == "done") and r.info.start_time > cur.info.start_time):
            best[d] = r
    return best


def status_name(run: Optional[Any]) -> str:
    if run is None:
        return "missing"
    return run.data.tags.get(TAG_STATE, RunStatus.to_string(RunStatus.from_string(run.info.status)).lower())
