"""A grid survives a killed Ray Train worker and a killed driver, without losing or duplicating a result."""
import os
import signal
import subprocess

import psutil
import pytest
from mlflow.tracking import MlflowClient

from grids import ROOT, run_grid, run_grid_cmd, tiny_grid, wait_for, write_grid
from orchestration.chaos import train_worker_processes

pytestmark = pytest.mark.slow


def _trial_runs(out, grid):
    c = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = c.get_experiment_by_name(f"lgd-grid-{grid}")
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    return c, [r for r in runs if r.data.tags.get("lgd.kind") == "trial"]


def _checkpoints(out, digest=None):
    pattern = f"trial-{digest}/checkpoint_*" if digest else "trial-*/checkpoint_*"
    return sorted((out / "ray_storage").glob(pattern))


def _pgid(p):
    try:
        return os.getpgid(p.pid)
    except OSError:
        return None


def _popen(grid, out, *extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(run_grid_cmd(grid, out, *extra), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env)


def _steps(client, run, key="total_loss"):
    return [m.step for m in client.get_metric_history(run.info.run_id, key)]


def test_killed_worker_resumes_from_its_checkpoint_with_one_clean_run(tmp_path):
    # 27 iterations, a checkpoint every 4, a report every 2
    grid = write_grid(tmp_path, tiny_grid("workerloss", [
        {"name": "t", "dataset": "shapes", "rows": ["detector"], "columns": ["method"],
         "grid": [{"detector": ["retinanet"], "method": ["lgd"]}]}], iter_scale=0.0003, checkpoint_period=13334))
    out = tmp_path / "out"
    proc = _popen(grid, out)
    try:
        # two checkpoints in storage: the first is surely registered with the trainer by then
        wait_for(lambda: len(_checkpoints(out)) >= 2, 300, "two checkpoints")
        victims = wait_for(lambda: train_worker_processes(proc.pid), 60, "a Ray Train worker process")
        for v in victims:
            v.send_signal(signal.SIGKILL)
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output[-4000:]
    client, runs = _trial_runs(out, "workerloss")
    assert len(runs) == 1 and runs[0].data.tags["lgd.state"] == "done"
    steps = _steps(client, runs[0])
    assert steps == list(range(2, 27, 2)) + [27], steps  # no iteration missing, none twice
    assert "bbox/AP" in runs[0].data.metrics
    resumed = [m.value for m in client.get_metric_history(runs[0].info.run_id, "resumed_from_iteration")]
    assert max(resumed) >= 4  # the restarted worker continued from a checkpoint


def test_killed_driver_resumes_without_rerunning_finished_cells(tmp_path):
    tables = [{"name": "t", "dataset": "shapes", "rows": ["detector"], "columns": ["method"],
               "grid": [{"detector": ["retinanet"], "method": ["baseline", "lgd"]}]}]
    grid = write_grid(tmp_path, tiny_grid("driverloss", tables, iter_scale=0.0003, checkpoint_period=13334))
    out = tmp_path / "out"
    proc = _popen(grid, out, "--max-concurrent", "1")
    try:
        def one_done_one_checkpointed():
            if not _checkpoints(out):  # the driver has created its store by then: no race on its schema
                return None
            c, runs = _trial_runs(out, "driverloss")
            done = [r for r in runs if r.data.tags.get("lgd.state") == "done"]
            others = [r for r in runs if r.data.tags.get("lgd.state") == "running"]
            if done and others and _checkpoints(out, others[0].data.tags["lgd.digest"]):
                return done[0], others[0]
            return None
        done_run, partial = wait_for(one_done_one_checkpointed, 480, "one finished trial and one checkpoint")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started (one process group)
        proc.wait(timeout=60)
    wait_for(lambda: not [p for p in psutil.process_iter(["status"]) if p.info["status"] != psutil.STATUS_ZOMBIE
                           and _pgid(p) == proc.pid], 60, "the killed Ray to exit")
    partial_steps = _steps(MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}"), partial)
    assert not partial_steps or partial_steps[-1] < 27  # killed mid-trial

    again = run_grid(grid, out, "--resume")
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "1 already finished in MLflow, 1 to run" in again.stdout
    client, runs = _trial_runs(out, "driverloss")
    assert len(runs) == 2 and all(r.data.tags["lgd.state"] == "done" for r in runs)
    by_id = {r.info.run_id: r for r in runs}
    assert done_run.info.run_id in by_id and partial.info.run_id in by_id  # the same two runs, none added
    assert by_id[done_run.info.run_id].info.end_time == done_run.info.end_time  # the finished one untouched
    steps = _steps(client, by_id[partial.info.run_id])
    assert steps == list(range(2, 27, 2)) + [27], steps
    resumed = [m.value for m in client.get_metric_history(partial.info.run_id, "resumed_from_iteration")]
    assert max(resumed) >= 4  # continued from its checkpoint, not from scratch
    rows = (out / "tables" / "t.csv").read_text()
    assert rows.count(",done,") == 2

    third = run_grid(grid, out)
    assert third.returncode == 0 and "2 already finished in MLflow, 0 to run" in third.stdout
    assert len(_trial_runs(out, "driverloss")[1]) == 2


def test_the_trials_own_error_is_final_a_lost_worker_is_retried():
    """Ray Train's WorkerGroupError as its poll builds it: rank -> the exception of that worker."""
    import torch
    from ray.exceptions import ActorDiedError
    from ray.train import WorkerGroupError

    from orchestration.faults import classify

    own = classify(WorkerGroupError("x", {0: ValueError("lgd.num_heads must divide fpn_channels")}), 60)
    assert own.final and "ValueError: lgd.num_heads" in own.cause and "rank 0" in own.cause
    # its peer's collective failing alongside does not make it a lost worker
    both = classify(WorkerGroupError("x", {0: KeyError("boxes"), 1: RuntimeError("NCCL communicator aborted")}), 60)
    assert both.final and "rank 0 raised" in both.cause
    oom = classify(WorkerGroupError("x", {1: torch.OutOfMemoryError("CUDA out of memory")}), 60)
    assert oom.final and "out of GPU memory" in oom.cause
    lost = classify(WorkerGroupError("x", {0: ActorDiedError(), 1: ValueError("peer gone")}), 60)
    assert not lost.final and "lost" in lost.cause
    assert not classify(WorkerGroupError("x", {0: RuntimeError("connection reset by peer")}), 60).final


def test_a_killed_workers_folder_is_removed_a_live_ones_kept(tmp_path):
    """Work folders of a trial's worker: the one whose owner process is gone (SIGKILLed) goes, a live one stays."""
    import subprocess
    import sys

    from orchestration.trial import OWNER_FILE, _remove_orphans

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for name, pid in (("lgd-abc-r0-dead", dead.pid), ("lgd-abc-r0-live", live.pid), ("lgd-xyz-r0-other", dead.pid)):
            (tmp_path / name).mkdir()
            (tmp_path / name / OWNER_FILE).write_text(str(pid))
        (tmp_path / "lgd-abc-r0-new").mkdir()  # no owner yet: just created
        _remove_orphans(tmp_path, "lgd-abc-r0-")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["lgd-abc-r0-live", "lgd-abc-r0-new", "lgd-xyz-r0-other"]
    finally:
        live.kill()
