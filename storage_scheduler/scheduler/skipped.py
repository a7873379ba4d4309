"""Results the storage policy left unstored, and the stored inputs they stand on.

A worker that leaves a result unstored (``policy: worth-storing``, see
:mod:`storage_scheduler.worker.policy`) says so (``storage-skipped``) ahead of the task's
own report, with the result's recompute cost. The scheduler then:

* keeps the stored keys the result can be recomputed from — its stored inputs, and those
  of its unstored inputs, recursively — wanted (by a pseudo-client, as ``fire_and_forget``
  does) for as long as the result is in memory. A worker holding it may die: the key is
  recomputed by stock Dask from inputs still held by the store, not from scratch, and
  ``gc: intermediates`` does not delete those inputs meanwhile;
* sends the cost, shared among the result's dependents, to the workers that run them, so
  that their own decisions count the work behind their inputs.

Requested keys (``compute``, ``persist``, ``submit``) are annotated ``storage_requested``
so that workers always store them.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from storage_scheduler import _compat

if TYPE_CHECKING:
    from distributed import Scheduler

    from storage_scheduler.scheduler.lanes import Lanes

__all__ = ["PIN_CLIENT", "Skipped"]

#: The pseudo-client that wants the stored inputs of unstored results.
PIN_CLIENT = "storage-scheduler-inputs"


class Skipped:
    """Unstored results' costs and the stored inputs they keep.

    Notes
    -----
    Runs in scheduler hooks and stream handlers, on the event loop, without I/O. Pins
    are released from a callback: releasing runs transitions, which a transition hook
    must not start.
    """

    scheduler: Scheduler
    lanes: Lanes
    #: Recompute cost (seconds) of each unstored result in memory or about to be.
    costs: dict[Any, float]
    #: The stored keys each unstored result is recomputed from.
    inputs: dict[Any, frozenset[Any]]
    #: How many unstored results keep each stored key.
    pins: Counter[Any]
    _unpin: set[Any]
    _scheduled: bool

    def __init__(self, scheduler: Scheduler, lanes: Lanes):
        self.scheduler = scheduler
        self.lanes = lanes
        self.costs = {}
        self.inputs = {}
        self.pins = Counter()
        self._unpin = set()
        self._scheduled = False

    def requested(self, keys: Iterable[Any]) -> None:
        """Workers always store the results clients asked for."""
        for key in keys:
            ts = self.scheduler.tasks.get(key)
            if ts is not None:
                _compat.annotate(ts, storage_requested=True)

    def costs_of(self, tasks: Iterable[Any]) -> dict[Any, float]:
        """The costs of those scheduler ``tasks`` left unstored, each shared among its
        dependents (recomputed once for all of them)."""
        return {
            ts.key: self.costs[ts.key] / max(1, len(ts.dependents))
            for ts in tasks
            if ts.key in self.costs
        }

    def add(self, key: Any, cost: float, worker: str | None = None) -> None:
        """``key``'s result will not be stored (stream op from its worker, ahead of the
        task's report)."""
        ts = self.scheduler.tasks.get(key)
        if ts is None or ts.state != "processing" or key in self.costs:
            return  # cancelled meanwhile: no transition would release the pins
        stored: set[Any] = set()
        for dts in ts.dependencies:
            if self.lanes.holds(dts):
                stored.add(dts.key)
            else:
                stored.update(self.inputs.get(dts.key, ()))
        self.costs[key] = cost
        self.inputs[key] = frozenset(stored)
        new = [k for k in stored if not self.pins[k]]
        self.pins.update(stored)
        if new:
            _compat.want_keys(self.scheduler, new, PIN_CLIENT)

    def left(self, key: Any) -> None:
        """``key`` is no longer in memory (or will not be): its inputs may go."""
        self.costs.pop(key, None)
        stored = self.inputs.pop(key, None)
        if not stored:
            return
        self.pins.subtract(stored)
        self._unpin.update(k for k in stored if self.pins[k] <= 0)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._release)

    def _release(self) -> None:
        self._scheduled = False
        keys = [k for k in self._unpin if self.pins[k] <= 0]
        self._unpin.clear()
        for k in keys:
            del self.pins[k]
        keys = [k for k in keys if k in self.scheduler.tasks]
        if keys:
            _compat.unwant_keys(
                self.scheduler, keys, PIN_CLIENT, f"storage-inputs-released-{time.time()}"
            )

    def clear(self) -> None:
        """``Scheduler.restart`` forgot every task and released every client's keys."""
        self.costs.clear()
        self.inputs.clear()
        self.pins.clear()
        self._unpin.clear()
