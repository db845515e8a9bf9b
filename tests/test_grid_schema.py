"""The grid file's published JSON Schema: current, accepted by every shipped grid, refusing typos and wrong types."""
import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from lgd.typed import ConfigError
from orchestration.grid import expand, load_grid
from orchestration.grid_schema import grid_schema_text

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_FILE = ROOT / "experiments" / "grid.schema.json"
MODELINE = "# yaml-language-server: $schema=grid.schema.json"
GRIDS = sorted(p for p in (ROOT / "experiments").glob("*.yaml") if p.name != "paper_reference.yaml")


@pytest.fixture(scope="module")
def validator():
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_checked_in_schema_is_the_generated_one():
    assert SCHEMA_FILE.read_text() == grid_schema_text(), \
        "stale: python -m orchestration.grid_schema > experiments/grid.schema.json"


@pytest.mark.parametrize("path", GRIDS, ids=lambda p: p.name)
def test_shipped_grids_name_and_pass_the_schema(path, validator):
    assert path.read_text().splitlines()[0] == MODELINE
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(yaml.safe_load(
        path.read_text()))]
    assert errors == []


GOOD = {"name": "g", "datasets": {"shapes": {"synthetic": {"num_train": 4, "num_val": 2, "image_size": 64}}},
        "defaults": {"backbone": "resnet18", "solver": {"iter_scale": 0.001}},
        "detector_defaults": {"faster_rcnn": {"detector_options": {"box_batch_size_per_image": 32}}},
        "tables": [{"name": "t", "dataset": "shapes", "rows": ["detector"], "columns": ["method"],
                    "fixed": {"lgd.distill_weight": 2.0, "input": {"min_size": 64}},
                    "grid": [{"detector": ["retinanet"], "method": ["baseline", "lgd"], "lgd.shared_head": [True]}]}]}


def _set(data, path, value):
    *parents, last = path
    for k in parents:
        data = data[k]
    data[last] = value


@pytest.mark.parametrize("path, value", [
    (("tabels",), []),  # a typo'd key at the top
    (("defaults", "solver", "base_lrr"), 0.1),  # ... in the trial config under defaults
    (("detector_defaults", "yolo"), {}),  # not a detector
    (("tables", 0, "fixed", "lgd.enbled"), True),  # a dotted key that is not in the config
    (("tables", 0, "grid", 0, "lgd.nope"), [1]),  # an axis that is neither an alias nor a config key
    (("tables", 0, "grid", 0, "lgd"), [{}]),  # a section is not an axis
    (("resources",), {"num_workers": "two"}),  # wrong types
    (("defaults", "solver", "base_lr"), "fast"),
    (("defaults", "seed"), True),
    (("tables", 0, "grid", 0, "method"), ["ours"]),
    (("tables", 0, "grid", 0, "lambda"), 1.0),  # an axis lists its values
])
def test_schema_and_loader_refuse_the_same_mistakes(path, value, validator, tmp_path):
    assert list(validator.iter_errors(GOOD)) == []
    p = tmp_path / "g.yaml"
    p.write_text(yaml.safe_dump(GOOD))
    expand(load_grid(p))  # the good grid is good for the loader too
    bad = copy.deepcopy(GOOD)
    _set(bad, path, value)
    assert list(validator.iter_errors(bad)), f"the schema accepts {path}={value!r}"
    p.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError):
        expand(load_grid(p))
