"""Grid files: expansion into trials and cells, validation that reports every problem at once."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lgd.typed import ConfigError
from orchestration.grid import expand, load_grid

ROOT = Path(__file__).resolve().parents[1]


def _grid(tmp_path, data):
    p = tmp_path / "g.yaml"
    p.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
    return p


BASE = {
    "name": "t",
    "datasets": {"shapes": {"synthetic": {"num_train": 4, "num_val": 2, "image_size": 64}},
                 "coco": {}},
    "defaults": {"backbone": "resnet18"},
    "tables": [{"name": "a", "dataset": "shapes", "rows": ["detector"], "columns": ["method"],
                "grid": [{"detector": ["retinanet", "fcos"], "method": ["baseline", "lgd"]}]},
               {"name": "lam", "dataset": "shapes", "rows": ["detector"], "columns": ["lambda"],
                "fixed": {"lgd.enabled": True}, "grid": [{"detector": ["retinanet"], "lambda": [0.1, 1.0]}]}],
}


def test_expansion_dedupes_identical_trials_and_keeps_cells(tmp_path):
    data = {**BASE, "datasets": {"shapes": BASE["datasets"]["shapes"]}}
    specs = expand(load_grid(_grid(tmp_path, data)))
    assert len(specs) == 5  # retinanet+lgd at λ=1 fills two cells
    shared = [s for s in specs if len(s.cells) == 2]
    assert len(shared) == 1
    assert {(c.table, c.row, c.column) for c in shared[0].cells} == {("a", "RetinaNet", "Ours"),
                                                                     ("lam", "RetinaNet", "λ=1")}
    assert shared[0].config["lgd"]["enabled"] and shared[0].config["data"]["name"] == "shapes"


def test_every_problem_is_reported_with_its_key_path(tmp_path):
    bad = {
        "name": "t", "colour": "red",
        "datasets": {"shapes": BASE["datasets"]["shapes"], "coco": {}},
        "defaults": {"backbone": "resnet18"},
        "tables": [
            {"name": "a", "dataset": "shapes", "rows": ["detector"], "columns": ["method"],
             "grid": [{"detector": ["retinanet", "yolo"], "method": ["baseline", "lgd"]}]},
            {"name": "b", "dataset": "coco", "rows": ["backbone"], "columns": ["lambda"],
             "grid": [{"backbone": ["resnet5"], "lambda": [-1.0]}]},
            {"name": "c", "dataset": "shapes", "rows": ["detector"], "columns": ["lgd.shared_head"],
             "grid": [{"detector": [], "lgd.shared_head": [True]}, {"lgd.nope": [1], "detector": ["fcos"],
                                                                    "lgd.shared_head": [True]}]},
            {"name": "d", "dataset": "shapes", "rows": ["seed"], "columns": ["method"],
             "grid": [{"seed": [1], "method": ["lgd"]}, {"seed": [1], "method": ["lgd"], "lgd.num_heads": [8]}]},
        ],
    }
    with pytest.raises(ConfigError) as e:
        load_grid(_grid(tmp_path, bad))
    assert [p.split(";")[0] for p in e.value.problems] == ["colour: unknown key"]
    del bad["colour"]
    with pytest.raises(ConfigError) as e:
        expand(load_grid(_grid(tmp_path, bad)))
    text = "\n".join(e.value.problems)
    assert "datasets.coco: no path" in text
    assert "tables[0].grid[0] (detector=yolo, method=baseline): detector: 'yolo' is not one of" in text
    assert "tables[1].grid[0] (backbone=resnet5, lambda=-1.0): backbone: unknown backbone 'resnet5'" in text
    assert "lgd.distill_weight: λ must be >= 0" in text
    assert "tables[2].grid[0].detector: empty axis" in text
    assert "tables[2].grid[1].lgd.nope: unknown axis" in text
    assert "tables[3].grid[1] (seed=1, method=lgd, lgd.num_heads=8): duplicate cell row '1', column 'Ours'" in text


def test_a_bad_default_is_named_once_also_beside_a_broken_axis(tmp_path):
    bad = {**BASE, "defaults": {**BASE.get("defaults", {}), "solver": {"base_lr": "fast"}},
           "tables": [{"name": "a", "dataset": "shapes", "rows": ["detector"], "columns": ["method"],
                       "grid": [{"detector": ["retinanet", "fcos"], "method": ["baseline", "lgd"]},
                                {"detector": ["retinanet"], "method": ["lgd"], "lgd.nope": [1],
                                 "row_label": "x"}]}]}
    with pytest.raises(ConfigError) as e:
        expand(load_grid(_grid(tmp_path, bad)), require_data=False)
    # once, with the first trial it breaks and how many more (the broken product's trial is checked without
    # its unknown axis, so one run shows both problems)
    assert e.value.problems == [
        "tables[0].grid[1].lgd.nope: unknown axis 'lgd.nope': neither one of detector, backbone, schedule, scale, "
        "method, lambda, seed nor a config key",
        "tables[0].grid[0] (detector=retinanet, method=baseline): solver.base_lr: expected a number, got 'fast' "
        "(and 4 more trials)"], e.value.problems


def test_dataset_root_from_the_command_line(tmp_path):
    g = load_grid(_grid(tmp_path, {**BASE, "tables": [{**BASE["tables"][0], "dataset": "coco"}]}))
    specs = expand(g, {"coco": "/data/coco"})
    d = specs[0].config["data"]
    assert d["train_annotations"] == "/data/coco/annotations/instances_train2017.json"
    assert d["val_images"] == "/data/coco/val2017" and d["name"] == "coco"
    with pytest.raises(ConfigError, match="--dataset voc: the grid names no dataset"):
        expand(load_grid(_grid(tmp_path, BASE)), {"voc": "/x"})


def test_table_names_cannot_escape_the_output_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"tables\[0\].name: '../evil'"):
        load_grid(_grid(tmp_path, {**BASE, "tables": [{**BASE["tables"][0], "name": "../evil"}]}))


@pytest.mark.parametrize("grid", sorted(p.name for p in (ROOT / "experiments").glob("*.yaml")
                                        if p.name != "paper_reference.yaml"))
def test_shipped_grids_validate_and_dry_run(grid):
    r = subprocess.run([sys.executable, "orchestration/run_grid.py", "--grid", f"experiments/{grid}", "--dry-run"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "V100-GPU-hours" in r.stdout


def test_bad_grid_exits_2_and_creates_nothing(tmp_path):
    p = _grid(tmp_path, {**BASE, "tables": [{**BASE["tables"][0], "grid": [{"detector": ["yolo"],
                                                                             "method": ["lgd"]}]}]})
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "orchestration/run_grid.py", "--grid", str(p), "--output", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "'yolo' is not one of" in r.stderr and "datasets.coco: no path" in r.stderr
    assert not out.exists()
