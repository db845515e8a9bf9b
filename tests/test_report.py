"""The report: MLflow runs (a real sqlite store, written through the Tracker) -> pandas tables with seeds, gains and
their noise, the paper's numbers only where the dataset is the paper's, failures, and a page a browser renders."""
import csv
import io
import json
import re
import shutil
import subprocess
import sys

import pytest
from scipy import stats

from grids import ROOT, tiny_grid, write_grid
from lgd.typed import ConfigError
from orchestration.grid import expand, load_grid
from orchestration.report import default_tracking_uri, experiment_name, write_reports
from orchestration.tracking import Tracker

# AP per seed of each (table, row, column); the λ=1 run is the t1 RetinaNet LGD run of seed 0 (the same trial).
BASE_R, LGD_R = [30.0, 30.5, 29.5], [32.0, 32.5, 31.5]  # +2.0, SE 0.41: more than noise
BASE_F, LGD_F = [30.0, 31.0, 29.0], [30.2, 31.2, None]  # seed 2 fails; +0.7, SE 0.76: within noise
VALUES = {("t1", "RetinaNet R-50 1x ss", "Baseline"): BASE_R, ("t1", "RetinaNet R-50 1x ss", "Ours"): LGD_R,
          ("t1", "FRCN R-50 1x ss", "Baseline"): BASE_F, ("t1", "FRCN R-50 1x ss", "Ours"): LGD_F,
          ("lam", "RetinaNet", "λ=0.1"): [31.0],
          ("coco", "RetinaNet R-50 1x ss", "Baseline"): [36.0], ("coco", "RetinaNet R-50 1x ss", "Ours"): [37.9]}
WALL_H = {"baseline": [1.0, 1.1, 0.9], "lgd": [1.6, 1.7, 1.5]}  # wall-clock hours per seed (Table 7's cost)
ROW = ["detector", "backbone", "schedule", "scale"]
SETTING = {"backbone": ["resnet50"], "schedule": ["1x"], "scale": ["ss"]}


def _grid_dict(name="rep"):
    g = tiny_grid(name, [
        {"name": "t1", "title": "Baseline vs LGD, 3 seeds (synthetic)", "paper": "table1", "dataset": "shapes",
         "rows": ROW, "columns": ["method"], "seeds": 3,
         "grid": [{"detector": ["retinanet", "faster_rcnn"], **SETTING, "method": ["baseline", "lgd"]}]},
        {"name": "lam", "title": "λ (synthetic)", "paper": "appendix_a", "dataset": "shapes", "rows": ["detector"],
         "columns": ["lambda"], "fixed": {"lgd.enabled": True, "backbone": "resnet50"},
         "grid": [{"detector": ["retinanet"], "lambda": [0.1, 1.0, 10.0]}]},
        {"name": "coco", "title": "On the paper's dataset", "paper": "table1", "dataset": "coco", "rows": ROW,
         "columns": ["method"],
         "grid": [{"detector": ["retinanet", "fcos"], **SETTING, "method": ["baseline", "lgd"]}]},
        {"name": "t2", "paper": "table2", "dataset": "coco", "rows": ["detector", "schedule", "scale"],  # coco's trials
         "columns": ["method"], "fixed": {"backbone": "resnet50"},
         "grid": [{"detector": ["retinanet"], "schedule": ["1x"], "scale": ["ss"], "method": ["baseline", "lgd"]}]},
        {"name": "cost", "paper": "table7", "dataset": "shapes", "metric": "wall_clock_h", "rows": ["method"],
         "columns": [], "seeds": 3, "fixed": {"detector": "retinanet", "backbone": "resnet50"},  # t1's RetinaNet runs
         "grid": [{"method": ["baseline", "lgd"], "column_label": "Overall"}]},
    ])
    g["datasets"]["coco"] = {"root": "/nonexistent/coco", "paper": True}
    return g


def _record(grid_path, out):
    """Every trial of the grid recorded as the driver's recorder records it (trial_run, log_metrics, finish), except:
    the COCO FCOS baseline never ran (missing), λ=10 diverged (lgd.failure), the COCO FCOS LGD run raised (lgd.error),
    the FRCN LGD run of seed 2 stalled (lgd.failure)."""
    grid = load_grid(grid_path)
    specs = expand(grid, require_data=False)
    tracker = Tracker(default_tracking_uri(out), experiment_name(grid))
    parent = tracker.start_parent(grid.name, {}, resume=False)
    ids = {}
    for spec in specs:
        cells = {(c.table, c.row, c.column) for c in spec.cells}
        if ("coco", "FCOS R-50 1x ss", "Baseline") in cells:
            continue  # never started: missing
        run_id, _ = tracker.trial_run(spec.digest, grid.name, parent, spec.config, [c.__dict__ for c in spec.cells],
                                      {})
        tracker.log_metrics(run_id, {"total_loss": 1.0, "iteration": 2}, 2)
        ids[frozenset(cells)] = run_id
        if ("lam", "RetinaNet", "λ=10") in cells:
            tracker.set_tags(run_id, {"lgd.failure": "non-finite loss", "lgd.failure.iteration": 6,
                                      "lgd.error": "non-finite loss at iteration 6: ['distill']"})
            tracker.finish(run_id, "failed")
            continue
        if ("coco", "FCOS R-50 1x ss", "Ours") in cells:
            tracker.set_tags(run_id, {"lgd.error": "Traceback (most recent call last):\n  ...\nRuntimeError: boom"})
            tracker.finish(run_id, "failed")
            continue
        key = next(k for k in cells if k in VALUES)
        ap = VALUES[key][spec.config["seed"]]
        if ap is None:
            tracker.set_tags(run_id, {"lgd.failure": "no progress: no report for 20 s"})
            tracker.finish(run_id, "failed")
            continue
        hours = WALL_H["lgd" if spec.config["lgd"]["enabled"] else "baseline"][spec.config["seed"]]
        tracker.log_metrics(run_id, {"bbox/AP": ap, "bbox/AP50": ap + 10, "wall_clock_h": hours, "finished": 1}, 4)
        tracker.finish(run_id, "done")
    return grid, specs, tracker, ids


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    path = write_grid(tmp, _grid_dict())
    out = tmp / "out"
    out.mkdir()
    grid, specs, tracker, ids = _record(path, out)
    text = write_reports(grid, specs, tracker, out)
    return path, out, text, ids


def _csv(out, name):
    return {(r["row"], r["column"]): r for r in csv.DictReader((out / "tables" / f"{name}.csv").open())}


def _md_row(md: str, label: str) -> list[str]:
    line = next(ln for ln in md.splitlines() if ln.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_seeds_give_mean_std_n_and_gains_their_se_and_noise_mark_in_every_format(report):
    _, out, text, _ = report
    rows = _csv(out, "t1")
    r_ours, f_ours = rows[("RetinaNet R-50 1x ss", "Ours")], rows[("FRCN R-50 1x ss", "Ours")]
    assert (float(r_ours["ours"]), float(r_ours["std"]), r_ours["n"]) == (32.0, 0.5, "3")
    assert len(r_ours["run_id"].split(";")) == 3
    assert float(r_ours["gain"]) == pytest.approx(2.0) and float(r_ours["gain_se"]) == pytest.approx(0.408, abs=1e-3)
    assert float(r_ours["p_value"]) == pytest.approx(stats.ttest_ind(LGD_R, BASE_R, equal_var=False).pvalue, abs=1e-4)
    assert r_ours["verdict"] == "significant"
    assert (f_ours["status"], f_ours["n"], f_ours["runs"], float(f_ours["ours"])) == ("done", "2", "3", 30.7)
    assert float(f_ours["gain"]) == pytest.approx(0.7) and float(f_ours["gain_se"]) == pytest.approx(0.764, abs=1e-3)
    assert f_ours["verdict"] == "within noise"
    welch = stats.ttest_ind(LGD_F[:2], BASE_F, equal_var=False).pvalue
    assert float(f_ours["p_value"]) == pytest.approx(welch, abs=1e-4)
    assert rows[("RetinaNet R-50 1x ss", "Baseline")]["verdict"] == ""  # the reference itself has no gain

    md = (out / "tables" / "t1.md").read_text()
    head = _md_row(md, "detector / backbone / schedule / scale")
    r, f = dict(zip(head, _md_row(md, "RetinaNet R-50 1x ss"))), dict(zip(head, _md_row(md, "FRCN R-50 1x ss")))
    assert r["Ours"] == "32.0 ± 0.50 (n=3)" and r["Baseline"] == "30.0 ± 0.50 (n=3)"
    assert re.fullmatch(r"\+2\.0 ± 0\.41 \(p=0\.0\d\d\)", r["Ours − Baseline"]), r
    assert f["Ours"] == "30.7 ± 0.71 (n=2 of 3)"
    assert re.fullmatch(r"\+0\.7 ± 0\.76 \(within noise, p=0\.\d+\)", f["Ours − Baseline"]), f
    tex = (out / "tables" / "t1.tex").read_text()
    assert tex.startswith(r"\begin{table}") and r"+0.7 $\pm$ 0.76 (within noise, p=" in tex
    assert r"32.0 $\pm$ 0.50 (n=3)" in tex and "±" not in tex and "λ" not in tex
    page = (out / "report.html").read_text()
    for html in ((out / "tables" / "t1.html").read_text(), page):
        assert re.search(r'<td [^>]*class="[^"]*noise[^"]*"[^>]*>\+0\.7 ± 0\.76 \(within noise, p=', html)
        assert re.search(r'<td [^>]*class="[^"]*significant[^"]*"[^>]*>\+2\.0 ± 0\.41', html)
    # a single run per side: a gain, but no test
    lam = _csv(out, "lam")
    assert lam[("RetinaNet", "λ=1")]["verdict"] == "n=1, no test" and float(lam[("RetinaNet", "λ=1")]["gain"]) == 1.0
    assert "+1.0 (n=1, no test)" in (out / "tables" / "lam.md").read_text()
    assert "+1.0 (n=1, no test)" in (out / "tables" / "lam.tex").read_text()
    assert "+1.0 (n=1, no test)" in page and "Welch's t-test" in text and "within noise" in text


def test_synthetic_results_are_never_beside_the_papers_absolute_numbers(report):
    _, out, text, _ = report
    paper_abs = {"36.6", "38.3", "37.6", "38.8", "39.7", "37.3", "37.9", "37.0"}  # table1 / appendix_a numbers
    for name in ("t1", "lam"):
        for ext in ("md", "tex", "csv", "html"):
            body = (out / "tables" / f"{name}.{ext}").read_text()
            assert not [n for n in paper_abs if n in body], (name, ext, body)
        head = _md_row((out / "tables" / f"{name}.md").read_text(), "detector / backbone / schedule / scale"
                       if name == "t1" else "detector")
        assert [h for h in head if "paper" in h] and all(" − " in h for h in head if "paper" in h), head
        assert "paper" not in next(csv.reader(io.StringIO((out / "tables" / f"{name}.csv").read_text())))[:10]
    rows = _csv(out, "t1")  # ...but the paper's gains for the same row are
    assert float(rows[("RetinaNet R-50 1x ss", "Ours")]["paper_gain"]) == pytest.approx(38.3 - 36.6)
    assert float(rows[("FRCN R-50 1x ss", "Ours")]["paper_gain"]) == pytest.approx(38.3 - 37.6)
    assert float(rows[("RetinaNet R-50 1x ss", "LabelEnc")]["paper_gain"]) == pytest.approx(37.8 - 36.6)
    assert rows[("RetinaNet R-50 1x ss", "LabelEnc")]["status"] == "paper-only"
    md = (out / "tables" / "t1.md").read_text()
    head = _md_row(md, "detector / backbone / schedule / scale")
    assert dict(zip(head, _md_row(md, "RetinaNet R-50 1x ss")))["Ours − Baseline (paper)"] == "+1.7"
    assert "Baseline (paper)" not in head and "not the paper's" in md
    assert dict(zip(*(_md_row((out / "tables" / "lam.md").read_text(), x) for x in ("detector", "RetinaNet"))))[
        "λ=1 − λ=0.1 (paper)"] == "+0.7"
    # on the paper's dataset both: the paper's absolute number beside ours, ours − paper, and the gains
    coco = (out / "tables" / "coco.md").read_text()
    head = _md_row(coco, "detector / backbone / schedule / scale")
    r = dict(zip(head, _md_row(coco, "RetinaNet R-50 1x ss")))
    assert (r["Baseline"], r["Baseline (paper)"], r["Baseline: ours − paper"]) == ("36.0", "36.6", "-0.6")
    assert (r["Ours − Baseline"], r["Ours − Baseline (paper)"]) == ("+1.9 (n=1, no test)", "+1.7")
    assert dict(zip(head, _md_row(coco, "FCOS R-50 1x ss")))["Baseline"] == "—"  # never run: missing
    assert float(_csv(out, "coco")[("RetinaNet R-50 1x ss", "Baseline")]["paper"]) == 36.6
    # Table 2: the comparators (DML, tf-KD, BAN) in their own columns from the paper's numbers, ours beside
    t2 = (out / "tables" / "t2.md").read_text()
    r = dict(zip(_md_row(t2, "detector / schedule / scale"), _md_row(t2, "RetinaNet 1x ss")))
    assert (r["Baseline"], r["DML (paper)"], r["DML − Baseline (paper)"], r["BAN (paper)"], r["Ours"]) == (
        "36.0", "37.0", "+0.4", "36.8", "37.9")
    assert not any(k.startswith("tf-KD") for k in r)  # not reported for RetinaNet: no empty column
    assert _csv(out, "t2")[("RetinaNet 1x ss", "DML")]["status"] == "paper-only"


def test_failures_are_listed_with_their_reason_and_run_id(report):
    _, out, text, ids = report
    lam_run = next(v for k, v in ids.items() if ("lam", "RetinaNet", "λ=10") in k)
    fcos_run = next(v for k, v in ids.items() if ("coco", "FCOS R-50 1x ss", "Ours") in k)
    page = (out / "report.html").read_text()
    for body in (text, page):
        assert "non-finite loss (iteration 6)" in body and lam_run in body
        assert "RuntimeError: boom" in body and fcos_run in body
    assert re.search(rf"failed \| lam: RetinaNet / λ=10 \| 0 \| non-finite loss \(iteration 6\) \| {lam_run}", text)
    assert _csv(out, "lam")[("RetinaNet", "λ=10")]["status"] == "failed"
    assert _csv(out, "lam")[("RetinaNet", "λ=10")]["run_id"] == lam_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary == {"done": 14, "failed": 3, "missing": 1}  # 12 + 2 + 4 trials; λ=1 is a t1 trial
    assert "Runs: done 14, failed 3, missing 1 (of 18 trials)" in text
    assert re.search(r"failed \| t1: FRCN R-50 1x ss / Ours \| 2 \| no progress: no report for 20 s \| \w{32}", text)


def test_seeds_replicate_cells_and_conflict_with_a_seed_axis(tmp_path, report):
    path = report[0]
    specs = expand(load_grid(path), require_data=False)
    t1 = [s for s in specs if any(c.table == "t1" for c in s.cells)]
    assert len(t1) == 12 and sorted({s.config["seed"] for s in t1}) == [0, 1, 2]
    bad = _grid_dict("bad")
    bad["tables"][0]["grid"][0]["seed"] = [0, 1]
    bad["tables"][1]["seeds"] = 0
    bad["datasets"]["shapes"]["paper"] = True
    with pytest.raises(ConfigError) as e:
        load_grid(write_grid(tmp_path, bad))
    text = str(e.value)
    assert "tables[0].grid[0].seed: a table with 'seeds: N' sets the seed itself" in text
    assert "tables[1].seeds: must be >= 1" in text
    assert "datasets.shapes.paper: a synthetic dataset is never the paper's" in text


def test_report_cli_imports_no_torch(report):
    path, out, _, _ = report
    code = ("import sys; from orchestration.report import main; rc = main(['--grid', sys.argv[1], '--output', "
            "sys.argv[2]]); assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, str(path), str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| RetinaNet R-50 1x ss | 30.0 ± 0.50 (n=3) |" in r.stdout


def test_report_cli_without_a_store_exits_2_and_creates_nothing(report, tmp_path):
    r = subprocess.run([sys.executable, "orchestration/report.py", "--grid", str(report[0]), "--output",
                        str(tmp_path / "nowhere")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"no MLflow store at {tmp_path / 'nowhere' / 'mlflow.db'}" in r.stderr
    assert not (tmp_path / "nowhere").exists()


CHECK = """<script>
window.addEventListener('load', () => {
  const r = document.createElement('pre'); r.id = 'rendered';
  const noise = document.querySelector('td.noise');
  r.textContent = JSON.stringify({
    images: [...document.images].map(i => [i.getAttribute('src'), i.complete ? i.naturalWidth : -1]),
    tables: [...document.querySelectorAll('table')].map(t => [t.dataset.table || t.id, t.rows.length,
                                                           t.getBoundingClientRect().width]),
    noise: noise ? getComputedStyle(noise).fontStyle : null});
  document.body.appendChild(r);
});
</script>"""


def test_the_report_page_renders_in_a_real_browser(report, tmp_path):
    _, out, _, _ = report
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "chromium is not installed: `apt-get install -y chromium` (.ci/run installs it)"
    page = out / "report_check.html"  # the report plus a probe, next to it so that its images resolve
    page.write_text((out / "report.html").read_text().replace("</body>", CHECK + "</body>"))
    r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
                        page.as_uri()], capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="rendered">(.*?)</pre>', r.stdout, re.S)
    assert m, (r.returncode, r.stderr[-3000:])
    rendered = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert sorted(src for src, _ in rendered["images"]) == ["ap_vs_lambda.png", "gain_vs_strength.png"]
    assert all(w > 100 for _, w in rendered["images"]), rendered["images"]  # loaded and decoded
    tables = {t[0]: t for t in rendered["tables"]}
    for name in ("t1", "lam", "coco", "run-summary", "failures"):
        assert name in tables and tables[name][1] >= 2 and tables[name][2] > 100, (name, rendered["tables"])
    assert rendered["noise"] == "italic"  # the page's own style sheet applies


def test_cost_is_compared_as_a_ratio_to_the_baseline_beside_the_papers(report):
    _, out, text, _ = report
    rows = _csv(out, "cost")
    ours = rows[("Ours", "Overall")]
    assert float(ours["ours"]) == pytest.approx(1.6) and ours["n"] == "3"
    assert float(ours["gain"]) == pytest.approx(1.6)  # 1.6 h / 1.0 h
    se = 1.6 * ((0.1 / 1.6) ** 2 / 3 + (0.1 / 1.0) ** 2 / 3) ** 0.5  # delta method
    assert float(ours["gain_se"]) == pytest.approx(se, abs=1e-3)
    assert float(ours["paper_gain"]) == pytest.approx(23.5 / 12.1, abs=1e-3)  # the paper's 1.94x
    assert "paper" not in ours  # synthetic data: no hours beside the paper's V100 hours
    md = (out / "tables" / "cost.md").read_text()
    line = dict(zip(_md_row(md, "method"), _md_row(md, "Ours")))
    assert line["Overall: ratio to Baseline row"].startswith("1.60x ± 0.11 (") and \
        line["Overall: ratio to Baseline row (paper)"] == "1.94x"
