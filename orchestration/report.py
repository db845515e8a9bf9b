"""MLflow runs + the paper's reference numbers -> one pandas DataFrame -> the paper's tables (Markdown, LaTeX,
CSV, HTML, each written by pandas), plots with error bars and a report page.

    python orchestration/report.py --grid experiments/paper_tables.yaml [--output DIR] [--tracking-uri URI]

Reads MLflow only (the grid's own trial runs, in one paged search) and the grid file for the layout; never the
trials' own files. The rules every report states:

- A cell with several runs (``seeds: N`` on its table) shows mean ± sample std and n.
- Gains are taken against the table's reference: its ``Baseline`` column (per row), else its ``Baseline`` row
  (per column), else the first column our runs fill (a λ sweep: per λ against our first λ). A gain shows its
  standard error sqrt(s1²/n1 + s2²/n2) and Welch's t-test (unequal variances): p >= 0.05 is marked "within
  noise"; with fewer than 2 runs on either side it is marked "n=1, no test".
- The paper's absolute numbers are shown beside ours only when the table's dataset is the paper's (``paper: true``
  on the dataset; never a synthetic one). Otherwise only gains are compared: ours against the paper's gain for
  the same row and column.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import html
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if __name__ == "__main__":  # a short batch process: the cyclic collector would rescan the millions of objects that
    gc.disable()  # its imports and the bulk read create, again and again (~1 s of ~5); reference counting frees them

import numpy as np
import pandas as pd
import yaml

from orchestration.grid import AXES, Grid, TableSpec, TrialSpec, expand, load_grid
from orchestration.tracking import Tracker, TrackingUnavailable, flatten, runs_by_digest, status_name

REFERENCE = Path(__file__).resolve().parents[1] / "experiments" / "paper_reference.yaml"
BASELINE = "Baseline"
ALPHA = 0.05  # Welch's t-test level below which a gain is taken as more than noise
SIGNIFICANT, WITHIN_NOISE, NO_TEST = "significant", "within noise", "n=1, no test"
ZERO_VARIANCE = "no test: zero variance"  # both sides n >= 2 but every run gave the same value
STATISTICS_RULE = (
    "Cells show the mean ± sample standard deviation over their runs (seeds) and n, the number of finished runs. "
    "A gain is a cell's mean minus the mean of the table's reference (its Baseline column, else its Baseline row, "
    "else the first column our runs fill), ± its standard error sqrt(s1²/n1 + s2²/n2). It is marked 'within "
    f"noise' when Welch's t-test (unequal variances) gives p >= {ALPHA:g}, and 'n=1, no test' when either side "
    "has fewer than 2 runs. For a metric where lower is better (CrowdHuman's mMR) a gain is the reference's mean "
    "minus the cell's: a positive gain is an improvement in every table.")
PAPER_RULE = ("The paper's absolute numbers are shown beside ours only for a dataset marked `paper: true` in the grid "
              "(the one the paper's table reports on: MS-COCO, Pascal VOC or CrowdHuman); elsewhere (synthetic or "
              "other data) only gains are compared: ours beside the paper's gain for the same row and column.")
LOWER_IS_BETTER = frozenset({"crowdhuman/mMR"})  # metrics where smaller is better: gains are reference − ours
# what a trial cost (recorded by the trial recorder; Table 7): a cell is compared with its reference as a ratio,
# which carries across clusters where hours do not (the paper: 23.5 / 12.1 h on 8 V100 = 1.94x)
COST_METRICS = frozenset({"wall_clock_h", "wall_clock_s", "gpu_hours", "cpu_hours", "train_time_s"})
_STATUS_ORDER = ("failed", "interrupted", "running", "stopped", "done", "missing")  # an empty cell shows the first
_LATEX_TEXT = {"±": r"$\pm$", "λ": r"$\lambda$", "Δ": r"$\Delta$", "−": "$-$", "—": "---", "≈": r"$\approx$"}
_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1200px;padding:0 1em}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table.lgd{border-collapse:collapse;margin:.6em 0 1.4em;font-variant-numeric:tabular-nums}
table.lgd caption{caption-side:top;text-align:left;font-weight:600;padding:.3em 0}
.scroll{overflow-x:auto}table.lgd th,table.lgd td{border:1px solid #d0d0d5;padding:.3em .6em;text-align:right}
table.lgd td{white-space:nowrap}table.lgd th{background:#f2f2f5;max-width:11em}
table.lgd td:first-child{text-align:left;font-weight:600}table.failures td{text-align:left;white-space:normal}
.note{color:#555;font-size:.9em;margin-top:-.8em}
td.significant{background:#e7f6e7}td.noise{color:#777;font-style:italic;background:#f7f7f7}
td.notest{color:#777}td.failed,td.interrupted{background:#fde8e8;color:#a40000}td.stopped,td.running{background:#fff6dc}
td.missing{color:#aaa}.rule{background:#f7f7fa;border-left:4px solid #99a;padding:.5em .8em}
.summary td,.summary th{padding:.2em .8em}img.plot{max-width:48%;border:1px solid #eee;margin:.3em}
pre{white-space:pre-wrap;font-size:.85em;background:#f7f7f7;padding:.5em}
"""


def load_reference(path: Path = REFERENCE) -> dict:
    return yaml.safe_load(path.read_text()) if path.exists() else {}


# --- MLflow runs -> one DataFrame ---------------------------------------------------------------------------
@contextlib.contextmanager
def _without_cyclic_gc():
    """For one bulk read: MLflow's search builds ~100 ORM objects per run and CPython's cyclic collector would
    rescan the whole heap many times meanwhile (~60% of the search over 1,000 runs). Reference counting still
    frees everything; the collector is back on (if it was) when the block ends."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _axes(config: dict) -> dict[str, Any]:
    """The config's value on every named axis, as a grid file writes it (method: baseline/lgd, scale: ss/ms)."""
    out, flat = {}, flatten(config)
    for axis, (path, mapping) in AXES.items():
        v = flat.get(path)
        if mapping is not None:
            v = {cv: name for name, cv in mapping.items()}.get(v, v)
        out[axis] = v
    if not config.get("lgd", {}).get("enabled"):
        out["lambda"] = None  # a baseline has no distillation weight
    return out


def _reason(tags: dict) -> str:
    """Why a run failed: its recorder's ``lgd.failure`` (short), else the last line of ``lgd.error``."""
    failure, error = tags.get("lgd.failure"), tags.get("lgd.error")
    if failure:
        it = tags.get("lgd.failure.iteration")
        return failure + (f" (iteration {it})" if it not in (None, "", "None") and f"iteration {it}" not in failure
                          else "")
    return next((ln.strip() for ln in reversed((error or "").splitlines()) if ln.strip()), "")


def runs_frame(specs: list[TrialSpec], runs: list) -> pd.DataFrame:
    """One row per (trial, table cell): table, row, column, order, digest, config axes, status, run id, failure
    reason, and every metric of the trial's run as ``metrics.<name>`` (a trial without a run: ``missing``)."""
    best = runs_by_digest(runs)
    trials, places = [], []
    for s in specs:
        run = best.get(s.digest)
        rec = {"digest": s.digest, **_axes(s.config), "status": status_name(run),
               "run_id": run.info.run_id if run is not None else None,
               "reason": _reason(run.data.tags) if run is not None else "",
               "error": (run.data.tags.get("lgd.error") or "") if run is not None else ""}
        if run is not None:
            rec.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
        trials.append(rec)
        places += [(s.digest, c.table, c.row, c.column, c.index) for c in s.cells]
    placed = pd.DataFrame(places, columns=["digest", "table", "row", "column", "order"])
    return placed.merge(pd.DataFrame.from_records(trials), on="digest", how="left")


# --- one table: cells (tidy) -> gains -> the paper's layout ---------------------------------------------------
@dataclass
class TableResult:
    spec: TableSpec
    title: str
    rows: list[str]
    columns: list[str]  # the paper's order first, then ours
    ours_columns: list[str]  # columns our trials fill (the others are the paper's comparators)
    paper_dataset: bool  # the table's dataset is the one the paper reports on
    reference: tuple[str, str] | None  # ("column" | "row", label) the gains are taken against
    cells: pd.DataFrame  # one row per (row, column): status, runs, n, mean, std, run_ids, paper, gains, verdict
    lower_is_better: bool = False  # the metric is in LOWER_IS_BETTER: every gain is reference − cell
    ratio: bool = False  # the metric is in COST_METRICS: every gain is cell / reference


def _reference(rows: list[str], columns: list[str], ours: list[str]) -> tuple[str, str] | None:
    """The cell every gain is taken against: the Baseline column, else the Baseline row, else our first column."""
    if BASELINE in columns and len(columns) > 1:
        return "column", BASELINE
    if BASELINE in rows and len(rows) > 1:
        return "row", BASELINE
    if len(columns) > 1 and ours:
        return "column", ours[0]
    return None


def _aggregate(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Runs of one table -> one row per cell: status, runs, n, mean, std (ddof 1), run ids."""
    col = f"metrics.{metric}"
    values = frame[col].where(frame["status"] == "done") if col in frame else pd.Series(np.nan, index=frame.index)
    g = frame.assign(value=values).groupby(["row", "column"], sort=False)
    cells = g.agg(order=("order", "min"), runs=("digest", "size"), n=("value", "count"), mean=("value", "mean"),
                  std=("value", "std"))
    cells["status"] = g["status"].agg(lambda s: next((x for x in _STATUS_ORDER if x in set(s)), s.iloc[0]))
    cells["run_ids"] = g["run_id"].agg(lambda s: [r for r in s if isinstance(r, str)])
    cells.loc[cells["n"] > 0, "status"] = "done"
    return cells.reset_index()


def _gains(cells: pd.DataFrame, reference: tuple[str, str] | None, lower_is_better: bool = False,
           ratio: bool = False) -> pd.DataFrame:
    """Gain of every cell over its reference cell (same row or column): ours with SE and Welch's test, the paper's;
    for a metric where lower is better, the reference minus the cell (a positive gain is an improvement); for a
    cost, the cell over the reference (SE by the delta method; the test is still whether the means differ)."""
    cells = cells.copy()
    for k in ("gain", "gain_se", "p_value", "paper_gain"):
        cells[k] = np.nan
    cells["verdict"] = ""
    cells["reference"] = ""
    if reference is None:
        return cells
    axis, label = reference
    key, other = ("row", "column") if axis == "column" else ("column", "row")
    ref = cells[cells[other] == label].set_index(key)
    mine = cells[other] != label
    r = ref.reindex(cells[key]).set_axis(cells.index)
    cells.loc[mine, "reference"] = label
    sign = -1.0 if lower_is_better else 1.0
    both = mine & (cells["n"] >= 2) & (r["n"] >= 2)
    if ratio:
        cells["gain"] = (cells["mean"] / r["mean"]).where(mine)
        cells["paper_gain"] = (cells["paper"] / r["paper"]).where(mine)
        relative = (cells["std"] / cells["mean"]) ** 2 / cells["n"] + (r["std"] / r["mean"]) ** 2 / r["n"]
        cells["gain_se"] = (cells["gain"] * np.sqrt(relative)).where(both)
    else:
        cells["gain"] = (sign * (cells["mean"] - r["mean"])).where(mine)
        cells["paper_gain"] = (sign * (cells["paper"] - r["paper"])).where(mine)
        cells["gain_se"] = np.sqrt(cells["std"] ** 2 / cells["n"] + r["std"] ** 2 / r["n"]).where(both)
    if both.any():  # Welch's t-test from each side's mean, std and n (= scipy.stats.ttest_ind(equal_var=False))
        from scipy import stats  # only where cells have seeds: its import costs ~0.4 s

        with np.errstate(all="ignore"):
            a, b = (x.loc[both, ["mean", "std", "n"]].to_numpy(float).T for x in (cells, r))
            t = stats.ttest_ind_from_stats(*a, *b, equal_var=False)
        cells.loc[both, "p_value"] = np.asarray(t.pvalue, dtype=float)
    has_gain = cells["gain"].notna()
    cells.loc[has_gain, "verdict"] = NO_TEST
    cells.loc[both & has_gain, "verdict"] = np.where(
        cells.loc[both & has_gain, "p_value"].isna(), ZERO_VARIANCE,
        np.where(cells.loc[both & has_gain, "p_value"] < ALPHA, SIGNIFICANT, WITHIN_NOISE))
    return cells


def collect(grid: Grid, frame: pd.DataFrame, reference: dict) -> list[TableResult]:
    """Every table of the grid from the runs frame, beside the paper's numbers (absolute or gains only)."""
    out = []
    for table in grid.tables:
        ref = reference.get(table.paper or "", {}) if table.paper else {}
        ref_rows = ref.get("rows", {}) or {}
        sub = frame[frame["table"] == table.name].sort_values("order", kind="stable")
        cells = _aggregate(sub, table.metric)
        rows, ours = list(dict.fromkeys(cells["row"])), list(dict.fromkeys(cells["column"]))
        paper_cols = [c for c in ref.get("columns", []) if c not in ours]  # comparators known from the paper only
        if paper_cols and rows:
            extra = pd.DataFrame([(r, c) for c in paper_cols for r in rows], columns=["row", "column"])
            cells = pd.concat([cells, extra.assign(runs=0, n=0, status="paper-only")], ignore_index=True)
        cells["paper"] = [ref_rows.get(r, {}).get(c, np.nan) for r, c in zip(cells["row"], cells["column"])]
        cells["paper"] = cells["paper"].astype(float)
        columns = list(ref.get("columns", [])) + [c for c in ours if c not in ref.get("columns", [])]
        reference_cell = _reference(rows, columns, ours)
        lower, ratio = table.metric in LOWER_IS_BETTER, table.metric in COST_METRICS
        cells = _gains(cells, reference_cell, lower, ratio)
        out.append(TableResult(table, table.title or ref.get("title", table.name), rows, columns, ours,
                               grid.datasets[table.dataset].paper, reference_cell, cells, lower_is_better=lower,
                               ratio=ratio))
    return out


# --- text of a cell ----------------------------------------------------------------------------------------
def _ours_text(c) -> str:
    if c.n == 0:
        return {"missing": "—", "paper-only": "", "done": "no value"}.get(c.status, c.status)
    s = f"{c.mean:.1f}" + (f" ± {c.std:.2f}" if c.n >= 2 else "")
    if c.runs > 1 or c.n > 1:
        s += f" (n={c.n})" if c.n == c.runs else f" (n={c.n} of {c.runs})"
    return s


def _gain_text(c, ratio: bool = False) -> str:
    if pd.isna(c.gain):
        return ""
    g = f"{c.gain:.2f}x" if ratio else f"{c.gain:+.1f}"
    if c.verdict == NO_TEST:
        return f"{g} ({NO_TEST})"
    p = "p<0.001" if c.p_value < 0.001 else f"p={c.p_value:.3f}" if pd.notna(c.p_value) else ZERO_VARIANCE
    return f"{g} ± {c.gain_se:.2f} ({'within noise, ' if c.verdict == WITHIN_NOISE else ''}{p})"


def _num(x: float, sign: bool = False, ratio: bool = False) -> str:
    return "" if pd.isna(x) else f"{x:.2f}x" if ratio else f"{x:+.1f}" if sign else f"{x:.1f}"


def _cell_class(c, field: str) -> str:
    if field == "gain":
        return {SIGNIFICANT: "significant", WITHIN_NOISE: "noise", NO_TEST: "notest", ZERO_VARIANCE: "notest"}.get(
            c.verdict, "")
    return c.status if field == "ours" and c.status != "done" else ""


def layout(t: TableResult) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The table in the paper's layout (one row per table row; per column: ours, the paper's number and ours −
    paper on the paper's dataset, then the gain over the reference, ours and the paper's), pivoted from the cells;
    and the same-shaped frame of CSS classes (the HTML's marks)."""
    c = t.cells.assign(
        ours=[_ours_text(x) for x in t.cells.itertuples()],
        gain_txt=[_gain_text(x, t.ratio) for x in t.cells.itertuples()],
        paper_txt=t.cells["paper"].map(_num), delta=(t.cells["mean"] - t.cells["paper"]).map(lambda x: _num(x, True)),
        paper_gain_txt=t.cells["paper_gain"].map(lambda x: _num(x, True, t.ratio)),
        ours_cls=[_cell_class(x, "ours") for x in t.cells.itertuples()],
        gain_cls=[_cell_class(x, "gain") for x in t.cells.itertuples()])
    c["empty"] = ""
    wide = c.pivot(index="row", columns="column").reindex(t.rows)
    head = " / ".join(t.spec.rows) or "row"
    text, cls = {head: list(t.rows)}, {head: [""] * len(t.rows)}
    orient, ref = t.reference or ("", "")

    def add(name: str, field: str, css: str = "empty"):
        vals = wide[field].get(col, pd.Series("", index=wide.index)).fillna("")
        if (vals != "").any():
            text[name] = list(vals)
            cls[name] = list(wide[css].get(col, pd.Series("", index=wide.index)).fillna(""))

    for col in t.columns:
        if col in t.ours_columns:
            add(col, "ours", "ours_cls")
        if t.paper_dataset:
            add(f"{col} (paper)", "paper_txt")
            if col in t.ours_columns:
                add(f"{col}: ours − paper", "delta")
        if orient == "column" and col != ref or orient == "row":
            gain = (f"{col} / {ref}" if t.ratio else f"{ref} − {col}" if t.lower_is_better else f"{col} − {ref}") \
                if orient == "column" else f"{col}: {'ratio to' if t.ratio else 'gain over'} {ref} row"
            if col in t.ours_columns:
                add(gain, "gain_txt", "gain_cls")
            add(f"{gain} (paper)", "paper_gain_txt")
    return pd.DataFrame(text), pd.DataFrame(cls)


def tidy(t: TableResult) -> pd.DataFrame:
    """The table's cells one per line, numbers unformatted (the CSV); no paper absolutes off the paper's dataset."""
    c = t.cells.sort_values(["order"], kind="stable", na_position="last")
    out = pd.DataFrame({"table": t.spec.name, "row": c["row"], "column": c["column"], "status": c["status"],
                        "ours": c["mean"].round(3), "std": c["std"].round(3), "n": c["n"], "runs": c["runs"]})
    if t.paper_dataset:
        out["paper"] = c["paper"]
        out["ours_minus_paper"] = (c["mean"] - c["paper"]).round(3)
    out["reference"] = c["reference"]
    out["gain"] = c["gain"].round(3)
    out["gain_se"] = c["gain_se"].round(3)
    out["p_value"] = c["p_value"].round(4)
    out["verdict"] = c["verdict"]
    out["paper_gain"] = c["paper_gain"].round(3)
    out["run_id"] = c["run_ids"].map(lambda ids: ";".join(ids) if isinstance(ids, list) else "")
    return out


# --- writers (pandas') ------------------------------------------------------------------------------------
def _comparison_note(t: TableResult) -> str:
    if not t.spec.paper:
        return "no paper reference for this table"
    if t.paper_dataset:
        return f"the paper's numbers ({t.spec.paper}) beside ours; same dataset"
    return (f"dataset {t.spec.dataset!r} is not the paper's: only gains are compared with the paper's "
            f"({t.spec.paper}); its absolute numbers are not shown")


def _caption(t: TableResult) -> str:
    ref = f"; gains over {t.reference[1]} ({t.reference[0]})" if t.reference else ""
    if t.reference and t.lower_is_better:
        ref += " (lower is better: a gain is the reference minus ours, positive = better)"
    if t.reference and t.ratio:
        ref = ref.replace("; gains over", "; cost as a ratio to")
    return f"metric: `{t.spec.metric}`{ref}; {_comparison_note(t)}"


def _markdown(frame: pd.DataFrame) -> str:
    """pandas' Markdown (tabulate's pipe table), cells as written: unpadded, not re-parsed as numbers."""
    return frame.to_markdown(index=False, stralign=None, numalign=None, disable_numparse=True)


def to_markdown(t: TableResult) -> str:
    text, _ = layout(t)
    return f"### {t.title}\n\n{_caption(t)}\n\n{_markdown(text)}\n"


def _latex_text(s: str) -> str:
    for a, b in _LATEX_TEXT.items():
        s = s.replace(a, b)
    return s


def to_latex(t: TableResult) -> str:
    text, _ = layout(t)
    caption = t.title
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#")):
        caption = caption.replace(a, b)  # pandas escapes the cells, not the caption
    tex = text.to_latex(index=False, escape=True, caption=caption, label=f"tab:{t.spec.name}", position="t",
                        column_format="l" + "r" * (text.shape[1] - 1))
    return _latex_text(tex)


def to_csv(t: TableResult) -> str:
    return tidy(t).to_csv(index=False)


def to_html(t: TableResult) -> str:
    text, cls = layout(t)
    st = (text.style.hide(axis="index").format(escape="html").format_index(escape="html", axis=1)
          .set_td_classes(cls).set_caption(html.escape(t.title))
          .set_table_attributes(f'class="lgd" data-table="{html.escape(t.spec.name)}"'))
    return st.to_html()


# --- plots ------------------------------------------------------------------------------------------------
def _figure(size: tuple[float, float]):
    from matplotlib.figure import Figure  # no pyplot: no global figure registry, no GUI backend

    fig = Figure(figsize=size, layout="tight")
    return fig, fig.subplots()


def _plots(tables: list[TableResult], out: Path) -> list[Path]:
    made = []
    sweeps = [t for t in tables if t.spec.rows and any(c.startswith("λ=") for c in t.ours_columns)]
    series = []
    for t in sweeps:
        done = t.cells[t.cells["column"].str.startswith("λ=") & (t.cells["n"] > 0)]
        for row, d in done.groupby("row", sort=False):
            lam = d["column"].str.removeprefix("λ=").astype(float)
            series.append((f"{t.spec.name}: {row}", d.assign(lam=lam).sort_values("lam")))
    if series:
        fig, ax = _figure((4.8, 3.4))
        for label, d in series:
            ax.errorbar(d["lam"], d["mean"], yerr=d["std"].fillna(0), fmt="o-", capsize=3, label=label)
        ax.set_xscale("log")
        ax.set_xlabel("λ (distillation weight)")
        ax.set_ylabel("AP (mean ± std over seeds)")
        ax.set_title("AP vs λ")
        ax.legend(fontsize=7)
        fig.savefig(out / "ap_vs_lambda.png", dpi=110)
        made.append(out / "ap_vs_lambda.png")
    # Figure 3 in spirit: the gain of LGD over the baseline against the baseline's strength.
    pts = []
    for t in tables:
        if t.reference == ("column", BASELINE) and "Ours" in t.ours_columns and not (t.lower_is_better or t.ratio):
            c = t.cells.set_index(["row", "column"])
            for row in t.rows:
                b, o = c.loc[(row, BASELINE)], c.loc[(row, "Ours")]
                if b["n"] > 0 and o["n"] > 0:
                    pts.append((b["mean"], b["std"], o["gain"], o["gain_se"], f"{t.spec.name}: {row}"))
    if pts:
        p = pd.DataFrame(pts, columns=["x", "xerr", "y", "yerr", "label"]).fillna({"xerr": 0, "yerr": 0})
        fig, ax = _figure((5, 3.4))
        ax.errorbar(p["x"], p["y"], xerr=p["xerr"], yerr=p["yerr"], fmt="o", capsize=3)
        for x, y, label in zip(p["x"], p["y"], p["label"]):
            ax.annotate(label, (x, y), fontsize=6)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("baseline AP (± std)")
        ax.set_ylabel("AP gain of LGD (± SE)")
        ax.set_title("Gain vs detector strength (cf. Fig. 3)")
        fig.savefig(out / "gain_vs_strength.png", dpi=110)
        made.append(out / "gain_vs_strength.png")
    return made


# --- the report -------------------------------------------------------------------------------------------
def run_summary(frame: pd.DataFrame) -> dict[str, int]:
    """Trials per status (done, failed, stopped, interrupted, running, missing)."""
    return {k: int(v) for k, v in sorted(frame.drop_duplicates("digest")["status"].value_counts().items())}


def unfinished(frame: pd.DataFrame) -> pd.DataFrame:
    """One line per trial that has a run but did not finish: status, cells, reason, MLflow run id."""
    bad = frame[~frame["status"].isin(["done", "missing"])]
    return (bad.assign(cell=bad["table"] + ": " + bad["row"] + " / " + bad["column"])
            .groupby(["run_id", "digest", "status"], sort=False)
            .agg(seed=("seed", "first"), cells=("cell", "; ".join), reason=("reason", "first"),
                 error=("error", "first")).reset_index())


def _html_page(grid: Grid, tables: list[TableResult], summary: dict, total: int, failures: pd.DataFrame,
               plots: list[Path], early: list[str]) -> str:
    esc = html.escape
    counts = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in sorted(summary.items()))
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{esc(grid.name)}: reproduction "
             f"report</title><style>{_CSS}</style></head><body>",
             f"<h1>Reproduction report: {esc(grid.name)}</h1><p>{esc(grid.description)}</p>",
             f"<h2>Runs</h2><table class='summary' id='run-summary'>{counts}<tr><th>trials</th><td>{total}</td></tr>"
             "</table>"]
    if early:
        parts.append(f"<p>Early stopping (ASHA) was allowed in: {esc(', '.join(early))}; a stopped cell shows "
                     "<code>stopped</code>.</p>")
    parts += [f"<p class='rule'>{esc(STATISTICS_RULE)}</p>", f"<p class='rule'>{esc(PAPER_RULE)}</p>",
              "<h2>Tables</h2>"]
    for t in tables:
        parts.append(f"<div class='scroll'>{to_html(t)}</div><p class='note'>{esc(_caption(t).replace('`', ''))}</p>")
    if plots:
        parts.append("<h2>Plots</h2><p>" + "".join(
            f"<img class='plot' src='{esc(p.name)}' alt='{esc(p.stem)}'>" for p in plots) + "</p>")
    parts.append("<h2>Runs that did not finish</h2>")
    if len(failures):
        rows = "".join(
            f"<tr class='failure'><td>{esc(f.status)}</td><td>{esc(f.cells)}</td><td>{esc(str(f.seed))}</td>"
            f"<td>{esc(f.reason or '(no reason recorded)')}"
            + (f"<details><summary>error</summary><pre>{esc(f.error)}</pre></details>" if f.error else "")
            + f"</td><td><code>{esc(f.run_id)}</code></td></tr>" for f in failures.itertuples())
        parts.append("<table class='lgd failures' id='failures'><tr><th>status</th><th>cells</th><th>seed</th>"
                     f"<th>reason</th><th>MLflow run id</th></tr>{rows}</table>")
    else:
        parts.append("<p id='failures'>none</p>")
    return "\n".join(parts) + "\n</body></html>\n"


def write_reports(grid: Grid, specs: list[TrialSpec], tracker: Tracker, out_dir: Path,
                  reference: dict | None = None) -> str:
    """Write tables/<name>.{md,tex,csv,html}, runs.csv, report.md, report.html, summary.json and plots; return
    the Markdown report."""
    reference = load_reference() if reference is None else reference
    with _without_cyclic_gc():
        runs = tracker.trial_runs(grid.name)  # the grid's own trial runs, in one paged search
    frame = runs_frame(specs, runs)
    tables = collect(grid, frame, reference)
    tdir = out_dir / "tables"
    tdir.mkdir(parents=True, exist_ok=True)
    for t in tables:
        (tdir / f"{t.spec.name}.md").write_text(to_markdown(t))
        (tdir / f"{t.spec.name}.tex").write_text(to_latex(t))
        (tdir / f"{t.spec.name}.csv").write_text(to_csv(t))
        (tdir / f"{t.spec.name}.html").write_text(to_html(t))
    frame.drop(columns=["error"]).to_csv(out_dir / "runs.csv", index=False)
    summary = run_summary(frame)
    plots = _plots(tables, out_dir)
    failures = unfinished(frame)
    early = sorted({c.table for s in specs if s.scheduler for c in s.cells})
    runs_line = "Runs: " + ", ".join(f"{k} {v}" for k, v in sorted(summary.items())) + f" (of {len(specs)} trials)"
    md = [f"# Reproduction report: {grid.name}", "", grid.description, "", runs_line, ""]
    if early:
        md += [f"Early stopping (ASHA) was allowed in: {', '.join(early)}; a stopped cell shows `stopped`.", ""]
    md += [STATISTICS_RULE, "", PAPER_RULE, ""]
    md += [to_markdown(t) for t in tables]
    md += [f"![{p.stem}]({p.name})" for p in plots]
    if len(failures):
        md += ["", "### Runs that did not finish", "",
               _markdown(failures.assign(reason=failures["reason"].replace("", "(no reason recorded)"))
                         [["status", "cells", "seed", "reason", "run_id"]])]
    text = "\n".join(md) + "\n"
    (out_dir / "report.md").write_text(text)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    (out_dir / "report.html").write_text(_html_page(grid, tables, summary, len(specs), failures, plots, early))
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
    if not args.tracking_uri and not (out / "mlflow.db").exists():
        print(f"error: no MLflow store at {out / 'mlflow.db'} (run the grid first, or pass --output/--tracking-uri)",
              file=sys.stderr)
        return 2
    tracker = Tracker(args.tracking_uri or default_tracking_uri(out), experiment_name(grid))
    try:
        tracker.check()
    except TrackingUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(write_reports(grid, specs, tracker, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
