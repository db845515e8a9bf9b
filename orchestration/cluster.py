"""The Ray cluster a grid runs on: a local Ray of its own, or an existing cluster joined by address (with Ray's
token authentication and a bounded wait), and how many trials its nodes hold at once.

Ray's own ``ray.init(address)`` turns token authentication on in the driver only when ``RAY_AUTH_MODE=token`` is
set, retries a refused token for about 20 s and a dead address for minutes, and then raises a bare
``ConnectionError``. Here a driver that has a token (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
``~/.ray/auth_token``: Ray's loader reads them in that order) sends it, a dead address is found by one TCP
connection, and every failure is a :class:`ClusterUnavailable` that says what to set.
"""
from __future__ import annotations

import math
import os
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

LOCAL = "local"  # --address local: a Ray of this driver's own, even where RAY_ADDRESS is set
CONNECT_TIMEOUT_S = 60.0
_TOKEN_HELP = ("With token authentication on (`ray start --head` turns it on wherever it finds a token) the driver "
               "needs the cluster's token: set RAY_AUTH_TOKEN=<token>, or RAY_AUTH_TOKEN_PATH=<file holding it>, or "
               "put it in ~/.ray/auth_token (`ray get-auth-token` on the head node prints it)")


class ClusterUnavailable(RuntimeError):
    """The Ray cluster cannot be joined, or cannot hold one trial of the grid."""


def token_source() -> str | None:
    """Where this driver's Ray token comes from, in the order Ray's token loader reads them; None: it has none."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return f"RAY_AUTH_TOKEN_PATH={path}" if Path(path).expanduser().is_file() else None
    default = Path.home() / ".ray" / "auth_token"
    return str(default) if default.is_file() else None


def _use_token_if_available() -> None:
    """Turn token authentication on in this driver when it has a token and RAY_AUTH_MODE is unset: Ray does
    that itself only for a cluster it finds without an address."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available)
    except ImportError:  # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _gcs_address(address: str) -> str:
    """host:port of the cluster's GCS. ``auto`` is the cluster that `ray start` recorded last on this machine
    (in Ray's temp dir), never another Ray that happens to run here (Ray's own ``auto`` joins any)."""
    from ray._private.services import canonicalize_bootstrap_address
    from ray._private.utils import read_ray_address

    if address == "auto":
        recorded = read_ray_address()
        if not recorded:
            raise ClusterUnavailable("Ray address 'auto': no cluster started with `ray start` is recorded on this "
                                     "machine; give --address HOST:PORT of the head node's GCS")
        address = recorded
    try:
        return canonicalize_bootstrap_address(address)
    except (ConnectionError, ValueError) as e:
        raise ClusterUnavailable(f"Ray address {address!r}: {e}") from None


def _reachable(gcs: str, timeout_s: float) -> None:
    host, _, port = gcs.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=min(timeout_s, 10.0)):
            pass
    except (OSError, ValueError) as e:
        raise ClusterUnavailable(f"Ray cluster at {gcs} is unreachable: {e} (is the head node up, and is "
                                 "this the GCS port, 6379 unless `ray start --head --port` said otherwise?)") from None


def connect(address: str | None, env_vars: dict[str, str], num_cpus: int | None = None,
            timeout_s: float = CONNECT_TIMEOUT_S, log_to_driver: bool = True) -> str:
    """``ray.init`` for the grid's driver; returns the GCS address joined, or ``local``.

    Without an address (or with ``local``) a new local Ray is started, whatever clusters this machine has seen
    (``ray.init()`` itself would join the one ``ray start`` recorded last). With one, the driver joins that
    cluster within ``timeout_s`` or raises :class:`ClusterUnavailable`; a hung connection attempt ends the
    process with exit 2 (nothing of the grid exists yet when this is called).
    """
    import ray

    if not address or address == LOCAL:
        # a Ray of its own, never a cluster that `ray start` left on this machine; the dashboard serves the
        # state API
        ray.init(address=LOCAL, num_cpus=num_cpus, include_dashboard=True, runtime_env={"env_vars": env_vars},
                 log_to_driver=log_to_driver)
        return LOCAL
    if "://" in address:
        raise ClusterUnavailable(
            f"Ray address {address!r}: Ray Client (ray://) is not supported, the grid's driver records every "
            "trial in MLflow itself; run run_grid.py on a node of the cluster (`ray job submit`) with "
            "--address HOST:PORT of the GCS")
    if num_cpus is not None:
        raise ClusterUnavailable("--num-cpus sizes the local Ray only; a cluster's nodes have the CPUs their "
                                 "`ray start` gave them")
    gcs = _gcs_address(address)
    _reachable(gcs, timeout_s)
    _use_token_if_available()
    source = token_source()

    def give_up():
        print(f"error: Ray cluster at {gcs} did not accept this driver within {timeout_s:g} s (is it the GCS "
              f"port of a Ray head node?). {_TOKEN_HELP}. "
              f"This driver {'sent the token from ' + source if source else 'has no token'}.",
              file=sys.stderr, flush=True)
        os._exit(2)

    watchdog = threading.Timer(timeout_s, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        ray.init(address=gcs, runtime_env={"env_vars": env_vars}, log_to_driver=log_to_driver)
    except Exception as e:  # ConnectionError (refused token, GCS gone), RuntimeError (version mismatch), ...
        raise ClusterUnavailable(
            f"Ray cluster at {gcs} refused this driver ({type(e).__name__}: {e}). {_TOKEN_HELP}. This driver "
            f"{'sent the token from ' + source if source else 'has no token'}.") from None
    finally:
        watchdog.cancel()
    return gcs


def alive_nodes() -> list[dict[str, float]]:
    """The total resources of every live node of the connected cluster."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def local_nodes(num_cpus: int | None) -> list[dict[str, float]]:
    """What the local Ray that run_grid.py starts would have (without starting it)."""
    import torch

    cpus = num_cpus or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    return [{"CPU": float(cpus), "GPU": float(torch.cuda.device_count())}]


@dataclass(frozen=True)
class Capacity:
    """How many trials of a grid a cluster's nodes hold at once: each worker (DDP rank) of a trial needs its CPUs
    and GPUs on one node; the workers of one trial may spread over nodes."""
    num_workers: int
    cpus_per_worker: float
    gpus_per_worker: float  # 0: CPU trials

    @classmethod
    def of(cls, resources) -> "Capacity":
        """From the grid's ``resources`` (orchestration.grid.Resources)."""
        gpus = resources.gpus_per_worker if resources.use_gpu else 0.0
        return cls(resources.num_workers, resources.cpus_per_worker, gpus)

    def workers_on(self, node: dict[str, float]) -> int:
        n = math.floor(node.get("CPU", 0.0) / self.cpus_per_worker + 1e-9)
        if self.gpus_per_worker > 0:
            n = min(n, math.floor(node.get("GPU", 0.0) / self.gpus_per_worker + 1e-9))
        return n

    def trials(self, nodes: list[dict[str, float]]) -> int:
        """How many trials fit at once."""
        return sum(self.workers_on(n) for n in nodes) // self.num_workers

    def describe(self, nodes: list[dict[str, float]], where: str) -> str:
        """One line: what the cluster has, what one trial needs, and how many trials fit (or why none)."""
        cpus, gpus = sum(n.get("CPU", 0.0) for n in nodes), sum(n.get("GPU", 0.0) for n in nodes)
        worker = f"{self.cpus_per_worker:g} CPU" + (f" + {self.gpus_per_worker:g} GPU" if self.gpus_per_worker else "")
        head = (f"{where}: {len(nodes)} node{'s' * (len(nodes) != 1)}, {cpus:g} CPU, {gpus:g} GPU; one trial needs "
                f"{self.num_workers} worker{'s' * (self.num_workers != 1)} x ({worker})")
        n = self.trials(nodes)
        if n:
            return f"{head}: fits, {n} trial{'s' * (n != 1)} at once"
        slots = sum(self.workers_on(x) for x in nodes)
        if self.gpus_per_worker > 0 and not gpus:
            why = "the cluster has no GPU"
        else:
            why = f"its nodes hold {slots} such worker{'s' * (slots != 1)}"
        return f"{head}: CANNOT be scheduled, {why}"
