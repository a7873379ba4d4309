"""Active memory manager policies that know about storage lanes.

The active memory manager (AMM) asks its policies, every couple of seconds, which
replicas to drop; the scheduler then asks workers to drop them, and a worker refuses if a
task running on it still needs the key. Two policies here:

* :class:`LaneAwareReduceReplicas` replaces the stock ``ReduceReplicas``, which offers
  every holder as a drop candidate (a lane is not a worker: the AMM would fail looking it
  up) and would count the lane as a redundant copy;
* :class:`MemoryRelief` drops workers' in-memory copies of stored results: memory relief
  without spilling, since the store already holds every byte. The key stays in memory on
  the scheduler, held by its lane; whoever needs it later, this worker included, reads it
  from the store.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from distributed.active_memory_manager import (
    ActiveMemoryManagerPolicy,
    ReduceReplicas,
    Suggestion,
    SuggestionGenerator,
)

from storage_scheduler import _compat
from storage_scheduler._protocol import is_lane

if TYPE_CHECKING:
    from distributed import Scheduler

    from storage_scheduler.config import SchedulerSettings

__all__ = [
    "LaneAwareReduceReplicas",
    "MemoryRelief",
    "forget_lost_replicas",
    "install_policies",
    "uninstall_policies",
]

logger = logging.getLogger(__name__)


class LaneAwareReduceReplicas(ActiveMemoryManagerPolicy):
    """``ReduceReplicas`` that counts and drops only worker replicas, never lanes.

    A stored key keeps one replica in worker memory, like an unstored one, plus as many
    as there are dependents waiting (dropping it is :class:`MemoryRelief`'s decision).
    """

    def run(self) -> SuggestionGenerator:
        for ts in self.manager.scheduler.replicated_tasks:
            assert ts.who_has
            if len(ts.who_has) == 2 and any(is_lane(ws.address) for ws in ts.who_has):
                continue  # the common case, cheaply: a stored key in one worker's memory
            workers = {ws for ws in ts.who_has if not is_lane(ws.address)}
            if len(workers) < 2:
                continue
            nwaiters = len({w.processing_on or w for w in ts.waiters or ()})
            ndrop = len(workers) - max(1, nwaiters)
            if ts in self.manager.pending:
                pending_repl, pending_drop = self.manager.pending[ts]
                ndrop += len(pending_repl) - len(pending_drop)
            for _ in range(ndrop):
                yield Suggestion("drop", ts, workers)


class MemoryRelief(ActiveMemoryManagerPolicy):
    """Drop workers' in-memory copies of results the store holds.

    Parameters
    ----------
    mode
        ``"always"``: drop every stored result from worker memory (as soon as no task
        running on the worker needs it); ``"pressure"``: only on workers whose managed
        memory exceeds ``threshold`` of their memory limit, oldest results first, until
        it no longer does.
    threshold
        Fraction of the memory limit, for ``"pressure"``. Below Dask's own spill
        threshold (``distributed.worker.memory.target``, 0.6) by default, so that stored
        results are dropped for free before anything would be spilled to disk.
    """

    def __init__(self, mode: str, threshold: float):
        self.mode = mode
        self.threshold = threshold

    def run(self) -> SuggestionGenerator:
        dropped = 0
        for ws in self.manager.scheduler.workers.values():
            if self.mode == "always":
                excess = float("inf")
            elif ws.memory_limit:
                excess = ws.nbytes - self.threshold * ws.memory_limit
            else:
                continue  # no memory limit: no pressure to relieve
            if excess <= 0:
                continue
            for ts in list(ws.has_what):  # insertion order: oldest first
                if excess <= 0:
                    break
                if not any(is_lane(holder.address) for holder in ts.who_has or ()):
                    continue
                if (yield Suggestion("drop", ts, {ws})) is not None:
                    excess -= ts.get_nbytes()
                    dropped += 1
        if dropped:
            logger.debug("Memory relief: dropping %d stored results from worker memory", dropped)


def forget_lost_replicas(
    scheduler: Scheduler, worker: str, keys: list[Any], stimulus_id: str
) -> None:
    """``worker`` dropped these stored results from RAM and cannot read them back (see
    :mod:`storage_scheduler.worker.relief`): they are lost there, as a dead worker's are.

    Its replicas are forgotten, the tasks that would read them on it go elsewhere (or
    wait), a key nobody else holds is released (recomputed if still wanted), and the
    worker is told to forget them too.
    """
    ws = scheduler.workers.get(worker)
    if ws is None:
        return
    recommendations: dict[Any, str] = {}
    lost: list[Any] = []
    for key in keys:
        ts = scheduler.tasks.get(key)
        if ts is None or ts.state != "memory" or ws not in (ts.who_has or ()):
            continue
        _compat.remove_replica(scheduler, ts, ws)
        lost.append(key)
        for dts in ts.dependents:
            if dts.processing_on is ws:
                recommendations[dts.key] = "released"
        if not ts.who_has:
            recommendations[key] = "released"
    if recommendations:
        scheduler.transitions(recommendations, stimulus_id)  # type: ignore[arg-type]
    if lost:  # after the free-keys of its dependents, which the transitions queued
        _compat.send_to_worker(
            scheduler, worker, {"op": "free-keys", "keys": lost, "stimulus_id": stimulus_id}
        )


def install_policies(scheduler: Scheduler, settings: SchedulerSettings) -> None:
    """Swap the stock ``ReduceReplicas`` for the lane-aware one; add memory relief."""
    _compat.replace_amm_policy(scheduler, ReduceReplicas, LaneAwareReduceReplicas)
    policies = _compat.amm_policies(scheduler)
    # ``pressure`` is the workers' own business (storage_scheduler.worker.spill), at the
    # memory monitor's speed; the AMM only empties workers of stored results (``always``).
    if policies is not None and settings.memory_relief == "always":
        relief = MemoryRelief(settings.memory_relief, settings.relief_threshold)
        scheduler.extensions["amm"].add_policy(relief)


def uninstall_policies(scheduler: Scheduler) -> None:
    """Undo :func:`install_policies`."""
    _compat.replace_amm_policy(scheduler, LaneAwareReduceReplicas, ReduceReplicas)
    _compat.replace_amm_policy(scheduler, MemoryRelief, None)
