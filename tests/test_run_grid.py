"""run_grid.py end to end: a real local Ray (2 CPUs), Ray Train workers, a real MLflow store, real tables."""
import csv
import re
import json
import socket
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from grids import ROOT, run_grid, tiny_grid, write_grid

pytestmark = pytest.mark.slow


def _runs(out, grid="e2e"):
    c = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = c.get_experiment_by_name(f"lgd-grid-{grid}")
    return c, c.search_runs([exp.experiment_id], max_results=1000)


@pytest.fixture(scope="module")
def finished_grid(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    grid = tiny_grid("e2e", [
        {"name": "cmp", "dataset": "shapes", "rows": ["detector"], "columns": ["method"],
         "grid": [{"detector": ["retinanet"], "method": ["baseline", "lgd"]}]},
        {"name": "unstable", "dataset": "shapes", "rows": ["detector"], "columns": ["solver.base_lr"],
         "fixed": {"solver.clip_grad_norm": None}, "grid": [{"detector": ["retinanet"], "solver.base_lr": [1.0e12]}]},
    ])
    path = write_grid(tmp, grid)
    out = tmp / "out"
    t0 = time.time()
    first = run_grid(path, out, "--status-every", "1")
    elapsed = time.time() - t0
    second = run_grid(path, out)
    return path, out, first, second, elapsed


def test_grid_runs_records_and_reports(finished_grid):
    path, out, first, _, elapsed = finished_grid
    assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]  # one trial diverges on purpose
    client, runs = _runs(out)
    parents = sorted((r for r in runs if r.data.tags.get("lgd.kind") == "grid"), key=lambda r: r.info.start_time)
    trials = [r for r in runs if r.data.tags.get("lgd.kind") == "trial"]
    assert len(parents) == 2 and len(trials) == 3  # one parent per invocation; the 2nd re-ran the failed trial
    failed = [r for r in trials if r.data.tags["lgd.state"] == "failed"]
    assert {r.data.tags["mlflow.parentRunId"] for r in trials if r not in failed} == {parents[0].info.run_id}
    assert failed[0].data.tags["mlflow.parentRunId"] == parents[1].info.run_id
    assert parents[0].data.tags["lgd.git_commit"] and parents[0].data.tags["lgd.grid_file"] == str(path)
    done = [r for r in trials if r.data.tags["lgd.state"] == "done"]
    assert len(done) == 2
    for r in done:
        assert r.info.status == "FINISHED" and r.info.run_name == f"trial-{r.data.tags['lgd.digest']}"
        assert r.data.params["detector"] == "retinanet" and r.data.params["solver.iter_scale"] == "0.0001"
        assert 0.0 <= r.data.metrics["bbox/AP"] <= 100.0 and r.data.metrics["wall_clock_s"] > 0
        assert "peak_memory_mb" in r.data.metrics and "data/images_kept" in r.data.metrics
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "total_loss")]
        assert steps == [2, 4, 6, 8, 9]
        cells = json.loads(r.data.tags["lgd.cells"])
        assert cells[0]["table"] == "cmp"
        arts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"config.yaml", "metrics.json"} <= arts
    lgd_run = next(r for r in done if r.data.params["lgd.enabled"] == "True")
    assert "distill" in lgd_run.data.metrics and "classification.tea" in lgd_run.data.metrics

    rows = list(csv.DictReader((out / "tables" / "cmp.csv").open()))
    by_col = {r["column"]: r for r in rows}
    for col, method in (("Baseline", "False"), ("Ours", "True")):
        run = next(r for r in done if r.data.params["lgd.enabled"] == method)
        assert by_col[col]["status"] == "done" and by_col[col]["run_id"] == run.info.run_id
        assert float(by_col[col]["ours"]) == pytest.approx(run.data.metrics["bbox/AP"], abs=1e-3)
    md = (out / "tables" / "cmp.md").read_text()
    assert "| RetinaNet |" in md and (out / "tables" / "cmp.tex").read_text().startswith(r"\begin{table}")
    report = (out / "report.md").read_text()
    assert "done 2" in report and "failed 1" in report and (out / "report.html").exists()
    print(f"two-trial grid wall time: {elapsed:.1f}s")


def test_divergence_fails_only_its_trial_and_names_the_iteration(finished_grid):
    _, out, first, _, _ = finished_grid
    _, runs = _runs(out)
    bad = [r for r in runs if r.data.tags.get("lgd.state") == "failed"]
    assert len(bad) == 1 and bad[0].info.status == "FAILED"
    tags = bad[0].data.tags
    assert tags["lgd.failure"] == "non-finite loss" and int(tags["lgd.failure.iteration"]) >= 1
    assert "nan" in tags["lgd.failure.terms"].lower() or "inf" in tags["lgd.failure.terms"].lower()
    rows = list(csv.DictReader((out / "tables" / "unstable.csv").open()))
    assert rows[0]["status"] == "failed" and rows[0]["ours"] == ""
    assert "| RetinaNet | failed |" in (out / "tables" / "unstable.md").read_text()


def test_console_shows_one_compact_view(finished_grid):
    _, out, first, _, _ = finished_grid
    text = first.stdout + first.stderr
    assert "Reporting training result" not in text and "iter 2/" not in text  # the workers' output: log files
    assert "Trial status:" not in text  # no Tune status tables
    assert "workers' output: " in text and "(--verbose prints it here)" in text
    _, runs = _runs(out)
    for r in (r for r in runs if r.data.tags.get("lgd.kind") == "trial" and r.data.tags["lgd.state"] == "done"):
        digest = r.data.tags["lgd.digest"]
        assert re.search(rf"\] start +trial-{digest}  cmp: RetinaNet / ", text)
        assert re.search(rf"\] done +trial-{digest}  MLflow run {r.info.run_id}", text)
    assert re.search(r"\] FAILED +trial-\w+  MLflow run \w+", text)  # the diverging trial
    # the status line (every second here): counts, each running trial's iteration of its total and loss
    assert re.search(r"\] \d+ done, \d+ running, \d+ pending, \d+ failed \| trial-\w{8} \d+/\d+ loss \d", text), text
    assert "lgd.trial INFO" not in text and "may be a performance bottleneck" not in text
    assert "Configuration for experiment" not in text and "View detailed results here" not in text


def test_second_run_of_a_completed_grid_launches_nothing(finished_grid):
    _, out, _, second, _ = finished_grid
    assert "2 already finished in MLflow, 1 to run" in second.stdout
    _, runs = _runs(out)
    trials = [r for r in runs if r.data.tags.get("lgd.kind") == "trial"]
    assert len(trials) == 3  # the diverging trial reused its run; nothing duplicated
    assert len([r for r in trials if r.data.tags["lgd.state"] == "done"]) == 2


def test_report_cli_reads_mlflow_only(finished_grid, tmp_path):
    path, out, _, _, _ = finished_grid
    for f in (out / "tables").glob("*"):
        f.unlink()
    r = subprocess.run([sys.executable, "orchestration/report.py", "--grid", str(path), "--output", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "| RetinaNet |" in r.stdout and (out / "tables" / "cmp.csv").exists()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracking_server_stops_before_any_trial(tmp_path):
    grid = write_grid(tmp_path, tiny_grid("unreachable", [
        {"name": "t", "dataset": "shapes", "rows": ["detector"], "columns": ["method"],
         "grid": [{"detector": ["retinanet"], "method": ["baseline"]}]}]))
    r = run_grid(grid, tmp_path / "out", "--tracking-uri", f"http://127.0.0.1:{_free_port()}", timeout=300)
    assert r.returncode == 2 and "is unreachable" in r.stderr
    assert not (tmp_path / "out" / "ray_storage").exists()


def test_one_trial_grid_against_a_real_mlflow_server_with_two_ddp_workers(tmp_path):
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        uri = f"http://127.0.0.1:{port}"
        client = MlflowClient(tracking_uri=uri)
        for _ in range(120):
            try:
                client.search_experiments()
                break
            except Exception:
                time.sleep(0.5)
        grid = write_grid(tmp_path, tiny_grid("served", [
            {"name": "t", "dataset": "shapes", "rows": ["detector"], "columns": ["method"],
             "grid": [{"detector": ["retinanet"], "method": ["lgd"]}]}], num_workers=2))
        r = run_grid(grid, tmp_path / "out", "--tracking-uri", uri, "--verbose")
        assert "world_rank=1" in r.stdout + r.stderr  # two DDP ranks trained this trial (--verbose: their output)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        exp = client.get_experiment_by_name("lgd-grid-served")
        runs = client.search_runs([exp.experiment_id])
        trial = [x for x in runs if x.data.tags.get("lgd.kind") == "trial"]
        assert len(trial) == 1 and trial[0].data.tags["lgd.state"] == "done" and "bbox/AP" in trial[0].data.metrics
        assert "metrics.json" in {a.path for a in client.list_artifacts(trial[0].info.run_id)}
    finally:
        server.terminate()
        server.wait(timeout=30)
