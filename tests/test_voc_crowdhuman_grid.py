"""Tables 8 (Pascal VOC) and 9 (CrowdHuman): the report's gains for a metric where lower is better (mMR) from
recorded runs, and a grid over the synthetic set's VOC and CrowdHuman copies through run_grid.py end to end (a real
Ray, a real MLflow store): reader -> training -> the format's metric -> the paper's tables."""
import csv

import pytest

from grids import run_grid, tiny_grid, write_grid
from orchestration.grid import expand, load_grid
from orchestration.report import default_tracking_uri, experiment_name, write_reports
from orchestration.tracking import Tracker

SYNTHETIC = {"num_train": 8, "num_val": 4, "image_size": 64, "num_classes": 2, "max_objects": 3, "seed": 3}


def _tables(voc_detectors, ch_detectors):
    t8 = [{"name": f"table8_{m.lower()}", "paper": f"table8_{m.lower()}", "dataset": "voc", "metric": f"voc/{m}",
           "rows": ["detector"], "columns": ["method"],
           "grid": [{"detector": voc_detectors, "method": ["baseline", "lgd"]}]} for m in ("AP", "AP50", "AP75")]
    t9 = {"name": "table9", "paper": "table9", "dataset": "crowdhuman", "metric": "crowdhuman/mMR",
          "rows": ["method"], "columns": ["detector"],
          "grid": [{"detector": ch_detectors, "method": ["baseline", "lgd"]}]}
    return t8 + [t9]


def _grid(name, voc_detectors, ch_detectors):
    g = tiny_grid(name, _tables(voc_detectors, ch_detectors), checkpoint_period=90000)  # one checkpoint, at the end
    g["datasets"] = {"voc": {"format": "voc", "synthetic": SYNTHETIC},
                     "crowdhuman": {"format": "crowdhuman", "synthetic": SYNTHETIC}}
    return g


def _csv(path):
    return {(r["row"], r["column"]): r for r in csv.DictReader(path.open())}


def _md_row(md: str, label: str) -> list[str]:
    line = next(ln for ln in md.splitlines() if ln.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_mmr_gains_are_the_reference_minus_ours_beside_the_papers(tmp_path):
    grid_dict = _grid("lower", ["retinanet", "faster_rcnn"], ["retinanet", "faster_rcnn"])
    grid_dict["tables"].append({"name": "mmr_by_column", "dataset": "crowdhuman", "metric": "crowdhuman/mMR",
                                "rows": ["detector"], "columns": ["method"],
                                "grid": [{"detector": ["retinanet"], "method": ["baseline", "lgd"]}]})
    grid = load_grid(write_grid(tmp_path, grid_dict))
    specs = expand(grid, require_data=False)
    out = tmp_path / "out"
    out.mkdir()
    tracker = Tracker(default_tracking_uri(out), experiment_name(grid))
    parent = tracker.start_parent(grid.name, {}, resume=False)
    mmr = {("Baseline", "RetinaNet"): 60.0, ("Ours", "RetinaNet"): 57.0, ("Baseline", "FRCN"): 50.0,
           ("Ours", "FRCN"): 51.0}
    for spec in specs:
        run_id, _ = tracker.trial_run(spec.digest, grid.name, parent, spec.config, [c.__dict__ for c in spec.cells],
                                      {})
        cell = next((c.row, c.column) for c in spec.cells if c.table in ("table9", "table8_ap"))
        metrics = ({"crowdhuman/mMR": mmr[cell]} if spec.config["data"]["format"] == "crowdhuman" else
                   {"voc/AP": 40.0 + (cell[1] == "Ours"), "voc/AP50": 70.0, "voc/AP75": 45.0})
        tracker.log_metrics(run_id, {**metrics, "finished": 1}, 4)
        tracker.finish(run_id, "done")
    text = write_reports(grid, specs, tracker, out)

    rows = _csv(out / "tables" / "table9.csv")
    assert float(rows[("Ours", "RetinaNet")]["gain"]) == pytest.approx(3.0)  # 60 -> 57: better, a positive gain
    assert float(rows[("Ours", "FRCN")]["gain"]) == pytest.approx(-1.0)  # 50 -> 51: worse
    assert float(rows[("Ours", "RetinaNet")]["paper_gain"]) == pytest.approx(57.9 - 56.4)  # the paper's: +1.5
    assert float(rows[("Ours", "FRCN")]["paper_gain"]) == pytest.approx(48.7 - 46.4)  # +2.3
    md = (out / "tables" / "table9.md").read_text()
    ours = dict(zip(_md_row(md, "method"), _md_row(md, "Ours")))
    assert ours["RetinaNet"] == "57.0" and ours["RetinaNet: gain over Baseline row"] == "+3.0 (n=1, no test)"
    assert ours["FRCN: gain over Baseline row (paper)"] == "+2.3" and "lower is better" in md
    by_col = (out / "tables" / "mmr_by_column.md").read_text()  # a column reference: the header's arithmetic
    assert dict(zip(_md_row(by_col, "detector"), _md_row(by_col, "RetinaNet")))["Baseline − Ours"] == \
        "+3.0 (n=1, no test)"
    t8 = _csv(out / "tables" / "table8_ap.csv")  # higher is better as before: ours − baseline
    assert float(t8[("RetinaNet", "Ours")]["gain"]) == pytest.approx(1.0)
    assert float(t8[("RetinaNet", "Ours")]["paper_gain"]) == pytest.approx(58.9 - 56.6)
    assert "Table 9: CrowdHuman, mMR (lower is better)" in text and "Table 8: Pascal VOC, AP75, R-50 2x" in text


@pytest.mark.slow
def test_voc_and_crowdhuman_grid_runs_end_to_end_and_prints_tables_8_and_9(tmp_path):
    g = _grid("voc_ch", ["retinanet"], ["retinanet"])
    g["resources"]["cpus_per_worker"] = 0.5  # the 4 trials at once: their start-up overlaps, one thread each
    g["defaults"]["threads"] = 1
    path = write_grid(tmp_path, g)
    out = tmp_path / "out"
    r = run_grid(path, out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for title in ("Table 8: Pascal VOC, AP (IoU 0.50:0.95)", "Table 8: Pascal VOC, AP50", "Table 8: Pascal VOC, AP75",
                  "Table 9: CrowdHuman, mMR (lower is better)"):
        assert title in r.stdout, title
    t9 = _csv(out / "tables" / "table9.csv")
    base, ours = t9[("Baseline", "RetinaNet")], t9[("Ours", "RetinaNet")]
    assert base["status"] == ours["status"] == "done" and 0.0 <= float(ours["ours"]) <= 100.0
    assert float(ours["gain"]) == pytest.approx(float(base["ours"]) - float(ours["ours"]), abs=2e-3)
    assert float(ours["paper_gain"]) == pytest.approx(1.5)
    for m in ("ap", "ap50", "ap75"):
        t8 = _csv(out / "tables" / f"table8_{m}.csv")
        b, o = t8[("RetinaNet", "Baseline")], t8[("RetinaNet", "Ours")]
        assert b["status"] == o["status"] == "done" and 0.0 <= float(o["ours"]) <= 100.0
        assert float(o["gain"]) == pytest.approx(float(o["ours"]) - float(b["ours"]), abs=2e-3)
    assert float(_csv(out / "tables" / "table8_ap75.csv")[("RetinaNet", "Ours")]["paper_gain"]) == pytest.approx(3.0)
    header = (out / "runs.csv").read_text().splitlines()[0].split(",")
    assert {"metrics.voc/AP50_07", "metrics.crowdhuman/recall", "metrics.crowdhuman/AP"} <= set(header)


def test_run_grid_checks_real_voc_and_crowdhuman_layouts_before_mlflow_and_ray(tmp_path):
    from test_voc_crowdhuman import _devkit, _odgt

    voc_root = _devkit(tmp_path / "VOCdevkit", {
        "VOC2007/trainval": {"000005": [("cat", 0, 0, 10, 10, 0)]}, "VOC2012/trainval": {"2008_000001": [
            ("dog", 5, 5, 25, 35, 0)]}, "VOC2007/test": {"000001": [("dog", 2, 3, 30, 40, 1), ("cat", 1, 1, 9, 9, 0)]}})
    ch_root = _odgt(tmp_path / "CrowdHuman", "train", [("273271,1a0d6000b9e1f5b7", [("person", [1, 2, 20, 30], 0)])])
    _odgt(ch_root, "val", [("v1", [("person", [1, 2, 20, 30], 0)])])
    with open(ch_root / "annotation_val.odgt", "a") as f:
        f.write('{"ID": "v2", "gtboxes": [{"tag": "person", "fbox": [1, 2, "w", 4]}]}\n')
    g = _grid("real", ["retinanet"], ["retinanet"])
    g["datasets"] = {"voc": {"format": "voc"}, "crowdhuman": {"format": "crowdhuman"}}
    out = tmp_path / "out"
    r = run_grid(write_grid(tmp_path, g), out, "--dataset", f"voc={voc_root}", "--dataset", f"crowdhuman={ch_root}",
                 timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
    assert "dataset voc train: {'images': 2, 'images_kept': 2" in r.stdout  # the devkit passed, 07+12 trainval
    assert "dataset voc val: {'images': 1, 'images_kept': 1, 'images_without_objects': 0, 'crowd_annotations': 1" \
        in r.stdout  # the difficult dog
    assert "annotation_val.odgt: line 2 (ID v2): field gtboxes[0].fbox[2]" in r.stderr, r.stderr[-2000:]
    assert not (out / "mlflow.db").exists() and not (out / "ray_storage").exists()
