"""The JSON Schema of grid files, for editors (YAML language server): completion and checks as a grid is typed.

Generated from the pydantic sections of ``orchestration.grid`` and ``lgd.config``; re-run after changing them:
``python -m orchestration.grid_schema > experiments/grid.schema.json`` (a test keeps the file current). The schema
checks keys and value types; the cross-field rules (``check()``) and the axis values the config refuses are
reported by the loader (``run_grid.py --dry-run``).
"""
from __future__ import annotations

import json

from lgd.config import TrainConfig
from lgd.typed import json_schema
from orchestration.grid import AXES, DETECTORS, Grid

# Axes whose values are words the grid maps onto a config value.
_MAPPED = {"scale": "short side 800 (ss) or multi-scale 640..800 (ms): input.multi_scale",
           "method": "the detector alone (baseline) or trained with LGD (lgd): lgd.enabled"}


def _config_keys(config: dict, defs: dict, prefix: str = "") -> dict[str, dict]:
    """Dotted key -> schema of every value (not section) of the trial config, from its JSON Schema."""
    out = {}
    for name, prop in config["properties"].items():
        refs = [prop] + prop.get("anyOf", [])
        section = next((defs[r["$ref"].rsplit("/", 1)[-1]] for r in refs if "$ref" in r), None)
        if section is not None:
            out.update(_config_keys(section, defs, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = prop
    return out


def grid_json_schema() -> dict:
    """The grid file's JSON Schema (draft 2020-12); ``defaults``, ``detector_defaults``, ``fixed`` and the axes
    of ``grid`` are typed by the trial config (``TrainConfig``)."""
    schema = json_schema(Grid)
    config = json_schema(TrainConfig)
    defs = schema["$defs"]
    defs.update(config.pop("$defs"))
    defs["TrainConfig"] = config
    keys = _config_keys(config, defs)
    props = schema["properties"]
    props["defaults"] = {"$ref": "#/$defs/TrainConfig",
                         "description": "Trial config settings of every trial (the dataset is set per table)."}
    props["detector_defaults"] = {
        "type": "object", "propertyNames": {"enum": list(DETECTORS)},
        "additionalProperties": {"$ref": "#/$defs/TrainConfig"},
        "description": "Per detector: trial config settings over `defaults` for that detector's trials."}
    table = defs["TableSpec"]["properties"]
    table["fixed"] = {
        "type": "object", "additionalProperties": False,
        "description": "Trial config settings of this table's trials, over the defaults: a config section or a "
                       "dotted key (lgd.enabled: true). Not data or output_dir (set by the grid runner).",
        "properties": {**{k: v for k, v in config["properties"].items() if k not in ("data", "output_dir")},
                       **{k: v for k, v in keys.items() if k != "output_dir"}}}
    axes = {}
    for axis, (path, mapping) in AXES.items():
        values = {"enum": list(mapping)} if mapping else keys[path]
        axes[axis] = {"type": "array", "minItems": 1, "items": values,
                      "description": _MAPPED.get(axis, f"values of {path}")}
    axes.update({k: {"type": "array", "minItems": 1, "items": v, "description": f"values of {k}"}
                 for k, v in keys.items() if k not in axes})
    table["grid"]["items"] = {
        "type": "object", "additionalProperties": False,
        "description": "One product of axes: each axis (a name below: an alias or a dotted trial config key) lists "
                       "its values; every combination is a trial. row_label / column_label fix a label.",
        "properties": {"row_label": {"type": "string", "description": "the row label of every cell of this product"},
                       "column_label": {"type": "string",
                                        "description": "the column label of every cell of this product"},
                       **axes}}
    return schema


def grid_schema_text() -> str:
    """The text of experiments/grid.schema.json."""
    return json.dumps(grid_json_schema(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    print(grid_schema_text(), end="")
