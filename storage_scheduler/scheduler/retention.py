"""Retention: which stored results stay, which go, and what protects them.

Results no client asked for (intermediates) are deleted from the store as soon as nothing
needs them, when stock Dask frees them from RAM (``gc: intermediates``); results of
``compute``, ``persist`` and ``submit``, and keys annotated ``storage_keep=True``, stay
until ``dask storage gc``. A cluster sharing the store with others publishes the keys it
holds in a lease (``leases/<id>``) and never deletes a key in another live cluster's lease.

Hooks only update sets in memory. :meth:`Retention.maintain` writes catalog changes and
deletes doomed objects, from the plugin's background task; :meth:`Retention.update_lease`
renews the lease from a task of its own, so that no failing deletion or flush (a bucket
that refuses deletes, a full disk) ever stops the renewal.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from storage_scheduler import _compat
from storage_scheduler._exceptions import IntegrityError
from storage_scheduler.store import Store
from storage_scheduler.store.catalog import Catalog, Entry
from storage_scheduler.store.inventory import sweep_partial_writes
from storage_scheduler.store.leases import LEASE_TTL, LeaseReader, LeaseWriter

if TYPE_CHECKING:
    from distributed import Scheduler

    from storage_scheduler.config import SchedulerSettings
    from storage_scheduler.scheduler.lanes import Lanes

__all__ = ["Retention"]

logger = logging.getLogger(__name__)

#: The lease is renewed when this much of its ``ttl`` has passed since it was written.
RENEW_AFTER = LEASE_TTL / 4
#: Updating the lease's key list takes at most about 1/LEASE_COST_RATIO of the time: after
#: an update that took t seconds, the next one waits (LEASE_COST_RATIO - 1) * t. Measured
#: (benchmarks/lifecycle.py): ~1 s of thread time to list 1M held keys anew.
LEASE_COST_RATIO = 10.0
#: Longest wait of a closing scheduler for other clusters' rounds (seconds).
CLOSE_WAIT_MAX = 10.0
#: Forgotten requested keys remembered for writes still running (write-behind).
LET_GO_MAX = 100_000
#: Catalog segments a running scheduler writes before folding them into one snapshot.
COMPACT_EVERY = 1000
#: Objects whose headers are read at once when checking whether they were written again.
REWRITE_CHECKS_AT_ONCE = 256


class Retention:
    """The lifecycle of one cluster's stored results.

    Notes
    -----
    Everything but :meth:`maintain` and :meth:`close` runs in scheduler hooks, on the
    event loop, without I/O.
    """

    scheduler: Scheduler
    store: Store
    catalog: Catalog
    lanes: Lanes
    settings: SchedulerSettings
    #: Keys a client asked for (kept in the store when forgotten).
    wanted: set[Any]
    #: Keys a client asked for and that were forgotten since, the latest last: a result
    #: whose write lands later (write-behind) is kept too.
    let_go: dict[Any, None]
    #: Stored results (key, token) whose objects are to be deleted: the maintenance round
    #: in which each was doomed, and its catalog entry (whose ``created`` is the time its
    #: object was written: the object's identity).
    doomed: dict[tuple[Any, str | None], tuple[int, Entry]]
    #: Maintenance rounds since start.
    rounds: int
    #: How long closing waits before deleting results doomed in the last round.
    close_wait: float
    #: Stored objects deleted by the lifecycle policy, since start.
    deleted_total: int
    #: What this cluster holds, published for other clusters and tools.
    lease: LeaseWriter
    #: Other clusters' leases, read before deleting.
    leases: LeaseReader
    #: (keys, bytes) held by the lanes when the lease's key list was last written.
    _lease_signature: tuple[int, int]
    #: No key-list update before this time (time.monotonic()): bounds its cost.
    _lease_not_before: float

    def __init__(
        self,
        scheduler: Scheduler,
        store: Store,
        catalog: Catalog,
        lanes: Lanes,
        settings: SchedulerSettings,
    ):
        self._tasks: list[asyncio.Task[None]] = []
        self.scheduler = scheduler
        self.store = store
        self.catalog = catalog
        self.lanes = lanes
        self.settings = settings
        self.wanted = set()
        self.let_go = {}
        self.doomed = {}
        self.rounds = 0
        self.close_wait = min(2 * settings.flush_interval, CLOSE_WAIT_MAX)
        self.deleted_total = 0
        self.lease = LeaseWriter(store, catalog.writer_id, tasks=True)
        self.leases = LeaseReader()
        self._lease_signature = (-1, -1)
        self._lease_not_before = 0.0

    @property
    def lease_name(self) -> str:
        return self.lease.name

    # ------------------------------------------------------------------ hooks

    def requested(self, keys: Iterable[Any]) -> list[Any]:
        """A client asked for ``keys``: keep their results, in this run and later ones.
        Returns the keys whose results are wanted."""
        wanted, stack = [], list(keys)
        while stack:
            key = stack.pop()
            wanted.append(key)
            ts = self.scheduler.tasks.get(key)
            if ts is not None and _compat.is_finalize_key(key):
                # compute's wrapper (and what dask.compute fused into it, under a name as
                # new): what it wraps is the result the user wants.
                stack.extend(dts.key for dts in ts.dependencies)
        self.wanted.update(wanted)
        return wanted

    def keep_reused(self, wanted: Iterable[Any], reused: dict[Any, str | None]) -> None:
        """Wanted results that are reused, not stored again: record them as kept."""
        for key in wanted:
            if key in reused:
                self.catalog.keep(key, reused[key])

    def keeps(self, key: Any) -> bool:
        """Whether ``key``'s result is to be kept when it is stored (also when its write
        lands after the client let go of it: write-behind)."""
        ts = self.scheduler.tasks.get(key)
        annotated = ts is not None and bool((ts.annotations or {}).get("storage_keep"))
        return key in self.wanted or annotated or key in self.let_go

    def released(self, key: Any) -> None:
        """Nothing needs ``key`` any more: stock Dask frees it from RAM, and from the
        store too if it is an intermediate."""
        token = self.lanes.tokens.get(key)
        entry = self.catalog.get(key, token)
        if entry is None or entry.kept or self.settings.gc != "intermediates" or self.keeps(key):
            return
        self.catalog.discard(key, token)
        self.doomed[key, token] = (self.rounds, entry)

    def dropped(self, key: Any, token: str | None) -> None:
        """A result of ``key`` landed after nothing held the key any more (a late
        write-behind): delete it unless it is to be kept."""
        entry = self.catalog.get(key, token)
        if entry is None or entry.kept or self.settings.gc != "intermediates" or self.keeps(key):
            return
        self.catalog.discard(key, token)
        self.doomed[key, token] = (self.rounds, entry)

    def stored(self, key: Any, token: str | None) -> None:
        """``key`` was stored again: a deletion still pending would remove the new object."""
        self.doomed.pop((key, token), None)

    def forgotten(self, key: Any) -> None:
        self.released(key)
        if key in self.wanted:
            self.wanted.discard(key)
            self.let_go[key] = None
            if len(self.let_go) > LET_GO_MAX:
                del self.let_go[next(iter(self.let_go))]

    def restart(self) -> None:
        self.wanted.clear()
        self.let_go.clear()

    # -------------------------------------------------------------- background

    async def maintain(self) -> None:
        """Delete doomed objects, write catalog changes (not the lease: see
        :meth:`update_lease`)."""
        self.rounds += 1
        # The catalog first: an object is deleted only once its removal from the catalog
        # is written (a failed flush postpones the deletions), else the store's catalog
        # lists results that are gone.
        await self.catalog.flush()
        if self.doomed:
            await self.delete_doomed()
        if self.catalog.segments_since_compaction > COMPACT_EVERY:
            await self.catalog.compact()  # a long-running cluster flushes many segments

    async def announce(self) -> None:
        """Publish this cluster's lease before it stores anything: a cluster that reads no
        other live lease then knows that nobody else is writing (see
        :meth:`delete_doomed`)."""
        try:
            await self.update_lease()
        except Exception as e:
            logger.warning(
                "Cannot write this cluster's lease in %s (will retry): %s", self.store.url, e
            )

    def start(self, each_round: Callable[[], None]) -> None:
        """Start the background tasks: catalog and deletions every ``flush-interval``
        (calling ``each_round`` first), and the lease, in a task of its own: no failure of
        :meth:`maintain` may stop its renewal."""
        self._tasks = [
            asyncio.create_task(self._every(self.maintain, "update the catalog", each_round)),
            asyncio.create_task(self._every(self.update_lease, "update this cluster's lease")),
            asyncio.create_task(self._sweep()),
        ]

    async def stop(self) -> None:
        """Stop the background tasks (:meth:`close` then writes what is left)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _every(
        self,
        step: Callable[[], Awaitable[None]],
        what: str,
        each_round: Callable[[], None] = lambda: None,
    ) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.settings.flush_interval)
            each_round()
            try:
                await step()
            except Exception as e:
                if not failing:  # once per outage, not every interval
                    logger.warning("Cannot %s in %s (will retry): %s", what, self.store.url, e)
                failing = True
            else:
                if failing:
                    logger.warning("Could %s in %s again", what, self.store.url)
                failing = False

    async def _sweep(self) -> None:
        """Once, at start: remove what writers killed mid-write left behind long ago."""
        try:
            await sweep_partial_writes(self.store)
        except Exception as e:
            logger.warning("Cannot remove old partial writes from %s: %s", self.store.url, e)

    async def update_lease(self) -> None:
        """List new held keys in the lease, and renew it when due.

        The key list is updated when what the lanes hold changed, at most
        1/LEASE_COST_RATIO of the time; the renewal (a small file) happens even when the
        key list cannot be written.
        """
        # What the lanes hold, cheaply: the keys are snapshot only when they changed.
        signature = (self.lanes.nkeys, self.lanes.nbytes)
        error: Exception | None = None
        if self.lease.lapsed or (
            signature != self._lease_signature and time.monotonic() >= self._lease_not_before
        ):
            start = time.monotonic()
            try:
                await self.lease.publish(await self.lanes.snapshot())
                self._lease_signature = signature
            except Exception as e:
                error = e
            now = time.monotonic()
            self._lease_not_before = now + (LEASE_COST_RATIO - 1) * (now - start)
        if time.time() - self.lease.renewed > RENEW_AFTER:
            await self.lease.renew()
        if error is not None:
            raise error

    async def delete_doomed(self, now: bool = False) -> None:
        """Delete the objects of results doomed before the last round (or all, ``now``).

        A round's wait gives every other cluster sharing the store a round of its own to
        record that it stored or keeps one of them. Spared: what another live cluster
        leases, what another cluster's catalog records meanwhile, and an object written
        again since it was doomed (its header's time is not the one doomed).
        """
        due = [kt for kt, (r, _) in self.doomed.items() if now or r < self.rounds - 1]
        if not due:
            return
        # Leases and the others' catalog changes first: unread, nothing is deleted.
        protected = await self.leases.leased(self.store, own_lease=self.lease_name)
        await self.catalog.refresh()
        loop = asyncio.get_running_loop()  # a loop over every doomed key: in a thread
        free = await loop.run_in_executor(
            None,
            lambda: [kt for kt in due if kt[0] not in protected and self.catalog.get(*kt) is None],
        )
        if protected.live:
            rewritten = await self._rewritten_batches(free)
        else:
            # No other live cluster (each publishes its lease before it stores anything):
            # nobody can have written one of these again; spare the store a read of each.
            rewritten = [False] * len(free)
        victims = [kt for kt, again in zip(free, rewritten, strict=True) if not again]
        await self.store.delete_versions(victims)  # on failure: all still doomed, retried
        # Written again or deleted since: the catalog's deletion record was of this very
        # write only (another cluster's entry for the new one stands); nothing to undo.
        settled = set(free)
        for key, token in due:
            _, entry = self.doomed.pop((key, token))
            if (key, token) not in settled and self.catalog.get(key, token) is None:
                # Another live cluster holds it: it stays in the catalog every cluster shares.
                self.catalog.add(key, token, entry.nbytes, entry.kept, entry.lineage, entry.created)
        self.deleted_total += len(victims)

    async def _rewritten_batches(self, results: list[tuple[Any, str | None]]) -> list[bool]:
        # In batches: one step of the event loop must not set up thousands of reads.
        out: list[bool] = []
        for i in range(0, len(results), REWRITE_CHECKS_AT_ONCE):
            batch = results[i : i + REWRITE_CHECKS_AT_ONCE]
            out.extend(await asyncio.gather(*(self._rewritten(kt) for kt in batch)))
        return out

    async def _rewritten(self, result: tuple[Any, str | None]) -> bool:
        """Whether a doomed result's object was written again since (or is gone: deleted
        by a round that a close cut short, or by another cluster)."""
        key, token = result
        try:
            header = await self.store.head(key, token)
        except FileNotFoundError:
            return True  # nothing to delete
        except IntegrityError:
            return False  # damaged: ours to delete all the same
        return header.created != self.doomed[result][1].created

    async def close(self) -> None:
        """Last catalog changes and deletions; then this cluster protects nothing."""
        try:
            if any(r >= self.rounds - 1 for r, _ in self.doomed.values()):
                # Doomed this round: give the other clusters their round to say they want
                # one of these (the next round would have), then delete what is left.
                await asyncio.sleep(self.close_wait)
            await self.catalog.flush()  # before the deletions: see maintain
            await self.delete_doomed(now=True)
            await self.maintain()
        finally:
            await self.lease.close()
