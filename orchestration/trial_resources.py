"""The Ray resources a trial's workers hold, found by the trial tag on its worker actors and released when an
attempt of the trial has ended.

Ray Train removes a worker group's placement group when it shuts the group down, but not when a worker dies
after the group was built and before training started (the controller then errors out with the group
half-started, and the placement group lives until the grid's Ray job ends). A trial attempt that is over
holds nothing legitimately, so every placement group its workers were placed in is removed then; and the
driver removes those of trials Tune has ended without their trainable doing it (stopped early, trial actor
lost: Ray Train's own clean-up of a dead controller's group needs the state API without an address, which
fails where several Ray instances run on one machine).
"""
from __future__ import annotations

import json
import logging
import time
from typing import Optional

import ray
from ray import tune
from ray.tune.experiment import Trial
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.state import list_actors, list_placement_groups

log = logging.getLogger("lgd.trial")

TRIAL_ENV = "LGD_TRIAL"  # set on every Ray Train worker of a trial: the trial's config digest
WORKER_CLASS = "RayTrainWorker"
_LIMIT = 10_000  # the state API's own ceiling per call


def worker_runtime_env(digest: str) -> dict:
    """The runtime env of a trial's Ray Train workers: it tags them with the trial."""
    return {"env_vars": {TRIAL_ENV: digest}}


def _trial_of(actor) -> Optional[str]:
    try:
        env = json.loads(actor.serialized_runtime_env or "{}")
    except ValueError:
        return None
    return (env.get("env_vars") or {}).get(TRIAL_ENV)


def held_placement_groups(address: Optional[str] = None, job_id: Optional[str] = None) -> dict[str, set[str]]:
    """Trial digest -> ids of the placement groups, not yet removed, that the trial's workers were placed in."""
    filters = [("class_name", "=", WORKER_CLASS)]
    if job_id:
        filters.append(("job_id", "=", job_id))
    actors = list_actors(address=address, filters=filters, detail=True, limit=_LIMIT,
                         raise_on_missing_output=False)
    live = {pg.placement_group_id for pg in list_placement_groups(
        address=address, filters=[("state", "!=", "REMOVED")], limit=_LIMIT, raise_on_missing_output=False)}
    held: dict[str, set[str]] = {}
    for actor in actors:
        digest = _trial_of(actor)
        if digest and actor.placement_group_id in live:
            held.setdefault(digest, set()).add(actor.placement_group_id)
    return held


def release_placement_groups(*digests: str) -> int:
    """Remove the placement groups still held for these trials (call when their attempts are over); how many."""
    released = 0
    try:
        ctx = ray.get_runtime_context()  # the address: other Ray clusters may run on this machine
        held = held_placement_groups(ctx.gcs_address, ctx.get_job_id())
        for digest in digests:
            ids = held.get(digest, set())
            for pg_id in ids:
                remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg_id)))
            if ids:
                released += len(ids)
                log.warning("trial %s: released %d placement group(s) its ended attempt left behind", digest,
                            len(ids))
    except Exception as e:  # the state API needs the dashboard; without it Ray's own clean-up is all there is
        log.warning("trial(s) %s: could not check their placement groups (%s)", ", ".join(digests), e)
    return released


class PlacementGroupJanitor(tune.Callback):
    """Driver-side: every ``interval_s``, the placement groups still held for trials Tune has ended are removed."""

    def __init__(self, interval_s: float = 10.0):
        self.interval_s = interval_s
        self._next = 0.0

    def on_step_begin(self, iteration, trials, **info):
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.interval_s
        ended = [t.config["trial"]["digest"] for t in trials if t.status in (Trial.TERMINATED, Trial.ERROR)]
        if ended:
            release_placement_groups(*ended)
