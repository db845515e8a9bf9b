"""The fidelity experiment's three answers, from MLflow alone (experiments/fidelity*.yaml):

1. does LGD's student beat the baseline at equal iterations (per seed, and mean +- std)?
2. is the teacher, which sees the labels, far above the student?
3. does either diverge?

    python orchestration/run_grid.py --grid experiments/fidelity_cpu.yaml
    python benchmarks/fidelity.py --grid experiments/fidelity_cpu.yaml [--output runs/fidelity_cpu]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from orchestration.grid import expand, load_grid  # noqa: E402
from orchestration.report import default_tracking_uri, experiment_name  # noqa: E402
from orchestration.tracking import Tracker, runs_by_digest, status_name  # noqa: E402


def trial_frame(grid_path: str, output: str | None, tracking_uri: str | None) -> pd.DataFrame:
    """One row per trial of the grid: detector, seed, method, status, student and teacher AP, failure."""
    grid = load_grid(grid_path)
    specs = expand(grid, require_data=False)
    out = Path(output or Path("runs") / grid.name)
    tracker = Tracker(tracking_uri or default_tracking_uri(out), experiment_name(grid))
    runs = runs_by_digest(tracker.trial_runs(grid.name))
    rows = []
    for s in specs:
        run = runs.get(s.digest)
        m = run.data.metrics if run is not None else {}
        rows.append({"detector": s.config["detector"], "seed": s.config["seed"],
                     "method": "lgd" if s.config["lgd"]["enabled"] else "baseline", "status": status_name(run),
                     "AP": m.get("bbox/AP"), "teacher_AP": m.get("teacher/bbox/AP"),
                     "failure": run.data.tags.get("lgd.failure", "") if run is not None else ""})
    return pd.DataFrame(rows)


def answers(df: pd.DataFrame) -> str:
    lines = []
    done = df[df.status == "done"]
    ap = done.pivot_table(index=["detector", "seed"], columns="method", values="AP")
    lines.append("Per seed (bbox AP of the student; teacher AP where LGD ran):")
    per_seed = ap.join(done[done.method == "lgd"].set_index(["detector", "seed"])["teacher_AP"])
    lines.append(per_seed.round(2).to_string())
    lines.append("")
    lines.append("1. LGD student vs baseline at equal iterations")
    for det, g in ap.groupby(level="detector"):
        g = g.dropna()
        if not {"baseline", "lgd"} <= set(g.columns) or g.empty:
            lines.append(f"   {det}: no seed with both runs finished")
            continue
        gain = g["lgd"] - g["baseline"]
        se = gain.std(ddof=1) / len(gain) ** 0.5 if len(gain) > 1 else float("nan")
        lines.append(f"   {det}: baseline {g['baseline'].mean():.2f} +- {g['baseline'].std(ddof=1):.2f}, "
                     f"LGD {g['lgd'].mean():.2f} +- {g['lgd'].std(ddof=1):.2f} (n={len(g)}); paired gain "
                     f"{gain.mean():+.2f} +- {se:.2f} (SE); LGD ahead in {(gain > 0).sum()} of {len(g)} seeds"
                     f"{'; within noise (|gain| < 2 SE)' if abs(gain.mean()) < 2 * se else ''}")
    lines.append("2. Teacher (sees the labels) vs its own student")
    lgd = done[done.method == "lgd"]
    for det, g in lgd.groupby("detector"):
        gap = g["teacher_AP"] - g["AP"]
        lines.append(f"   {det}: teacher {g['teacher_AP'].mean():.2f} +- {g['teacher_AP'].std(ddof=1):.2f}, "
                     f"student {g['AP'].mean():.2f}; teacher - student {gap.mean():+.2f} (min {gap.min():+.2f})")
    lines.append("3. Divergence and failures")
    bad = df[df.status != "done"]
    if bad.empty:
        lines.append(f"   none: all {len(df)} trials finished")
    for _, r in bad.iterrows():
        lines.append(f"   {r.detector} seed {r.seed} {r.method}: {r.status} {r.failure}".rstrip())
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--grid", required=True)
    p.add_argument("--output")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    args = p.parse_args(argv)
    print(answers(trial_frame(args.grid, args.output, args.tracking_uri)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
