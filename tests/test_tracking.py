"""The MLflow tracker against a real server: a brief outage loses no metric, runs are found by digest."""
import socket
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from orchestration.tracking import Tracker, TrackingUnavailable


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server(tmp_path, port):
    p = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                          "--backend-store-uri", f"sqlite:///{tmp_path / 'store.db'}",
                          "--artifacts-destination", str(tmp_path / "art"), "--workers", "1"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
    for _ in range(240):
        try:
            client.search_experiments(max_results=1)
            return p
        except Exception:
            time.sleep(0.25)
    p.kill()
    raise RuntimeError("mlflow server did not come up")


def test_brief_outage_loses_no_metric(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    port = _port()
    server = _server(tmp_path, port)
    tracker = Tracker(f"http://127.0.0.1:{port}", "outage", retries=1, backoff_s=0.1)
    try:
        tracker.check()
        parent = tracker.start_parent("g", {}, resume=False)
        run_id, last = tracker.trial_run("abc123", "g", parent, {"a": {"b": 1}}, [], {})
        assert last == 0
        tracker.log_metrics(run_id, {"total_loss": 1.0}, 2)
        server.terminate()
        server.wait(timeout=30)
        with pytest.raises(TrackingUnavailable):
            tracker.check()
        tracker.log_metrics(run_id, {"total_loss": 0.9}, 4)  # the store is down: kept, not lost
        tracker.log_metrics(run_id, {"total_loss": 0.8}, 6)
        server = _server(tmp_path, port)
        tracker.log_metrics(run_id, {"total_loss": 0.7}, 8)
        tracker.finish(run_id, "done")
        hist = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}").get_metric_history(run_id, "total_loss")
        assert sorted(m.step for m in hist) == [2, 4, 6, 8]
        # the run is found again by its digest, and counts as finished
        assert tracker.finished_digests() == {"abc123"}
        again = Tracker(f"http://127.0.0.1:{port}", "outage")
        assert again.trial_runs("g")[0].data.params["a.b"] == "1"
    finally:
        server.terminate()
        server.wait(timeout=30)
