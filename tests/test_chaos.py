"""A grid survives worker loss at every phase: real SIGKILLs of real Ray Train worker processes (a fixed plan,
orchestration/chaos.py), each trial retried from its checkpoint to the end, every step logged once, no run
left RUNNING, no placement group held for a trial that ended; stalls and spent failures end a trial with
their reason; Ctrl-C / SIGTERM close every run and --resume continues."""
import csv
import json
import os
import signal
import subprocess
import threading
import time

import pytest
import ray
import torch
from mlflow.tracking import MlflowClient
from ray.util.state import list_actors, list_placement_groups

from grids import ROOT, run_grid_cmd, tiny_grid, wait_for, write_grid
from lgd.typed import ConfigError
from orchestration.grid import expand, load_grid

pytestmark = pytest.mark.slow

STEPS = list(range(2, 19, 2))  # 18 iterations (iter_scale 0.0002), a report every 2, a checkpoint every 4


@pytest.fixture(scope="module")
def cluster():
    """A local Ray of 2 CPUs that outlives each grid driver (they join it with --address), so that Ray's state
    API can be asked about placement groups while a grid runs."""
    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _grid(tmp_path, name, grid_axes, **kw):
    grid = tiny_grid(name, [{"name": "t", "dataset": "shapes", "rows": ["detector"], "columns": ["method"],
                             "grid": grid_axes}], iter_scale=0.0002, checkpoint_period=20000, **kw)
    path = write_grid(tmp_path, grid)
    return path, [s.digest for s in expand(load_grid(path))]


def _start(grid, out, cluster, plan=None, *extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"}
    if plan is not None:
        env["LGD_CHAOS_PLAN"] = str(plan)
    # --verbose: the trial actors' own log lines (placement groups released, failures) are asserted on
    return subprocess.Popen(run_grid_cmd(grid, out, "--address", cluster, "--verbose", *extra), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(proc, timeout=420):
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    return output


def _client(out):
    return MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")


def _runs(out, grid):
    c = _client(out)
    exp = c.get_experiment_by_name(f"lgd-grid-{grid}")
    return c, c.search_runs([exp.experiment_id], max_results=1000) if exp else []


def _steps(client, run):
    return [m.step for m in client.get_metric_history(run.info.run_id, "total_loss")]


def _plan(tmp_path, kills):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(kills))
    return path


def _fired(plan):
    return [json.loads(p.read_text()) for p in sorted((plan.parent / (plan.name + ".fired")).glob("*.json"))]


class PlacementWatch:
    """Samples Ray's state API while a grid runs: the live placement groups that hold CPUs (Ray Train worker
    groups), which trial's workers each one serves, and which trial runs MLflow has open or closed."""

    def __init__(self, cluster, out, grid):
        self.cluster, self.out, self.grid = cluster, out, grid
        self.samples, self.violations = 0, []
        self.closed_while_running = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(60)

    def _trial_runs(self):
        _, runs = _runs(self.out, self.grid)
        return {r.info.run_id: r for r in runs if r.data.tags.get("lgd.kind") == "trial"}

    def _live_worker_groups(self):
        pgs = {p.placement_group_id for p in list_placement_groups(
            address=self.cluster, filters=[("state", "!=", "REMOVED")], detail=True, limit=10_000)
            if any(b["unit_resources"].get("CPU", 0) > 0 for b in p.bundles)}
        trial_of = {}
        for a in list_actors(address=self.cluster, filters=[("class_name", "=", "RayTrainWorker")], detail=True,
                             limit=10_000):
            env = json.loads(a.serialized_runtime_env or "{}").get("env_vars", {})
            if a.placement_group_id in pgs:
                trial_of.setdefault(env.get("LGD_TRIAL"), set()).add(a.placement_group_id)
        return pgs, trial_of

    def _loop(self):
        while not self._stop.wait(0.5):
            if not (self.out / "ray_storage").exists():  # the driver has set up its MLflow store by then
                continue
            try:
                before = self._trial_runs()
                pgs, trial_of = self._live_worker_groups()
                after = self._trial_runs()
            except Exception:  # the store mid-write, the state API mid-start: skip this sample
                continue
            self.samples += 1
            open_ids = {i for runs in (before, after) for i, r in runs.items() if r.info.status == "RUNNING"}
            closed = {r.data.tags["lgd.digest"] for r in before.values() if r.info.status != "RUNNING"}
            if len(pgs) > len(open_ids):
                self.violations.append(f"{len(pgs)} worker placement groups live for {len(open_ids)} open trials")
            for digest, held in trial_of.items():
                if len(held) > 1:
                    self.violations.append(f"trial {digest} holds {len(held)} placement groups")
                if digest in closed:
                    self.violations.append(f"trial {digest} ended but holds placement group(s) {held}")
            if closed and open_ids:
                self.closed_while_running += 1


def test_grid_survives_worker_kills_at_every_phase(tmp_path, cluster):
    grid, (a, b) = _grid(tmp_path, "chaos", [{"detector": ["retinanet"], "method": ["baseline", "lgd"]}])
    plan = _plan(tmp_path, [
        {"trial": a, "phase": "start"},  # while the controller launches the training function
        {"trial": a, "phase": "checkpoint", "iteration": 4},  # during the upload of its first checkpoint
        {"trial": b, "phase": "train", "iteration": 8},
        {"trial": b, "phase": "eval"},
    ])
    out = tmp_path / "out"
    t0 = time.time()
    with PlacementWatch(cluster, out, "chaos") as watch:
        proc = _start(grid, out, cluster, plan)
        output = _finish(proc)
    wall = time.time() - t0
    assert proc.returncode == 0, output[-5000:]

    fired = _fired(plan)
    assert [(k["trial"], k["phase"]) for k in fired] == [(a, "start"), (a, "checkpoint"), (b, "train"), (b, "eval")]
    assert all("RayTrainWorker" in k["title"] for k in fired) and len({k["pid"] for k in fired}) == 4
    assert "run_train_fn" in fired[0]["seen"] and "evaluation" in fired[3]["seen"]
    # the start-up kill leaves Ray Train's worker group half-started: its placement group is released by us
    assert f"trial {a}: released 1 placement group(s)" in output

    client, runs = _runs(out, "chaos")
    assert runs and all(r.info.status != "RUNNING" for r in runs)
    trials = {r.data.tags["lgd.digest"]: r for r in runs if r.data.tags.get("lgd.kind") == "trial"}
    assert set(trials) == {a, b}
    for digest, run in trials.items():
        tags = run.data.tags
        assert run.info.status == "FINISHED" and tags["lgd.state"] == "done"
        assert _steps(client, run) == STEPS, (digest, _steps(client, run))  # none missing, none twice
        assert "bbox/AP" in run.data.metrics
        assert tags["lgd.worker_failures"] == "2"
        for n in (1, 2):
            assert "ActorDiedError" in tags[f"lgd.worker_failure.{n}.cause"]
            assert 0 <= int(tags[f"lgd.worker_failure.{n}.iteration"]) <= 18
    assert trials[a].data.tags["lgd.worker_failure.1.cause"].startswith(
        "worker lost while the controller started or polled it: ActorDiedError")  # Ray Train raised ControllerError
    parent = [r for r in runs if r.data.tags.get("lgd.kind") == "grid"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"

    rows = list(csv.DictReader((out / "tables" / "t.csv").open()))
    assert len(rows) == 2 and all(r["status"] == "done" and r["ours"] != "" for r in rows)

    assert watch.samples >= 20 and watch.closed_while_running >= 1, (watch.samples, watch.closed_while_running)
    assert not watch.violations, watch.violations[:5]
    assert not [p for p in list_placement_groups(address=cluster, filters=[("state", "!=", "REMOVED")], limit=1000)
                if p.creator_job_id != ray.get_runtime_context().get_job_id()]
    print(f"chaos grid (2 trials, 4 worker kills) wall time: {wall:.1f}s")


def test_stalled_and_spent_trials_fail_with_their_reason(tmp_path, cluster):
    grid, (a, b) = _grid(tmp_path, "spent", [{"detector": ["retinanet"], "method": ["baseline", "lgd"]}],
                         max_failures=1)
    grid.write_text(grid.read_text() + "progress_timeout_s: 30\n")  # well above a loaded machine's first report
    plan = _plan(tmp_path, [
        {"trial": a, "phase": "hang", "iteration": 4},  # SIGSTOP: the worker stops making progress
        {"trial": b, "phase": "train", "iteration": 4},
        {"trial": b, "phase": "train", "iteration": 6},  # the second loss: more than max_failures 1
    ])
    out = tmp_path / "out"
    with PlacementWatch(cluster, out, "spent") as watch:
        output = _finish(_start(grid, out, cluster, plan))
    client, runs = _runs(out, "spent")
    trials = {r.data.tags["lgd.digest"]: r for r in runs if r.data.tags.get("lgd.kind") == "trial"}
    assert all(r.info.status == "FAILED" and r.data.tags["lgd.state"] == "failed" for r in trials.values()), output[-4000:]
    hung = trials[a].data.tags
    assert hung["lgd.failure"] == "no progress: no report from the trial's workers for 30 s"
    assert "lgd.worker_failures" not in hung  # a stall is final, not retried
    spent = trials[b].data.tags
    assert spent["lgd.worker_failures"] == "2" and spent["lgd.failure"].startswith("worker failures spent (2 > max_failures 1)")
    assert 0 <= int(spent["lgd.worker_failure.1.iteration"]) <= int(spent["lgd.worker_failure.2.iteration"]) < 6
    parent = [r for r in runs if r.data.tags.get("lgd.kind") == "grid"]
    assert parent[0].info.status == "FAILED"
    assert not watch.violations, watch.violations[:5]
    rows = list(csv.DictReader((out / "tables" / "t.csv").open()))
    assert [r["status"] for r in rows] == ["failed", "failed"]


def test_resources_never_given_fail_the_trial(tmp_path, cluster):
    grid, _ = _grid(tmp_path, "starved", [{"detector": ["retinanet"], "method": ["baseline"]}], num_workers=2)
    grid.write_text(grid.read_text() + "progress_timeout_s: 10\n")
    held = ray.util.placement_group([{"CPU": 1}])  # another job holds one of the two CPUs for good
    ray.get(held.ready(), timeout=60)
    try:
        t0 = time.time()
        output = _finish(_start(grid, tmp_path / "out", cluster), timeout=300)
        wall = time.time() - t0
    finally:
        ray.util.remove_placement_group(held)
    client, runs = _runs(tmp_path / "out", "starved")
    trial = [r for r in runs if r.data.tags.get("lgd.kind") == "trial"]
    assert len(trial) == 1 and trial[0].info.status == "FAILED", output[-4000:]
    assert trial[0].data.tags["lgd.failure"] == "waited 10 s for worker resources the cluster did not give"
    assert wall < 120


def _checkpoints(out, digest):
    return sorted((out / "ray_storage" / f"trial-{digest}").glob("checkpoint_*"))


def test_interrupted_driver_closes_its_runs_and_resume_continues(tmp_path, cluster):
    grid, (a,) = _grid(tmp_path, "stop", [{"detector": ["retinanet"], "method": ["baseline"]}])
    out = tmp_path / "out"

    def everything_closed(expect_trial_state):
        client, runs = _runs(out, "stop")
        assert runs and all(r.info.status == "KILLED" for r in runs), [(r.data.tags, r.info.status) for r in runs]
        assert [r.data.tags["lgd.state"] for r in runs if r.data.tags.get("lgd.kind") == "trial"] == [expect_trial_state]

    # SIGTERM: the grid stops gracefully, its runs are closed
    proc = _start(grid, out, cluster)
    wait_for(lambda: _checkpoints(out, a), 240, "a checkpoint")
    proc.send_signal(signal.SIGTERM)
    output = _finish(proc, timeout=120)
    assert proc.returncode == 130, output[-4000:]
    everything_closed("interrupted")

    # --resume, then Ctrl-C twice: the second stops at once; still nothing left RUNNING
    proc = _start(grid, out, cluster, None, "--resume")
    wait_for(lambda: [r for r in _runs(out, "stop")[1] if r.info.status == "RUNNING"
                       and r.data.tags.get("lgd.kind") == "trial"], 240, "the trial running again")
    proc.send_signal(signal.SIGINT)
    time.sleep(1.0)
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    output = _finish(proc, timeout=120)
    stop_s = time.time() - t0
    assert proc.returncode == 130 and stop_s < 30, (stop_s, output[-4000:])
    everything_closed("interrupted")

    # --resume once more: the trial finishes from its checkpoint, in the same run, each step logged once
    output = _finish(_start(grid, out, cluster, None, "--resume"))
    client, runs = _runs(out, "stop")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs), output[-4000:]
    trial = next(r for r in runs if r.data.tags.get("lgd.kind") == "trial")
    assert _steps(client, trial) == STEPS
    resumed = [m.value for m in client.get_metric_history(trial.info.run_id, "resumed_from_iteration")]
    assert max(resumed) >= 4
    print(f"second Ctrl-C: driver gone {stop_s:.1f}s after it")


def test_latest_checkpoint_passes_over_a_cut_upload(tmp_path):
    from orchestration.trial import _latest_checkpoint

    folder = tmp_path / "trial-abc"
    good, cut = folder / "checkpoint_2026-01-01_00-00-01.000000", folder / "checkpoint_2026-01-01_00-00-02.000000"
    good.mkdir(parents=True)
    cut.mkdir()
    torch.save({"iteration": 4, "weights": torch.zeros(10_000)}, good / "checkpoint.pt")
    data = (good / "checkpoint.pt").read_bytes()
    (cut / "checkpoint.pt").write_bytes(data[: len(data) // 2])  # a worker killed mid-upload
    ckpt = _latest_checkpoint(str(tmp_path), "abc")
    assert ckpt is not None and ckpt.path.endswith(good.name)
    (cut / "checkpoint.pt").write_bytes(data)
    assert _latest_checkpoint(str(tmp_path), "abc").path.endswith(cut.name)


def test_progress_timeout_is_validated(tmp_path):
    grid, _ = _grid(tmp_path, "bad", [{"detector": ["retinanet"], "method": ["baseline"]}])
    grid.write_text(grid.read_text() + "progress_timeout_s: 0\n")
    with pytest.raises(ConfigError, match="progress_timeout_s: must be > 0"):
        load_grid(grid)
    grid.write_text(grid.read_text().replace("progress_timeout_s: 0", "progress_timeout_s: soon"))
    with pytest.raises(ConfigError, match="progress_timeout_s"):
        load_grid(grid)
