"""Which results are worth storing (``storage-scheduler.policy: worth-storing``).

A result is not stored when recomputing it from stored inputs costs less than writing it
and reading it back, and is cheap in absolute terms. Decided on the worker after the task
ran, from what Dask measured (the task's own run time, ``stop - start``, and the
result's size) and what the store measured (this worker's recent write and read
time per object and per byte; :data:`PRIOR_WRITE` / :data:`PRIOR_READ` until it has
written or read enough to tell).

The recompute cost of a result is its own run time plus, for each input the store does
not hold, that input's recompute cost divided among the input's dependents (an input
shared by four dependents is recomputed once for all four). An input the store holds
costs nothing. The scheduler sends the costs of a task's unstored inputs with the task;
an input with neither a stored object nor a known cost (scattered data, an input whose
write failed or that was annotated ``storage=False``) makes the result stored. So every
result is either stored, or recomputable from stored inputs by work whose estimated
duration is at most ``recompute-limit`` — and the scheduler keeps those stored inputs
(see :mod:`storage_scheduler.scheduler.skipped`) while the result is in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from storage_scheduler.store import StoreCounters

__all__ = ["PRIOR_READ", "PRIOR_WRITE", "StoragePolicy", "Throughput"]

#: Assumed before the store has measured anything: a local disk's per-object time and
#: bytes per second, writing and reading (measured here: ~240 MB/s writing 32-128 MiB
#: objects, a few milliseconds per small object).
PRIOR_WRITE = (2e-3, 200e6)
PRIOR_READ = (1e-3, 400e6)
#: A sample is taken once this many objects, or bytes, have gone through since the last.
SAMPLE_OBJECTS = 16
SAMPLE_BYTES = 1 << 20
#: Samples whose objects average less than this measure the per-object time, others the
#: time per byte.
SMALL = 64 << 10
#: Weight of the newest sample in the moving averages.
ALPHA = 0.3


class Throughput:
    """The cost of one direction of store traffic: seconds per object plus seconds per
    byte, moving averages over samples of the store's counters (serialization and
    verification included)."""

    def __init__(self, prior: tuple[float, float]):
        self.per_object, self.per_byte = prior[0], 1 / prior[1]
        self._seen = (0, 0, 0.0)

    def seconds(self, nbytes: int) -> float:
        return self.per_object + nbytes * self.per_byte

    def update(self, objects: int, nbytes: int, seconds: float) -> None:
        """Take a sample from the counters' totals, if enough went through since the last."""
        n, db, ds = (a - b for a, b in zip((objects, nbytes, seconds), self._seen, strict=True))
        if n <= 0 or ds <= 0 or (n < SAMPLE_OBJECTS and db < SAMPLE_BYTES):
            return
        self._seen = (objects, nbytes, seconds)
        if db / n < SMALL:
            self.per_object += ALPHA * (ds / n - self.per_object)
        else:
            sample = max(ds - n * self.per_object, ds / 2) / db
            self.per_byte += ALPHA * (sample - self.per_byte)


class StoragePolicy:
    """Decides, per finished task, whether its result is worth storing.

    Parameters
    ----------
    counters
        The worker's store counters, sampled for throughput.
    limit
        ``recompute-limit``: the most estimated recompute work (seconds) a result may
        stand for and still not be stored.
    input_cost
        The recompute cost of an input: 0 if the store holds it, None if unknown.
    """

    def __init__(
        self,
        counters: StoreCounters,
        limit: float,
        input_cost: Callable[[Any], float | None],
    ):
        self.counters = counters
        self.limit = limit
        self.input_cost = input_cost
        self.write = Throughput(PRIOR_WRITE)
        self.read = Throughput(PRIOR_READ)

    def storage_cost(self, nbytes: int) -> float:
        """Estimated seconds to write a result of ``nbytes`` and read it back."""
        c = self.counters
        self.write.update(c.objects_written, c.bytes_written, c.write_seconds.total)
        self.read.update(c.objects_read, c.bytes_read, c.read_seconds.total)
        return self.write.seconds(nbytes) + self.read.seconds(nbytes)

    def recompute_cost(self, duration: float, inputs: Iterable[Any]) -> float | None:
        """Estimated seconds to recompute a result from stored inputs; None if an input
        is neither stored nor known to be recomputable."""
        total = max(duration, 0.0)
        for key in inputs:
            cost = self.input_cost(key)
            if cost is None:
                return None
            total += cost
        return total

    def skip(self, duration: float, nbytes: int, inputs: Iterable[Any]) -> float | None:
        """The recompute cost of a result not worth storing, or None to store it."""
        cost = self.recompute_cost(duration, inputs)
        if cost is None or cost > self.limit or cost > self.storage_cost(nbytes):
            return None
        return cost
