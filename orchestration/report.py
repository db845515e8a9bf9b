"""MLflow runs + the paper's reference numbers -> tables (Markdown, LaTeX, CSV), plots and an HTML report.

    python orchestration/report.py --grid experiments/paper_tables.yaml [--output DIR] [--tracking-uri URI]

Reads MLflow only (and the grid file for the layout); never the trials' own files.
"""
from __future__ import annotations

import argparse
import csv
import html
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from orchestration.grid import Grid, TableSpec, TrialSpec, expand, load_grid
from orchestration.tracking import TAG_DIGEST, Tracker, runs_by_digest, status_name

REFERENCE = Path(__file__).resolve().parents[1] / "experiments" / "paper_reference.yaml"


@dataclass
class CellResult:
    status: str  # done | failed | running | stopped | missing | paper-only
    value: Optional[float] = None
    paper: Optional[float] = None
    run_id: Optional[str] = None

    def ours(self) -> str:
        if self.value is not None:
            return f"{self.value:.1f}"
        return {"missing": "—", "paper-only": "n/a"}.get(self.status, self.status)

    def delta(self) -> str:
        if self.value is None or self.paper is None:
            return ""
        return f"{self.value - self.paper:+.1f}"


@dataclass
class TableResult:
    spec: TableSpec
    title: str
    rows: list[str]
    columns: list[str]
    cells: dict[tuple[str, str], CellResult]


def load_reference(path: Path = REFERENCE) -> dict:
    return yaml.safe_load(path.read_text()) if path.exists() else {}


def collect(grid: Grid, specs: list[TrialSpec], runs: dict, reference: dict) -> list[TableResult]:
    """Fill every table cell from the MLflow run of its trial (by digest), beside the paper's number."""
    out = []
    for table in grid.tables:
        ref = reference.get(table.paper or "", {}) if table.paper else {}
        ref_rows = ref.get("rows", {})
        cells: dict[tuple[str, str], CellResult] = {}
        placed = sorted(((c, spec) for spec in specs for c in spec.cells if c.table == table.name),
                        key=lambda cs: cs[0].index)
        rows = list(dict.fromkeys(c.row for c, _ in placed))
        cols = list(dict.fromkeys(c.column for c, _ in placed))
        for c, spec in placed:
            run = runs.get(spec.digest)
            status = status_name(run)
            value = run.data.metrics.get(table.metric) if run is not None and status == "done" else None
            paper = ref_rows.get(c.row, {}).get(c.column)
            cells[(c.row, c.column)] = CellResult(status, value, paper, run.info.run_id if run else None)
        ref_cols = list(ref.get("columns", []))
        for col in ref_cols:  # comparator columns known from the paper only
            if col not in cols:
                for row in rows:
                    cells[(row, col)] = CellResult("paper-only", None, ref_rows.get(row, {}).get(col))
        cols = ref_cols + [c for c in cols if c not in ref_cols]  # the paper's order first
        out.append(TableResult(table, table.title or ref.get("title", table.name), rows, cols, cells))
    return out


def _header(t: TableResult) -> list[str]:
    head = [" / ".join(t.spec.rows) or "row"]
    for col in t.columns:
        head += [f"{col} (ours)", f"{col} (paper)", "Δ"]
    return head


def _body(t: TableResult) -> list[list[str]]:
    body = []
    for row in t.rows:
        line = [row]
        for col in t.columns:
            c = t.cells.get((row, col), CellResult("missing"))
            line += [c.ours(), "" if c.paper is None else f"{c.paper:.1f}", c.delta()]
        body.append(line)
    return body


def to_markdown(t: TableResult) -> str:
    head = _header(t)
    lines = [f"### {t.title}", "", f"metric: `{t.spec.metric}`", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in _body(t)]
    return "\n".join(lines) + "\n"


def to_latex(t: TableResult) -> str:
    def esc(s: str) -> str:
        for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                     ("λ", r"$\lambda$"), ("Δ", r"$\Delta$"), ("—", "--")):
            s = s.replace(a, b)
        return s

    head = _header(t)
    lines = [r"\begin{table}[t]", r"\centering", r"\begin{tabular}{l" + "c" * (len(head) - 1) + "}", r"\toprule",
             " & ".join(esc(h) for h in head) + r" \\", r"\midrule"]
    lines += [" & ".join(esc(x) for x in r) + r" \\" for r in _body(t)]
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{esc(t.title)}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_csv(t: TableResult) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["table", "row", "column", "status", "ours", "paper", "delta", "run_id"])
    for row in t.rows:
        for col in t.columns:
            c = t.cells.get((row, col), CellResult("missing"))
            w.writerow([t.spec.name, row, col, c.status, "" if c.value is None else f"{c.value:.3f}",
                        "" if c.paper is None else c.paper, c.delta(), c.run_id or ""])
    return buf.getvalue()


def run_summary(specs: list[TrialSpec], runs: dict) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in specs:
        st = status_name(runs.get(s.digest))
        counts[st] = counts.get(st, 0) + 1
    return counts


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plots(tables: list[TableResult], specs: list[TrialSpec], runs: dict, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    lam = [(s, runs.get(s.digest)) for s in specs]
    pts = sorted((s.config["lgd"]["distill_weight"], r.data.metrics.get("bbox/AP")) for s, r in lam
                 if r is not None and status_name(r) == "done" and s.config["lgd"]["enabled"]
                 and any(c.column.startswith("λ=") for c in s.cells))
    if pts:
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="ours")
        ax.set_xscale("log")
        ax.set_xlabel("λ (distillation weight)")
        ax.set_ylabel("box AP")
        ax.set_title("AP vs λ")
        made.append(_save(fig, out / "ap_vs_lambda.png"))
    # Figure 3 in spirit: the gain of LGD over the baseline against the baseline's strength.
    gains = []
    for t in tables:
        if "Baseline" in t.columns and "Ours" in t.columns:
            for row in t.rows:
                b, o = t.cells.get((row, "Baseline")), t.cells.get((row, "Ours"))
                if b and o and b.value is not None and o.value is not None:
                    gains.append((b.value, o.value - b.value, f"{t.spec.name}: {row}"))
    if gains:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        ax.scatter([g[0] for g in gains], [g[1] for g in gains])
        for x, y, label in gains:
            ax.annotate(label, (x, y), fontsize=6)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("baseline AP")
        ax.set_ylabel("AP gain of LGD")
        ax.set_title("Gain vs detector strength (cf. Fig. 3)")
        made.append(_save(fig, out / "gain_vs_strength.png"))
    return made


def write_reports(grid: Grid, specs: list[TrialSpec], tracker: Tracker, out_dir: Path,
                  reference: dict | None = None) -> str:
    """Write tables/<name>.{md,tex,csv}, report.md, report.html and plots; return the Markdown text."""
    reference = load_reference() if reference is None else reference
    runs = runs_by_digest(r for r in tracker.trial_runs() if r.data.tags.get(TAG_DIGEST))
    tables = collect(grid, specs, runs, reference)
    tdir = out_dir / "tables"
    tdir.mkdir(parents=True, exist_ok=True)
    for t in tables:
        (tdir / f"{t.spec.name}.md").write_text(to_markdown(t))
        (tdir / f"{t.spec.name}.tex").write_text(to_latex(t))
        (tdir / f"{t.spec.name}.csv").write_text(to_csv(t))
    summary = run_summary(specs, runs)
    plots = _plots(tables, specs, runs, out_dir)
    early = sorted({c.table for s in specs if s.scheduler for c in s.cells})
    runs_line = "Runs: " + ", ".join(f"{k} {v}" for k, v in sorted(summary.items())) + f" (of {len(specs)} trials)"
    md = [f"# Reproduction report: {grid.name}", "", grid.description, "", runs_line, ""]
    if early:
        md += [f"Early stopping (ASHA) was allowed in: {', '.join(early)}; a stopped cell shows `stopped`.", ""]
    md += [to_markdown(t) for t in tables]
    md += [f"![{p.stem}]({p.name})" for p in plots]
    text = "\n".join(md) + "\n"
    (out_dir / "report.md").write_text(text)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    body = []
    for t in tables:
        rows = "".join("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in r) + "</tr>" for r in _body(t))
        head = "".join(f"<th>{html.escape(h)}</th>" for h in _header(t))
        body.append(f"<h3>{html.escape(t.title)}</h3><p>metric: {html.escape(t.spec.metric)}</p>"
                    f"<table border=1 cellspacing=0 cellpadding=3><tr>{head}</tr>{rows}</table>")
    body += [f'<p><img src="{p.name}" alt="{p.stem}"></p>' for p in plots]
    (out_dir / "report.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(grid.name)}</title></head><body>"
        f"<h1>Reproduction report: {html.escape(grid.name)}</h1><p>{html.escape(grid.description)}</p>"
        f"<p>{html.escape(runs_line)}</p>{''.join(body)}</body></html>\n")
    return text


def default_tracking_uri(output: Path) -> str:
    return f"sqlite:///{(output / 'mlflow.db').resolve()}"


def experiment_name(grid: Grid) -> str:
    return f"lgd-grid-{grid.name}"


def main(argv: list[str] | None = None) -> int:
    import os

    from lgd.typed import ConfigError

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--grid", required=True)
    p.add_argument("--output", help="folder of the grid's outputs (default runs/<grid name>)")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    args = p.parse_args(argv)
    try:
        grid = load_grid(args.grid)
        specs = expand(grid, require_data=False)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.output or Path("runs") / grid.name)
    tracker = Tracker(args.tracking_uri or default_tracking_uri(out), experiment_name(grid))
    tracker.check()
    print(write_reports(grid, specs, tracker, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
