"""Grid files: YAML -> validated Grid -> list[TrialSpec]. Pure: no Ray, no MLflow.

A grid names tables; each table is a union of products of axes (``grid``), plus fixed settings. Every
trial knows its cells (table, row, column); trials with the same resolved config run once and fill every
cell that names them. Validation reports every problem at once, each with its key path.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import pydantic.dataclasses

from lgd.config import DETECTORS, SyntheticData, TrainConfig
from lgd.typed import STRICT, ConfigError, Section, annotation_at, build, deep_merge, load_yaml, set_dotted

# Axis name -> (config path, value -> config value). Any other axis must be a dotted TrainConfig path.
AXES = {
    "detector": ("detector", None),
    "backbone": ("backbone", None),
    "schedule": ("solver.schedule", None),
    "scale": ("input.multi_scale", {"ss": False, "ms": True}),
    "method": ("lgd.enabled", {"baseline": False, "lgd": True}),
    "lambda": ("lgd.distill_weight", None),
    "seed": ("seed", None),
}
DISPLAY = {
    "retinanet": "RetinaNet", "fcos": "FCOS", "faster_rcnn": "FRCN", "mask_rcnn": "MRCN",
    "resnet18": "R-18", "resnet50": "R-50", "resnet101": "R-101", "resnext101_32x8d": "X-101",
    "resnet18_dcn": "R-18 DCN", "resnet50_dcn": "R-50 DCN", "resnet101_dcn": "R-101 DCN",
    "resnext101_32x8d_dcn": "X-101 DCN", "baseline": "Baseline", "lgd": "Ours",
    "atss": "ATSS", "poto": "POTO", "swin_t": "Swin-T",
}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def display(axis: str, value: Any) -> str:
    if axis == "lambda":
        return f"λ={value:g}"
    if isinstance(value, bool):
        return f"{axis.rsplit('.', 1)[-1]}={'on' if value else 'off'}"
    if axis.startswith("lgd.") or axis not in AXES:
        return f"{axis.rsplit('.', 1)[-1]}={value}"
    return DISPLAY.get(str(value), str(value))


@pydantic.dataclasses.dataclass(config=STRICT)
class Resources(Section):
    """Ray Train ScalingConfig of every trial: workers (DDP ranks) and what each one holds."""
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0

    def check(self):
        if self.num_workers < 1:
            yield "num_workers", "must be >= 1"
        if self.cpus_per_worker <= 0:
            yield "cpus_per_worker", "must be > 0"


@pydantic.dataclasses.dataclass(config=STRICT)
class DatasetSpec(Section):
    """A dataset by name and ``format``: coco (a root of train2017/, val2017/, annotations/, or explicit paths),
    voc (a VOCdevkit root: VOC2007/, VOC2012/), crowdhuman (a root of Images/ and annotation_*.odgt), or synthetic
    (written in the format)."""
    format: Literal["coco", "voc", "crowdhuman"] = "coco"
    root: Optional[str] = None
    train_images: Optional[str] = None
    train_annotations: Optional[str] = None
    val_images: Optional[str] = None
    val_annotations: Optional[str] = None
    synthetic: Optional[SyntheticData] = None
    # the dataset the paper reports on (MS-COCO 2017, VOC 07+12, CrowdHuman): only then are its absolute numbers
    # put beside ours
    paper: bool = False

    def check(self):
        if self.paper and self.synthetic is not None:
            yield "paper", "a synthetic dataset is never the paper's: drop 'paper: true'"
        paths = [k for k in ("train_images", "train_annotations", "val_images", "val_annotations") if getattr(self, k)]
        if self.format != "coco" and paths:
            yield paths[0], f"format {self.format} reads its own layout under 'root': drop {', '.join(paths)}"

    def data_config(self) -> dict:
        fmt = {} if self.format == "coco" else {"format": self.format}
        if self.synthetic is not None:
            return {**fmt, "synthetic": self.synthetic.__dict__.copy()}
        if self.format != "coco":  # the reader finds its files under the root (DataConfig refuses other paths)
            return {**fmt, "root": self.root}
        root = Path(self.root) if self.root else None

        def at(value, default):
            p = value if value is not None else (default if root is not None else None)
            if p is None:
                return None
            return str(root / p) if root is not None and not Path(p).is_absolute() else str(p)

        return {"train_images": at(self.train_images, "train2017"),
                "train_annotations": at(self.train_annotations, "annotations/instances_train2017.json"),
                "val_images": at(self.val_images, "val2017"),
                "val_annotations": at(self.val_annotations, "annotations/instances_val2017.json")}

    def has_location(self) -> bool:
        return self.synthetic is not None or self.root is not None or all(
            p is not None for p in (self.train_images, self.train_annotations, self.val_images, self.val_annotations))


@pydantic.dataclasses.dataclass(config=STRICT)
class TableSpec(Section):
    """One table of the paper (or of ours): rows x columns, filled by a union of axis products."""
    name: str
    dataset: str
    rows: list[str]
    columns: list[str]
    grid: list[dict[str, Any]]  # products of axes: {axis: [values]}; "row_label"/"column_label" fix a label
    title: str = ""
    paper: Optional[str] = None  # key into the paper reference numbers
    fixed: dict[str, Any] = field(default_factory=dict)
    metric: str = "bbox/AP"
    scheduler: Optional[Literal["asha"]] = None  # early stopping (λ search)
    seeds: Optional[int] = None  # replicate every cell over seeds 0..seeds-1 (the report: mean ± std, n)

    def check(self):
        if not _NAME_RE.match(self.name):
            yield "name", f"{self.name!r}: use letters, digits, '_', '-', '.' (it names files)"
        if not self.grid:
            yield "grid", "must list at least one product of axes"
        for key in self.fixed:
            if key in ("data", "output_dir"):
                yield f"fixed.{key}", "set by the grid runner, not per table"
        if self.seeds is not None:
            if self.seeds < 1:
                yield "seeds", "must be >= 1"
            for where, keys in ([("rows", self.rows), ("columns", self.columns), ("fixed", self.fixed)]
                                + [(f"grid[{i}]", b) for i, b in enumerate(self.grid)]):
                if "seed" in keys:
                    yield f"{where}.seed", "a table with 'seeds: N' sets the seed itself (0..N-1): drop this seed axis"


@pydantic.dataclasses.dataclass(config=STRICT)
class Grid(Section):
    """A grid file: named tables of trials over datasets, the settings every trial shares, the Ray resources."""
    name: str
    tables: list[TableSpec]
    description: str = ""
    datasets: dict[str, DatasetSpec] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)  # TrainConfig settings of every trial
    detector_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)  # per detector, over defaults
    resources: Resources = field(default_factory=Resources)
    max_failures: int = 2  # worker failures a trial recovers from (from its last checkpoint)
    # a trial with no report for this long (waiting for its workers' resources included) fails with that reason
    progress_timeout_s: float = 1800.0

    def check(self):
        if not _NAME_RE.match(self.name):
            yield "name", f"{self.name!r}: use letters, digits, '_', '-', '.' (it names folders)"
        if self.max_failures < 0:
            yield "max_failures", "must be >= 0"
        if not self.progress_timeout_s > 0:
            yield "progress_timeout_s", "must be > 0 (seconds)"
        for det in self.detector_defaults:
            if det not in DETECTORS:
                yield f"detector_defaults.{det}", f"unknown detector; known: {', '.join(DETECTORS)}"
        names = [t.name for t in self.tables]
        for n in sorted({n for n in names if names.count(n) > 1}):
            yield "tables", f"duplicate table name {n!r}"


@dataclass(frozen=True)
class Cell:
    table: str
    row: str
    column: str
    index: int = 0  # position in the table's expansion: rows and columns keep the grid's order


@dataclass
class TrialSpec:
    """One training run: its resolved config, its identity and every table cell it fills."""
    digest: str
    config: dict
    cells: list[Cell]
    scheduler: Optional[str] = None

    def cells_text(self) -> str:
        """Its cells as a person reads them: ``table: row / column; ...``."""
        return "; ".join(f"{c.table}: {c.row} / {c.column}" for c in self.cells)

    def to_dict(self) -> dict:
        return {"digest": self.digest, "config": self.config, "scheduler": self.scheduler,
                "cells": [c.__dict__ for c in self.cells]}

    @staticmethod
    def from_dict(d: dict) -> "TrialSpec":
        return TrialSpec(d["digest"], d["config"], [Cell(**c) for c in d["cells"]], d.get("scheduler"))


def _axis_value(axis: str, value: Any) -> tuple[str, Any]:
    path, mapping = AXES.get(axis, (axis, None))
    if mapping is not None:
        if value not in mapping:
            raise KeyError(f"{value!r} is not one of {', '.join(map(str, mapping))}")
        value = mapping[value]
    return path, value


def _check_axis_name(axis: str) -> str | None:
    """None when ``axis`` is an alias or a dotted TrainConfig key that holds a value; else the problem."""
    if axis in AXES:
        return None
    *sections, key = axis.split(".")
    section = annotation_at(TrainConfig, tuple(sections))  # through config sections only, not into a mapping
    if not dataclasses.is_dataclass(section) or key not in {f.name for f in dataclasses.fields(section)}:
        return f"unknown axis {axis!r}: neither one of {', '.join(AXES)} nor a config key"
    if dataclasses.is_dataclass(annotation_at(section, (key,))):
        return f"axis {axis!r} is a section of the config, not a value"
    return None


def expand(grid: Grid, dataset_roots: dict[str, str] | None = None, require_data: bool = True) -> list[TrialSpec]:
    """All trials of the grid, deduplicated by config digest; raises ConfigError listing every problem."""
    problems: list[str] = []
    roots = dataset_roots or {}
    for name, root in roots.items():
        if name not in grid.datasets:
            problems.append(f"--dataset {name}: the grid names no dataset {name!r} (known: {', '.join(grid.datasets)})")
        else:
            grid.datasets[name].root = root
    for name, ds in grid.datasets.items():
        if require_data and not ds.has_location():
            problems.append(f"datasets.{name}: no path; set its root in the grid or pass --dataset {name}=/path/to/root")
    trials: dict[str, TrialSpec] = {}
    in_trials: dict[str, list[str]] = {}  # a trial config's problem -> the trials that have it (once, not per trial)
    for ti, table in enumerate(grid.tables):
        tpath = f"tables[{ti}]"
        if table.dataset not in grid.datasets:
            problems.append(f"{tpath}.dataset: unknown dataset {table.dataset!r} (known: {', '.join(grid.datasets) or 'none'})")
            continue
        seen: dict[tuple[str, str], str] = {}
        for bi, block in enumerate(table.grid):
            block = dict(block)  # the labels are taken out below; the grid itself stays as loaded
            bpath = f"{tpath}.grid[{bi}]"
            bad = False  # a broken product still builds its trials' configs, for their problems, without the bad axes
            fixed_labels = {k: block.pop(k) for k in ("row_label", "column_label") if k in block}
            for k, v in fixed_labels.items():
                if not isinstance(v, str):
                    problems.append(f"{bpath}.{k}: expected a string, got {v!r}")
                    bad = True
            for axis, values in list(block.items()):
                if not isinstance(values, list):
                    problems.append(f"{bpath}.{axis}: expected a list of values, got {values!r}")
                    bad = True
                    del block[axis]
                    continue
                msg = _check_axis_name(axis)
                if msg:
                    problems.append(f"{bpath}.{axis}: {msg}")
                    bad = True
                    del block[axis]
                elif not values:
                    problems.append(f"{bpath}.{axis}: empty axis (list at least one value)")
                    bad = True
                    del block[axis]
            for kind, names in (("row", table.rows), ("column", table.columns)):
                for axis in names:
                    if axis not in block and f"{kind}_label" not in fixed_labels:
                        problems.append(f"{bpath}: {kind} axis {axis!r} is not set in this product "
                                        f"(give it, or a {kind}_label)")
                        bad = True
            axes = list(block)
            for combo in itertools.product(*(block[a] for a in axes)):
                values = dict(zip(axes, combo))
                dataset = {"name": table.dataset, **grid.datasets[table.dataset].data_config()}
                for k, v in dataset.items():  # without a root (dry run, report) the paths stay unknown;
                    if v is None:  # they are not part of the digest
                        dataset[k] = f"<root of dataset {table.dataset!r} not set>"
                over: dict = {}  # the table's fixed settings, then the axes: they win over every default
                local: list[str] = []
                for k, v in table.fixed.items():
                    if "." in k:
                        set_dotted(over, k, copy.deepcopy(v))
                    else:
                        over = deep_merge(over, {k: copy.deepcopy(v)})
                for axis, v in values.items():
                    try:
                        path, cv = _axis_value(axis, v)
                    except KeyError as e:
                        local.append(f"{bpath}.{axis}: {e.args[0]}")
                        continue
                    set_dotted(over, path, cv)
                detector = over.get("detector", grid.defaults.get("detector", "retinanet"))
                data = deep_merge(grid.defaults, {"data": dataset})
                data = deep_merge(data, grid.detector_defaults.get(str(detector), {}))
                data = copy.deepcopy(deep_merge(data, over))
                label = ", ".join(f"{a}={v}" for a, v in values.items())
                if local:
                    problems.extend(local)
                    continue
                try:
                    cfg = build(TrainConfig, data)
                except ConfigError as e:
                    for p in e.problems:
                        in_trials.setdefault(p, []).append(f"{bpath} ({label})")
                    continue
                if bad:
                    continue
                row = fixed_labels.get("row_label") or " ".join(display(a, values[a]) for a in table.rows)
                col = fixed_labels.get("column_label") or (" ".join(display(a, values[a]) for a in table.columns)
                                                           or table.metric.rsplit("/", 1)[-1])
                if (row, col) in seen:
                    problems.append(f"{bpath} ({label}): duplicate cell row {row!r}, column {col!r} "
                                    f"(also from {seen[(row, col)]})")
                    continue
                seen[(row, col)] = label
                for seeded in ([cfg] if table.seeds is None else  # the cell's replicates, one run per seed
                               [dataclasses.replace(cfg, seed=s) for s in range(table.seeds)]):
                    digest = seeded.digest()
                    spec = trials.get(digest)
                    if spec is None:
                        spec = trials[digest] = TrialSpec(digest, seeded.to_dict(), [], table.scheduler)
                    elif table.scheduler and spec.scheduler != table.scheduler:
                        spec.scheduler = None  # a cell needs the full run: no early stopping for it
                    spec.cells.append(Cell(table.name, row, col, len(seen)))
    for p, where in in_trials.items():  # e.g. a bad default: named once, with the first trial it breaks
        problems.append(f"{where[0]}: {p}" + (f" (and {len(where) - 1} more trial{'s' * (len(where) > 2)})" if len(where) > 1 else ""))
    if problems:
        raise ConfigError(problems)
    return list(trials.values())


def load_grid(path: str | Path) -> Grid:
    data = load_yaml(path)
    return build(Grid, data)

