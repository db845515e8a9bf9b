"""Run an experiment grid: every trial a Ray Train TorchTrainer under Ray Tune, recorded in MLflow,
written out as the paper's tables.

    python orchestration/run_grid.py --grid experiments/quickstart.yaml

Finished cells (found in MLflow by config digest) are never run again; unfinished ones continue from
their last checkpoint. With --address (or RAY_ADDRESS) the grid joins that Ray cluster, else it starts a
local Ray of its own (orchestration/cluster.py). Exit codes: 0 all cells done, 1 some trials failed, 2 bad
input or a Ray cluster that refuses the driver or cannot hold one trial (nothing started), 130 interrupted
(Ctrl-C or SIGTERM: the first stops the grid and closes its MLflow runs, a second at once).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lgd.config import DataConfig, TrainConfig
from lgd.data.coco import DataError
from lgd.data.formats import load_splits
from lgd.typed import ConfigError, build
from orchestration.cluster import (CONNECT_TIMEOUT_S, LOCAL, Capacity, ClusterUnavailable, alive_nodes, connect,
                                   local_nodes)
from orchestration.costs import v100_hours
from orchestration.grid import Grid, TrialSpec, expand, load_grid
from orchestration.report import default_tracking_uri, experiment_name, write_reports
from orchestration.tracking import Tracker, TrackingUnavailable

log = logging.getLogger("lgd.grid")
REPO = Path(__file__).resolve().parents[1]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="run_grid.py", description=__doc__.split("\n")[0])
    p.add_argument("--grid", required=True, help="grid YAML (experiments/*.yaml)")
    p.add_argument("--dry-run", action="store_true", help="print the trials and a cost estimate; run nothing")
    p.add_argument("--output", help="outputs: MLflow store, tables, reports (default runs/<grid name>)")
    p.add_argument("--storage", help="trial storage for checkpoints (any pyarrow URI; default <output>/ray_storage)")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow tracking URI (default: sqlite file in --output)")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="join this Ray cluster: HOST:PORT of its GCS, or auto (default RAY_ADDRESS; without "
                        "either, or with 'local', a local Ray of its own is started)")
    p.add_argument("--connect-timeout", type=float, default=CONNECT_TIMEOUT_S, metavar="S",
                   help="give up joining the --address cluster after S seconds (exit 2)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray started without --address")
    p.add_argument("--verbose", action="store_true",
                   help="print Tune's status tables and every worker's output here (default: one compact view; "
                        "the workers' output stays in Ray's log files)")
    p.add_argument("--status-every", type=float, default=30.0, metavar="S",
                   help="seconds between the console's status lines (trials, iterations, losses, ETA)")
    p.add_argument("--dataset", action="append", default=[], metavar="NAME=ROOT", help="root folder of a dataset")
    p.add_argument("--resume", action="store_true",
                   help="continue the latest invocation's parent run (finished cells are skipped regardless)")
    p.add_argument("--max-concurrent", type=int, help="cap on concurrent trials (default: what resources allow)")
    return p.parse_args(argv)


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _dry_run(grid: Grid, specs: list[TrialSpec], nodes: list[dict[str, float]], where: str) -> None:
    total = 0.0
    for s in specs:
        cfg = build(TrainConfig, s.config)
        hours = v100_hours(cfg)
        total += hours
        r = grid.resources
        res = f"{r.num_workers}x({r.cpus_per_worker:g} CPU{f' + {r.gpus_per_worker:g} GPU' if r.use_gpu else ''})"
        print(f"{s.digest}  {res}  {cfg.solver.max_iter:>7} it  ~{hours:8.1f} V100-h  {s.cells_text()}")
    print(f"{len(specs)} trials, {sum(len(s.cells) for s in specs)} cells; estimated {total:,.1f} V100-GPU-hours "
          f"(scaled from the paper's Table 7)")
    print(Capacity.of(grid.resources).describe(nodes, where))


def _dry_run_on_cluster(grid: Grid, specs: list[TrialSpec], args, local: bool) -> int:
    """--dry-run: the trials, their cost, and whether the target cluster holds one trial (the --address cluster
    is joined for its node list; the local Ray is not started)."""
    if local:
        _dry_run(grid, specs, local_nodes(args.num_cpus), "local Ray (this machine)")
        return 0
    import ray

    try:
        where = connect(args.address, {}, None, args.connect_timeout)
        nodes = alive_nodes()
    except ClusterUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()
    _dry_run(grid, specs, nodes, f"Ray cluster at {where}")
    return 0


def _check_data(specs: list[TrialSpec]) -> None:
    """Check every real dataset in full (lgd.data.check: fields, ids, references, categories, every image
    header) before MLflow or Ray is touched; a refused one raises DataError. Synthetic sets are generated later."""
    seen = set()
    for s in specs:
        d = s.config["data"]
        if d.get("synthetic") is not None:
            continue
        key = (d.get("format", "coco"), d.get("root"), d["train_images"], d["train_annotations"], d["val_images"],
               d["val_annotations"])
        if key in seen:
            continue
        seen.add(key)
        for split, ds in zip(("train", "val"), load_splits(build(DataConfig, d))):  # the reader of its format
            print(f"dataset {d['name']} {split}: {ds.stats.as_dict()}")


def _missing_backend(specs: list[TrialSpec]) -> str | None:
    """A grid with ``backend: detectron2`` trials needs detectron2 installed (built from source): the problem,
    naming the install command, else None. Checked in this driver's environment, which on a cluster is a node's
    (`ray job submit`; docker/Dockerfile builds detectron2 into the image)."""
    if not any(s.config.get("backend") == "detectron2" for s in specs):
        return None
    from lgd.detectors.detectron2 import Detectron2Missing, require

    n = sum(s.config.get("backend") == "detectron2" for s in specs)
    try:
        require()
    except Detectron2Missing as e:
        return f"{n} trial(s) of this grid use backend detectron2. {e}"
    return None


def _concurrency(grid: Grid, cap: int | None, where: str) -> int:
    """Trials at once: as many as the connected cluster's live nodes hold (ClusterUnavailable: not one)."""
    capacity, nodes = Capacity.of(grid.resources), alive_nodes()
    n = capacity.trials(nodes)
    if n < 1:
        raise ClusterUnavailable(capacity.describe(nodes, where))
    return min(n, cap) if cap else n


def _driver_env(grid: Grid, local: bool) -> dict[str, str]:
    """Environment variables of the grid's Ray job (its trial drivers and workers)."""
    from orchestration.chaos import PLAN_ENV

    # A trial whose workers get no resources for progress_timeout_s fails with that reason (no report either).
    env = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(grid.progress_timeout_s)}
    if os.environ.get(PLAN_ENV):  # chaos tests: the planned worker kills
        env[PLAN_ENV] = os.environ[PLAN_ENV]
    if local:  # a cluster's nodes have the package installed (docker/Dockerfile); this checkout may not be
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return env


class Interruption:
    """Ctrl-C / SIGTERM of the driver: the first ends the grid gracefully (Tune stops its trials, which keep
    their checkpoints), a second stops at once, a third exits without cleaning up."""

    def __init__(self):
        self.count = 0
        self.cleaning_up = False  # closing the MLflow runs: only a third signal cuts that short

    def __call__(self, signum, frame):
        self.count += 1
        if self.count == 1:  # Tune asks the stopper below at its next step
            log.warning("%s: stopping the grid; its MLflow runs are closed, --resume continues it "
                        "(press Ctrl-C again to stop at once)", signal.Signals(signum).name)
        elif self.count == 2 and not self.cleaning_up:
            raise KeyboardInterrupt
        elif self.count > 2:
            os._exit(130)

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # the signals come here, not to Tune
            signal.signal(signal.SIGINT, self)
            signal.signal(signal.SIGTERM, self)


def run(grid: Grid, specs: list[TrialSpec], args, out: Path, tracker: Tracker, concurrent: int) -> int:
    """The grid's trials on the Ray cluster already joined (:func:`orchestration.cluster.connect`)."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.stopper import Stopper

    from orchestration.console import ConsoleProgress
    from orchestration.trial import MLflowRecorder, run_trial
    from orchestration.trial_resources import PlacementGroupJanitor

    finished = tracker.finished_digests()
    todo = [s for s in specs if s.digest not in finished]
    print(f"{len(specs)} trials: {len(specs) - len(todo)} already finished in MLflow, {len(todo)} to run")
    if not todo:
        return 0
    storage = args.storage or str((out / "ray_storage").resolve())
    interruption = Interruption()
    interruption.install()
    parent = tracker.start_parent(grid.name, {"lgd.grid_file": str(args.grid), "lgd.git_commit": _git_commit()},
                                  resume=args.resume)
    # Fault and failure reports carry no scheduler metric; ASHA skips them, Tune must not refuse them.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")

    class StopWhenInterrupted(Stopper):
        def __call__(self, trial_id, result):
            return False

        def stop_all(self):
            return interruption.count > 0

    errors = 0
    recorder = None
    try:
        resources = dict(grid.resources.__dict__)
        recorder = MLflowRecorder(tracker, grid.name, parent, {"lgd.grid_file": str(args.grid),
                                                                "lgd.git_commit": _git_commit()}, resources)
        console = ConsoleProgress(todo, {s.digest: build(TrainConfig, s.config).solver.max_iter for s in todo},
                                  recorder.run_ids.get, period_s=args.status_every)
        if not args.verbose:
            print(f"workers' output: {_worker_logs()} (--verbose prints it here)", flush=True)
        for sched in sorted({s.scheduler or "" for s in todo}):
            group = [s for s in todo if (s.scheduler or "") == sched]
            names = {s.digest: f"trial-{s.digest}" for s in group}
            tune_cfg = dict(max_concurrent_trials=concurrent,
                            trial_name_creator=lambda t: names[t.config["trial"]["digest"]],
                            trial_dirname_creator=lambda t: names[t.config["trial"]["digest"]])
            if sched == "asha":
                tune_cfg.update(scheduler=ASHAScheduler(time_attr="iteration", grace_period=1, reduction_factor=3),
                                metric="student_loss", mode="min")  # comparable across λ
            tuner = tune.Tuner(
                tune.with_resources(run_trial, {"cpu": 0, "memory": 2**20}),  # the trial driver itself holds no CPU
                param_space={"trial": tune.grid_search([s.to_dict() for s in group]), "resources": resources,
                             "storage": storage, "max_failures": grid.max_failures,
                             "progress_timeout_s": grid.progress_timeout_s},
                tune_config=tune.TuneConfig(**tune_cfg),
                run_config=tune.RunConfig(name=f"tune-{grid.name}-{parent[:8]}{'-' + sched if sched else ''}",
                                          storage_path=storage, callbacks=[recorder, PlacementGroupJanitor(),
                                                                           console],
                                          stop=StopWhenInterrupted(),
                                          failure_config=tune.FailureConfig(max_failures=0),
                                          verbose=1 if args.verbose else 0),
            )
            if interruption.count:
                break
            results = tuner.fit()
            errors += len(results.errors)
            if interruption.count:
                break
        errors = max(errors, len(recorder.failed))  # the recorder also counts trials that reported divergence
    finally:
        interruption.cleaning_up = True
        interrupted = interruption.count > 0
        if recorder is not None and recorder.close_open():  # Tune stopped trials it had not finished
            interrupted = True
        tracker.end_parent(parent, ok=errors == 0, interrupted=interrupted)
        ray.shutdown()
    return 130 if interrupted else 1 if errors else 0


def _worker_logs() -> str:
    """Where this node's Ray writes the workers' output (each node of a cluster has its own)."""
    try:
        import ray._private.worker as ray_worker

        return f"{ray_worker._global_node.get_logs_dir_path()} on this node, the same place on the others"
    except Exception:  # a Ray without that internal: its documented default
        return "/tmp/ray/session_latest/logs on each node"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not args.verbose:  # the console's own lines say it: a trial's run id; not Tune's slow-callback notes,
        logging.getLogger("lgd.trial").setLevel(logging.WARNING)  # experiment banner and result-file notes
        os.environ.setdefault("TUNE_WARN_THRESHOLD_S", "10")
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's reporter that stays silent at verbose=0
        logging.getLogger("ray.tune").setLevel(logging.WARNING)
    # fail fast on an unreachable server; our Tracker retries with back-off itself
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        roots = dict(d.split("=", 1) for d in args.dataset if "=" in d)
        bad = [d for d in args.dataset if "=" not in d]
        if bad:
            raise ConfigError([f"--dataset {b}: expected NAME=ROOT" for b in bad])
        grid = load_grid(args.grid)
        specs = expand(grid, roots, require_data=not args.dry_run)
    except ConfigError as e:
        print(f"error: {args.grid}: {e}", file=sys.stderr)
        return 2
    local = not args.address or args.address == LOCAL
    if args.dry_run:
        return _dry_run_on_cluster(grid, specs, args, local)
    missing = _missing_backend(specs)  # before MLflow and Ray: a missing detection library creates nothing
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return 2
    try:
        _check_data(specs)  # before MLflow and Ray: a refused dataset creates nothing
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import ray

    try:  # Ray before MLflow: a cluster that refuses the driver or cannot hold a trial leaves nothing behind
        where = connect(args.address, _driver_env(grid, local), args.num_cpus, args.connect_timeout,
                        log_to_driver=args.verbose)
        concurrent = _concurrency(grid, args.max_concurrent, "local Ray" if local else f"Ray cluster at {where}")
    except ClusterUnavailable as e:
        ray.shutdown()
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        out = Path(args.output or Path("runs") / grid.name)
        out.mkdir(parents=True, exist_ok=True)
        uri = args.tracking_uri or default_tracking_uri(out)
        tracker = Tracker(uri, experiment_name(grid), artifact_location=None if args.tracking_uri else
                          (out / "mlartifacts").resolve().as_uri())
        try:
            tracker.check()
        except TrackingUnavailable as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        try:
            code = run(grid, specs, args, out, tracker, concurrent)
        except KeyboardInterrupt:  # a second Ctrl-C: its runs are closed, nothing else is done
            print("interrupted: MLflow runs closed; --resume continues the grid", file=sys.stderr)
            return 130
    finally:
        ray.shutdown()
    text = write_reports(grid, specs, tracker, out)
    print(text)
    print(f"tables and report written to {out}/ (report.md, report.html, tables/)")
    return code


if __name__ == "__main__":
    sys.exit(main())
