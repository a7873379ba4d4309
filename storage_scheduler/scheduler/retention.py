"""Retention: which stored results stay, which go, and what protects them.

Results no client asked for (intermediates) are deleted from the store as soon as nothing
needs them, when stock Dask frees them from RAM (``gc: intermediates``); results of
``compute``, ``persist`` and ``submit``, and keys annotated ``storage_keep=True``, stay
until ``dask storage gc``. A cluster sharing the store with others publishes the keys it
holds in a lease (``leases/<id>``) and never deletes a key in another live cluster's lease.

Hooks only update sets in memory; :meth:`Retention.maintain` writes catalog changes and
the lease and deletes doomed objects, from the plugin's background task.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from storage_scheduler import _compat
from storage_scheduler.store import Store
from storage_scheduler.store.catalog import Catalog
from storage_scheduler.store.leases import LEASES, keys_leased_by_others, write_lease

if TYPE_CHECKING:
    from distributed import Scheduler

    from storage_scheduler.config import SchedulerSettings
    from storage_scheduler.scheduler.lanes import Lanes

__all__ = ["Retention"]

logger = logging.getLogger(__name__)

#: Seconds a cluster's lease protects the keys it holds from other clusters' deletions;
#: renewed at half-life while the scheduler runs.
LEASE_TTL = 60.0
#: A big lease (over 10,000 keys) is rewritten at most this often (seconds).
LEASE_MIN_INTERVAL = 2.0
#: Catalog segments a running scheduler writes before folding them into one snapshot.
COMPACT_EVERY = 1000


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
    #: Stored results (key, token) whose objects are to be deleted.
    doomed: set[tuple[Any, str | None]]
    #: Stored objects deleted by the lifecycle policy, since start.
    deleted_total: int
    #: (keys, bytes) held by the lanes when the lease was last written.
    _lease_signature: tuple[int, int]
    _lease_expires: float

    def __init__(
        self,
        scheduler: Scheduler,
        store: Store,
        catalog: Catalog,
        lanes: Lanes,
        settings: SchedulerSettings,
    ):
        self.scheduler = scheduler
        self.store = store
        self.catalog = catalog
        self.lanes = lanes
        self.settings = settings
        self.wanted = set()
        self.doomed = set()
        self.deleted_total = 0
        self._lease_signature = (-1, -1)
        self._lease_expires = 0.0

    @property
    def lease_name(self) -> str:
        return f"{LEASES}/{self.catalog.writer_id}"

    # ------------------------------------------------------------------ hooks

    def requested(self, keys: Iterable[Any]) -> list[Any]:
        """A client asked for ``keys``: keep their results, in this run and later ones.
        Returns the keys whose results are wanted."""
        wanted = []
        for key in keys:
            wanted.append(key)
            ts = self.scheduler.tasks.get(key)
            if ts is not None and _compat.is_finalize_key(key):
                # Client.compute's wrapper: what it wraps is the result the user wants.
                wanted.extend(dts.key for dts in ts.dependencies)
        self.wanted.update(wanted)
        return wanted

    def keep_reused(self, wanted: Iterable[Any], reused: dict[Any, str | None]) -> None:
        """Wanted results that are reused, not stored again: record them as kept."""
        for key in wanted:
            if key in reused:
                self.catalog.keep(key, reused[key])

    def keeps(self, key: Any) -> bool:
        """Whether ``key``'s result is to be kept when it is stored."""
        ts = self.scheduler.tasks.get(key)
        annotated = ts is not None and bool((ts.annotations or {}).get("storage_keep"))
        return key in self.wanted or annotated

    def released(self, key: Any) -> None:
        """Nothing needs ``key`` any more: stock Dask frees it from RAM, and from the
        store too if it is an intermediate."""
        token = self.lanes.tokens.get(key)
        entry = self.catalog.get(key, token)
        if entry is None or entry.kept or self.settings.gc != "intermediates" or self.keeps(key):
            return
        self.catalog.discard(key, token)
        self.doomed.add((key, token))

    def stored(self, key: Any, token: str | None) -> None:
        """``key`` was stored again: a deletion still pending would remove the new object."""
        self.doomed.discard((key, token))

    def forgotten(self, key: Any) -> None:
        self.released(key)
        self.wanted.discard(key)

    def restart(self) -> None:
        self.wanted.clear()

    # -------------------------------------------------------------- background

    async def maintain(self) -> None:
        """Delete doomed objects, write catalog changes, renew the lease."""
        if self.doomed:
            await self._delete_doomed()
        await self.catalog.flush()
        if self.catalog.segments_since_compaction > COMPACT_EVERY:
            await self.catalog.compact()  # a long-running cluster flushes many segments
        # What the lanes hold, cheaply: the key set itself is built only when the lease is
        # rewritten (it can hold millions of keys; this runs every flush interval).
        signature = (self.lanes.nkeys, self.lanes.nbytes)
        now = time.time()
        # Rewritten when what the lanes hold changed, and at half-life in any case. A big
        # lease (it lists every key) is rewritten at most every LEASE_MIN_INTERVAL.
        changed = signature != self._lease_signature
        due = now > self._lease_expires - LEASE_TTL / 2
        throttled = (
            signature[0] > 10_000 and now < self._lease_expires - LEASE_TTL + LEASE_MIN_INTERVAL
        )
        if due or (changed and not throttled):
            await write_lease(self.store, self.lease_name, list(self.lanes.keys()), now + LEASE_TTL)
            self._lease_signature = signature
            self._lease_expires = now + LEASE_TTL

    async def _delete_doomed(self) -> None:
        doomed, self.doomed = self.doomed, set()
        protected = await keys_leased_by_others(self.store, own_lease=self.lease_name)
        victims = [kt for kt in doomed if kt[0] not in protected]
        try:
            await self.store.delete_versions(victims)
        except BaseException:
            self.doomed.update(victims)  # try again at the next round
            raise
        self.deleted_total += len(victims)

    async def close(self) -> None:
        """Last catalog changes and deletions; then this cluster protects nothing."""
        await self.maintain()
        await self.store.delete_files([self.lease_name])
