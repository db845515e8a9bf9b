"""A grid under random worker loss, against the same grid without faults, measured in one run.

    python benchmarks/chaos.py [--grid experiments/quickstart.yaml] [--kills 5] [--seed 0]

Runs the grid once without faults, then again while SIGKILLing 4-6 of its Ray Train worker processes at
random moments (uniform over 5-75% of the fault-free run's training time, counted from the first worker's
start; the driver and Ray itself untouched, as a preempted or OOM-killed worker would be). Prints what it saw: trials finished / failed / resumed, worker
failures recorded in MLflow, steps lost or logged twice (against the fault-free run), and the wall-time
ratio. Each run uses its own local Ray (the driver's) and its own output folder.
"""
from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestration.chaos import train_worker_processes  # noqa: E402
from orchestration.grid import load_grid  # noqa: E402
from orchestration.report import experiment_name  # noqa: E402


def run_grid(grid: Path, out: Path, kill_at: list[float], log: Path) -> tuple[float, float, int, list[str]]:
    """Run the grid; SIGKILL one random train worker at each of ``kill_at`` seconds after the first worker
    started (if none is alive then, the next one to start). (wall s, first worker at s, exit code, kills)."""
    cmd = [sys.executable, str(ROOT / "orchestration" / "run_grid.py"), "--grid", str(grid), "--output", str(out)]
    kills: list[str] = []
    rng = random.Random(len(kill_at))
    with log.open("w") as f:
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        driver = psutil.Process(proc.pid)
        first = []

        def killer():
            while proc.poll() is None and not train_worker_processes(driver.pid):
                time.sleep(0.2)
            first.append(time.time() - t0)
            for at in kill_at:
                while time.time() - t0 < first[0] + at and proc.poll() is None:
                    time.sleep(0.1)
                while proc.poll() is None:  # a worker may be between attempts: wait for one
                    workers = train_worker_processes(driver.pid)
                    if workers:
                        victim = rng.choice(workers)
                        try:
                            victim.send_signal(signal.SIGKILL)
                            kills.append(f"{time.time() - t0:6.1f}s pid {victim.pid}")
                            break
                        except psutil.Error:
                            pass
                    time.sleep(0.2)

        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        code = proc.wait()
        wall = time.time() - t0
        thread.join(1)
    return wall, (first or [wall])[0], code, kills


def summary(grid_path: Path, out: Path) -> dict:
    grid = load_grid(grid_path)
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment_name(grid))
    runs = [r for r in client.search_runs([exp.experiment_id], max_results=1000) if r.data.tags.get("lgd.kind") == "trial"]
    trials = {}
    for r in runs:
        tags = r.data.tags
        trials[tags["lgd.digest"]] = {
            "state": tags.get("lgd.state"), "status": r.info.status,
            "failures": int(tags.get("lgd.worker_failures", 0)),
            "causes": [tags[k] for k in sorted(tags) if k.startswith("lgd.worker_failure.") and k.endswith(".cause")],
            "steps": [m.step for m in client.get_metric_history(r.info.run_id, "total_loss")],
        }
    return trials


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--grid", default=str(ROOT / "experiments" / "quickstart.yaml"))
    p.add_argument("--kills", type=int, help="worker kills (default: 4-6, drawn with --seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=str(ROOT / "runs" / "chaos-benchmark"))
    args = p.parse_args(argv)
    out = Path(args.output)
    if out.exists():
        print(f"error: {out} exists; give a fresh --output", file=sys.stderr)
        return 2
    out.mkdir(parents=True)
    grid = Path(args.grid).resolve()
    rng = random.Random(args.seed)

    clean_wall, clean_first, clean_code, _ = run_grid(grid, out / "clean", [], out / "clean.log")
    clean = summary(grid, out / "clean")
    n = args.kills or rng.randint(4, 6)
    kill_at = sorted(rng.uniform(0.05, 0.75) * (clean_wall - clean_first) for _ in range(n))
    chaos_wall, chaos_first, chaos_code, kills = run_grid(grid, out / "chaos", kill_at, out / "chaos.log")
    chaos = summary(grid, out / "chaos")

    states = Counter(t["state"] for t in chaos.values())
    lost = sum(len(set(clean[d]["steps"]) - set(t["steps"])) for d, t in chaos.items() if d in clean)
    doubled = sum(len(t["steps"]) - len(set(t["steps"])) for t in chaos.values())
    running = [d for d, t in chaos.items() if t["status"] == "RUNNING"]
    print(f"grid {grid.name}: {len(clean)} trials; fault-free run exit {clean_code}, "
          f"{sum(t['state'] == 'done' for t in clean.values())} done, {clean_wall:.0f} s")
    print(f"{len(kills)} of {n} planned worker kills (first worker at {chaos_first:.0f} s) at: " + "; ".join(kills))
    print(f"with kills: exit {chaos_code}; trials finished {states.get('done', 0)}, failed {states.get('failed', 0)}, "
          f"other {len(chaos) - states.get('done', 0) - states.get('failed', 0)}; "
          f"resumed after a worker loss {sum(t['failures'] > 0 for t in chaos.values())} "
          f"({sum(t['failures'] for t in chaos.values())} worker failures recorded); runs left RUNNING {len(running)}")
    print(f"steps lost {lost}, steps logged twice {doubled} (of {sum(len(t['steps']) for t in clean.values())})")
    print(f"wall time {chaos_wall:.0f} s vs {clean_wall:.0f} s fault-free: {chaos_wall / clean_wall:.2f}x")
    for d, t in sorted(chaos.items()):
        for c in t["causes"]:
            print(f"  {d}: {c[:110]}")
    return 0 if chaos_code == 0 and not lost and not doubled and not running else 1


if __name__ == "__main__":
    sys.exit(main())
