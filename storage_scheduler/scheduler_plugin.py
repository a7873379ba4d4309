"""The scheduler side: storage lanes as replicas of stored keys.

The plugin builds ``lanes`` pseudo-workers (scheduler ``WorkerState`` objects with
``storage://<store-id>-lane<i>`` addresses, paused, without threads) that are never
added to ``scheduler.workers``: no broadcast, heartbeat, dashboard table, ``client.run``
or adaptive decision ever sees them. When a worker reports a task finished with its
result stored, the key's lane is added to ``TaskState.who_has`` in the same transition.
From there on, stock code paths do the rest:

* a worker that dies does not take stored keys with it: ``remove_worker`` recomputes a
  key only when no holder is left, and the lane still holds it;
* dependents, ``Client.gather`` and ``replicate`` fetch from the lane (the ``storage://``
  comm reads the store);
* retiring a worker only drops its replicas: nothing is copied to peers.

Several lanes, because a worker keeps at most one transfer in flight per holder: the
lane count is the number of concurrent store reads per worker.

Reuse: the plugin keeps a :class:`~storage_scheduler.catalog.Catalog` of the stored keys
(loaded from the store's manifest at start). When a graph arrives, the walk down from the
requested keys stops at keys whose stored result was produced by the same task (equal
tokens): their upstream subgraph never runs. A stored key nobody asked for is put in
memory at once, held by its lane; a requested one gets a small task that loads it from
the store (the scheduler cannot put a requested key in memory from the ``update_graph``
hook: the stock code has already recommended it for computation).

Lifecycle: results no client asked for (intermediates) are deleted from the store as soon
as nothing needs them, when stock Dask frees them from RAM (``gc: intermediates``); results of ``compute``, ``persist`` and
``submit``, and keys annotated ``storage_keep=True``, stay until ``dask storage gc``. A
cluster sharing the store with others publishes the keys it holds in a lease
(``leases/<id>``) and never deletes a key in another live cluster's lease.

Notes
-----
Hooks run on the scheduler's event loop and do no store I/O; catalog writes, leases and
deletions run in one background task.
Uses private scheduler API (the ``WorkerState`` constructor, ``add_replica``,
``remove_replica``); ``distributed`` is pinned to a tested range for that reason.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

from dask._task_spec import Alias, Task
from distributed.active_memory_manager import ReduceReplicas
from distributed.core import Status
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.protocol.pickle import dumps
from distributed.scheduler import TaskState, WorkerState
from distributed.shuffle._core import P2PBarrierTask

from storage_scheduler._exceptions import StorageSchedulerError
from storage_scheduler.amm import LaneAwareReduceReplicas, MemoryRelief
from storage_scheduler.catalog import Catalog, keys_leased_by_others, write_lease
from storage_scheduler.comm import is_lane, lane_addresses, registry, store_id_for
from storage_scheduler.config import RoutingSettings, StoreSettings, parse_storage_options
from storage_scheduler.dashboard import add_dashboard_page
from storage_scheduler.metrics import register_scheduler_plugin as register_metrics
from storage_scheduler.metrics import unregister_scheduler_plugin as unregister_metrics
from storage_scheduler.store import Store
from storage_scheduler.tokens import task_token
from storage_scheduler.worker_plugin import (
    HEARTBEAT_KEY,
    METADATA_KEY,
    PLUGIN_NAME,
    StorageWorkerPlugin,
    is_finalize_key,
    load_stored,
)

if TYPE_CHECKING:
    from distributed import Scheduler

__all__ = ["StorageSchedulerPlugin"]

logger = logging.getLogger(__name__)

#: Seconds a cluster's lease protects the keys it holds from other clusters' deletions;
#: renewed at half-life while the scheduler runs.
LEASE_TTL = 60.0
LEASE_MIN_INTERVAL = 2.0
#: Catalog segments a running scheduler writes before folding them into one snapshot.
COMPACT_EVERY = 1000


def mark_p2p_steps(scheduler: Scheduler, keys: Collection[Any]) -> None:
    """Annotate the transfers and barrier of every new P2P shuffle ``storage=False``.

    They are steps of distributed's shuffle service, not results: a transfer hands its
    input to the service and returns a run id, the barrier waits for every transfer.
    "Reused" on their own, without the run they fed, they would leave the shuffle's
    outputs incomplete. The outputs themselves are ordinary results, stored and reused;
    reusing them makes the whole shuffle unnecessary. Transfers are found as the
    barrier's dependencies, through the aliases that graph fusion leaves in between.
    """
    for key in keys:
        ts = scheduler.tasks.get(key)
        if ts is None or not isinstance(ts.run_spec, P2PBarrierTask):
            continue
        steps = [ts]
        while steps:
            step = steps.pop()
            step.annotations = {**(step.annotations or {}), "storage": False}
            if step is ts or isinstance(step.run_spec, Alias):
                steps.extend(step.dependencies)


class StorageSchedulerPlugin(SchedulerPlugin):
    """Scheduler half of storage_scheduler: lanes, replica bookkeeping, worker wiring.

    Parameters
    ----------
    url
        fsspec URL of the store; default ``storage-scheduler.url``.
    storage_options
        Filesystem options; merged over ``storage-scheduler.storage-options``. Values may
        be ``key=value`` strings (from the command line).
    lanes
        Number of storage lanes; default ``storage-scheduler.lanes``.

    Settings are read and validated in :meth:`start`, so that a bad URL or an unreachable
    store stops the scheduler from starting instead of being logged and ignored.
    """

    name = PLUGIN_NAME

    scheduler: Scheduler
    store: Store
    settings: StoreSettings
    routing: RoutingSettings
    store_id: str
    #: The lanes by address; never in ``scheduler.workers``.
    lanes: dict[str, WorkerState]
    _lane_list: list[WorkerState]
    #: Keys whose result a worker reported stored (lane replicas added), since start.
    stored_total: int
    #: Keys dropped from a lane because their object could not be read.
    unreadable_total: int
    #: Index of the stored keys (all clusters' that share the store, as of start).
    catalog: Catalog
    #: Keys reused from the store instead of being computed, since start.
    reused_total: int
    #: Stored objects deleted by the lifecycle policy, since start.
    deleted_total: int
    #: Requested keys running as loaders: their own spec and dependencies, kept so that
    #: they can be computed after all if loading fails.
    _loaders: dict[Any, tuple[Any, list[TaskState]]]
    #: Keys a client asked for (kept in the store when forgotten).
    _wanted: set[Any]
    #: Keys whose objects are to be deleted.
    _doomed: set[Any]
    _background: asyncio.Task[None] | None
    #: Whether workers store new results (``storage_scheduler.disable`` turns it off).
    writing: bool
    #: Bytes of the objects workers reported stored, since start.
    stored_bytes_total: int
    #: (time, bytes stored so far, bytes read by workers so far), sampled every second.
    history: collections.deque[tuple[float, int, int]]
    #: (keys, bytes) held by the lanes when the lease was last written.
    _lease_signature: tuple[int, int]
    _lease_expires: float

    def __init__(
        self,
        url: str | None = None,
        storage_options: dict[str, Any] | Sequence[str] | None = None,
        lanes: int | None = None,
    ):
        self._url = url
        self._storage_options = storage_options
        self._lanes = lanes
        self.lanes = {}
        self._lane_list = []
        self.stored_total = 0
        self.unreadable_total = 0
        self.reused_total = 0
        self.deleted_total = 0
        self._loaders = {}
        self._wanted = set()
        self._doomed = set()
        self._background = None
        self._lease_signature = (-1, -1)
        self._lease_expires = 0.0
        self.writing = True
        self.stored_bytes_total = 0
        self.history = collections.deque(maxlen=600)

    # ------------------------------------------------------------------ lifecycle

    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        options = self._storage_options or {}
        if not isinstance(options, dict):
            options = parse_storage_options(options)
        self.settings = StoreSettings.from_config(self._url, options)
        self.routing = RoutingSettings.from_config(self._lanes)
        store = Store(self.settings)
        try:
            await store.check()
        except Exception:
            store.close()
            raise
        try:
            catalog = Catalog(store, uuid.uuid4().hex[:12])
            await catalog.load()
        except Exception:
            store.close()
            raise
        self.store = store
        self.catalog = catalog
        self.store_id = store_id_for(self.settings.url)
        self._lane_list = [
            self._make_lane(addr) for addr in lane_addresses(self.store_id, self.routing.lanes)
        ]
        self.lanes = {ws.address: ws for ws in self._lane_list}
        registry.register(self.store_id, self.store, self._drop_unreadable)
        scheduler.stream_handlers["storage-unreadable"] = self.handle_unreadable
        scheduler.handlers["storage_info"] = self.storage_info
        scheduler.handlers["storage_set_writing"] = self.set_writing
        scheduler.handlers["storage_status"] = self.storage_status
        self._install_amm_policy()
        self._background = asyncio.create_task(self._maintain())
        try:
            await self._push_worker_plugin()
        except Exception:
            await scheduler.unregister_worker_plugin(None, PLUGIN_NAME)
            await self.close()
            raise
        register_metrics(self)
        add_dashboard_page(scheduler, self)
        logger.info(
            "Storing results in %s (%d lanes, results=%s, prefer=%s)",
            self.settings.url,
            self.routing.lanes,
            self.routing.results,
            self.routing.prefer,
        )

    async def _push_worker_plugin(self) -> None:
        """Install (or replace) the worker side on every worker, present and future.

        What ``Scheduler.register_worker_plugin`` does, but collecting each worker's error
        instead of raising the first one, so that the message can name every worker that
        failed (package missing, store unreachable from it).
        """
        plugin = StorageWorkerPlugin(self.settings, self.store_id, self.routing, self.writing)
        data = dumps(plugin)
        self.scheduler.worker_plugins[PLUGIN_NAME] = data  # for workers that join later
        responses = await self.scheduler.broadcast(
            msg={"op": "plugin-add", "plugin": data, "name": PLUGIN_NAME}, on_error="return"
        )
        failed = {
            addr: repr(r) if isinstance(r, BaseException) else (r.get("exception_text") or str(r))
            for addr, r in responses.items()
            if isinstance(r, BaseException) or r.get("status") != "OK"
        }
        if failed:
            details = "; ".join(f"{addr}: {text}" for addr, text in sorted(failed.items()))
            raise StorageSchedulerError(
                f"storage_scheduler could not start on {len(failed)} worker(s) with store "
                f"{self.settings.url!r}: {details}"
            )

    async def set_writing(self, write: bool) -> dict[str, Any]:
        """Start or stop storing new results (RPC); stored results stay readable."""
        if write != self.writing:
            self.writing = write
            await self._push_worker_plugin()
            logger.info("%s new results in %s", "Storing" if write else "No longer storing", self.settings.url)
        return self.storage_info()

    async def close(self) -> None:
        if not hasattr(self, "store"):
            return  # never started
        if self._background is not None:
            self._background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._background
        try:
            await self._maintain_once()
            await self.store.delete_files([self._lease_name])
        except Exception as e:
            logger.warning("Could not save the catalog to %s at close: %s", self.settings.url, e)
        unregister_metrics(self)
        registry.unregister(self.store_id, self.store)
        self.scheduler.stream_handlers.pop("storage-unreadable", None)
        self.scheduler.handlers.pop("storage_info", None)
        self.scheduler.handlers.pop("storage_set_writing", None)
        self.scheduler.handlers.pop("storage_status", None)
        self._uninstall_amm_policy()
        self.store.close()

    def _make_lane(self, address: str) -> WorkerState:
        return WorkerState(
            address=address,
            status=Status.paused,  # never chosen to run anything
            pid=0,
            name=address,
            nthreads=0,
            memory_limit=0,
            local_directory="",
            nanny=None,
            server_id=address,
            scheduler=self.scheduler,
        )

    def _install_amm_policy(self) -> None:
        amm = self.scheduler.extensions.get("amm")
        if amm is None:
            return
        for policy in list(amm.policies):
            if type(policy) is ReduceReplicas:
                amm.policies.discard(policy)
                amm.add_policy(LaneAwareReduceReplicas())
        if self.routing.memory_relief != "never":
            amm.add_policy(MemoryRelief(self.routing.memory_relief, self.routing.relief_threshold))

    def _uninstall_amm_policy(self) -> None:
        amm = self.scheduler.extensions.get("amm")
        if amm is None:
            return
        for policy in list(amm.policies):
            if type(policy) is LaneAwareReduceReplicas:
                amm.policies.discard(policy)
                amm.add_policy(ReduceReplicas())
            elif type(policy) is MemoryRelief:
                amm.policies.discard(policy)

    def restart(self, scheduler: Scheduler) -> None:
        # Scheduler.restart forgets all tasks (without transitions) but only clears the
        # real workers. Stored results stay in the store and the catalog.
        for ws in self._lane_list:
            ws._has_what.clear()
            ws.nbytes = 0
        self._loaders.clear()
        self._wanted.clear()

    # ---------------------------------------------------------------- replicas

    def lane_for(self, key: Any) -> WorkerState:
        """The lane that holds ``key`` (a fixed spread of keys over lanes)."""
        return self._lane_list[hash(key) % len(self._lane_list)]

    def transition(
        self, key: Any, start: str, finish: str, *args: Any, stimulus_id: str, **kwargs: Any
    ) -> None:
        if start == "processing":
            if finish == "memory":
                self._finished(key, kwargs.get("metadata") or {}, stimulus_id)
            elif key in self._loaders:
                self._restore_loader(key)
        elif finish == "forgotten":
            self._forgotten(key)
        elif start == "memory" and finish == "released":
            # Nothing needs it any more: stock Dask frees it from RAM; free it from the store.
            self._maybe_delete(key)

    def _finished(self, key: Any, metadata: dict[str, Any], stimulus_id: str) -> None:
        stored = metadata.get(METADATA_KEY)
        if key in self._loaders:
            _, deps = self._loaders.pop(key)
            # The original dependencies were kept in case loading failed; now they can go.
            asyncio.get_running_loop().call_soon(self._forget_orphans, deps, stimulus_id)
        if stored is None:
            return
        ts = self.scheduler.tasks.get(key)
        if ts is None or ts.state != "memory":
            return
        self.scheduler.add_replica(ts, self.lane_for(key))
        if "token" in stored:
            self.stored_bytes_total += stored["nbytes"]
            token = stored["token"]
            if self.routing.lineage:
                token = self._lineage_token(ts, {}, own=token, use_catalog=True)
            self.catalog.add(key, token, stored["nbytes"])
            self.stored_total += 1

    def _forgotten(self, key: Any) -> None:
        self._loaders.pop(key, None)
        self._maybe_delete(key)
        self._wanted.discard(key)

    def _maybe_delete(self, key: Any) -> None:
        """Delete an intermediate (a result no client asked for) that nothing needs now."""
        if key in self._wanted or self.routing.gc != "intermediates" or key not in self.catalog:
            return
        ts = self.scheduler.tasks.get(key)
        if ts is not None and (ts.annotations or {}).get("storage_keep"):
            return
        self.catalog.discard(key)
        self._doomed.add(key)

    # ---------------------------------------------------------------------- reuse

    def _own_token(self, ts: TaskState) -> str:
        salt = (self.routing.version, (ts.annotations or {}).get("storage_version"))
        return task_token(ts.run_spec, salt)

    def _token(self, ts: TaskState, memo: dict[Any, str]) -> str:
        """The token a stored result of ``ts`` must carry to be reused."""
        if self.routing.lineage:
            return self._lineage_token(ts, memo)
        return self._own_token(ts)

    def _lineage_token(
        self, root: TaskState, memo: dict[Any, str], own: str | None = None, use_catalog: bool = False
    ) -> str:
        """The token of ``root`` combined with those of everything upstream of it.

        When a graph asks to reuse a result, it is computed from the new graph's specs.
        When a result is stored (``use_catalog``), the dependencies that were stored carry
        theirs in the catalog already, and ``own`` is the token the worker computed.
        Iterative, not recursive: graphs can be deeper than Python's recursion limit.
        """

        def known(dts: TaskState) -> str | None:
            if use_catalog:
                entry = self.catalog.get(dts.key)
                if entry is not None and entry.token is not None:
                    return entry.token
            if dts.run_spec is None:
                return f"data:{dts.key!r}"  # scattered data: known by its key only
            return memo.get(dts.key)

        stack = [root]
        while stack:
            ts = stack[-1]
            pending = [dts for dts in ts.dependencies if known(dts) is None]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            parts = tuple(known(dts) for dts in sorted(ts.dependencies, key=lambda d: str(d.key)))
            base = own if ts is root and own is not None else self._own_token(ts)
            memo[ts.key] = task_token(None, (base, parts))
        return memo[root.key]

    def update_graph(
        self, scheduler: Scheduler, *, keys: set[Any], stimulus_id: str, **kwargs: Any
    ) -> None:
        self._wanted.update(keys)
        mark_p2p_steps(scheduler, kwargs.get("tasks", ()))
        for key in keys:
            if is_finalize_key(key) and key in scheduler.tasks:
                # Client.compute's wrapper: what it wraps is the result the user wants.
                self._wanted.update(dts.key for dts in scheduler.tasks[key].dependencies)
        if not self.catalog.entries:
            return
        # Walk down from the requested keys; stop at keys the store holds for this task.
        reusable: list[TaskState] = []
        memo: dict[Any, str] = {}
        seen: set[Any] = set()
        stack = list(keys)
        while stack:
            key = stack.pop()
            if key in seen:
                continue
            seen.add(key)
            ts = scheduler.tasks.get(key)
            if ts is None or ts.state != "released" or ts.run_spec is None:
                continue  # known to this cluster already: stock rules apply
            entry = self.catalog.get(key)
            if entry is not None and (ts.annotations or {}).get("storage") is not False:
                if entry.token == self._token(ts, memo):
                    reusable.append(ts)
                    continue
                self.catalog.discard(key)  # stale: it is computed and overwritten
            stack.extend(dts.key for dts in ts.dependencies)

        for ts in reusable:
            entry = self.catalog.get(ts.key)
            assert entry is not None
            if ts.key in keys:
                self._make_loader(ts)
            else:
                ts.state = "memory"
                ts.set_nbytes(entry.nbytes)
                scheduler.add_replica(ts, self.lane_for(ts.key))
        self.reused_total += len(reusable)
        if reusable:
            logger.info("Reusing %d stored results instead of computing them", len(reusable))

    def _make_loader(self, ts: TaskState) -> None:
        """Give a requested stored key a body that loads it, and no dependencies."""
        deps = list(ts.dependencies)
        self._loaders[ts.key] = (ts.run_spec, deps)
        for dts in deps:
            dts.dependents.discard(ts)
            if dts.waiters:
                dts.waiters.discard(ts)
        ts.dependencies.clear()
        ts.run_spec = Task(ts.key, load_stored, ts.key)

    def _restore_loader(self, key: Any) -> None:
        """Loading failed (or its worker died): make the key a normal task again."""
        spec, deps = self._loaders.pop(key)
        ts = self.scheduler.tasks[key]
        ts.run_spec = spec
        for dts in deps:
            if dts.key in self.scheduler.tasks:
                ts.add_dependency(dts)
        self.catalog.discard(key)
        logger.info("Computing %r: its stored result could not be loaded", key)

    def _forget_orphans(self, deps: list[TaskState], stimulus_id: str) -> None:
        recommendations = {
            dts.key: "forgotten"
            for dts in deps
            if dts.state == "released" and not dts.dependents and not dts.who_wants
        }
        if recommendations:
            self.scheduler.transitions(recommendations, stimulus_id)

    # ------------------------------------------------------------- maintenance

    @property
    def _lease_name(self) -> str:
        return f"leases/{self.catalog.writer_id}"

    async def _maintain(self) -> None:
        """Background: write catalog changes, the lease, and delete doomed objects."""
        failing = False
        while True:
            await asyncio.sleep(self.routing.flush_interval)
            try:
                await self._maintain_once()
            except Exception as e:
                if not failing:  # once per outage, not every interval
                    logger.warning(
                        "Cannot update the catalog in %s (will retry): %s", self.settings.url, e
                    )
                failing = True
            else:
                if failing:
                    logger.warning("The catalog in %s is up to date again", self.settings.url)
                failing = False

    def _sample(self) -> None:
        now = time.time()
        if self.history and now - self.history[-1][0] < 1.0:
            return
        read = sum(
            ws.metrics.get(HEARTBEAT_KEY, {}).get("bytes_read", 0)
            for ws in self.scheduler.workers.values()
        )
        self.history.append((now, self.stored_bytes_total, read))

    async def _maintain_once(self) -> None:
        self._sample()
        if self._doomed:
            await self._delete_doomed()
        await self.catalog.flush()
        if self.catalog.segments_since_compaction > COMPACT_EVERY:
            await self.catalog.compact()  # a long-running cluster flushes many segments
        # What the lanes hold, cheaply: the key set itself is built only when the lease is
        # rewritten (it can hold millions of keys; this runs every flush interval).
        signature = (
            sum(len(ws.has_what) for ws in self._lane_list),
            sum(ws.nbytes for ws in self._lane_list),
        )
        now = time.time()
        # Rewritten when what the lanes hold changed, and at half-life in any case. A big
        # lease (it lists every key) is rewritten at most every LEASE_MIN_INTERVAL.
        changed = signature != self._lease_signature
        due = now > self._lease_expires - LEASE_TTL / 2
        throttled = signature[0] > 10_000 and now < self._lease_expires - LEASE_TTL + LEASE_MIN_INTERVAL
        if due or (changed and not throttled):
            held = [ts.key for ws in self._lane_list for ts in ws.has_what]
            await write_lease(self.store, self._lease_name, held, now + LEASE_TTL)
            self._lease_signature = signature
            self._lease_expires = now + LEASE_TTL

    async def _delete_doomed(self) -> None:
        doomed, self._doomed = self._doomed, set()
        protected = await keys_leased_by_others(self.store, own_lease=self._lease_name)
        victims = [k for k in doomed if k not in protected]
        try:
            await self.store.delete(victims)
        except BaseException:
            self._doomed.update(victims)  # try again at the next round
            raise
        self.deleted_total += len(victims)

    # ------------------------------------------------------------------ handlers

    def handle_unreadable(self, keys: list[Any], stimulus_id: str, worker: str | None = None) -> None:
        """A worker could not read these keys from their lanes (stream op)."""
        self._drop_unreadable(keys, stimulus_id=stimulus_id)

    def _drop_unreadable(self, keys: list[Any], stimulus_id: str | None = None) -> None:
        """Forget the lane replicas of keys whose objects cannot be read.

        A key left with no holder is released, which recomputes it if anything still
        wants it (what ``remove_worker`` does for a lost worker's keys).
        """
        recommendations: dict[Any, str] = {}
        for key in keys:
            self.catalog.discard(key)
            ts: TaskState | None = self.scheduler.tasks.get(key)
            if ts is None or ts.state != "memory" or not ts.who_has:
                continue
            for ws in [ws for ws in ts.who_has if ws.address in self.lanes]:
                self.scheduler.remove_replica(ts, ws)
                self.unreadable_total += 1
            if not ts.who_has:
                recommendations[key] = "released"
        if recommendations:
            logger.warning(
                "Recomputing %d keys whose stored results cannot be read", len(recommendations)
            )
            self.scheduler.transitions(
                recommendations, stimulus_id or f"storage-unreadable-{time.time()}"
            )

    def storage_status(self) -> dict[str, Any]:
        """The store and every worker's use of it: ``dask storage status`` and the page."""
        workers = []
        for ws in sorted(self.scheduler.workers.values(), key=lambda w: w.address):
            traffic = ws.metrics.get(HEARTBEAT_KEY, {})
            memory = ws.memory
            workers.append(
                {
                    "address": ws.address,
                    "name": str(ws.name),
                    "results_ram": memory.managed,
                    "tasks_ram": memory.unmanaged,
                    "memory_limit": ws.memory_limit,
                    **{k: traffic.get(k, 0) for k in (
                        "bytes_written", "objects_written", "bytes_read",
                        "write_failures", "not_stored", "writes_in_flight",
                    )},  # fmt: skip
                }
            )
        return {**self.storage_info(), "workers": workers, "history": list(self.history)}

    def storage_info(self) -> dict[str, Any]:
        """What the store holds for this cluster, for clients and ``dask storage``."""
        return {
            "url": self.settings.url,
            "store_id": self.store_id,
            "lanes": list(self.lanes),
            "keys_in_lanes": sum(len(ws.has_what) for ws in self._lane_list),
            "bytes_in_lanes": sum(ws.nbytes for ws in self._lane_list),
            "stored_total": self.stored_total,
            "unreadable_total": self.unreadable_total,
            "reused_total": self.reused_total,
            "deleted_total": self.deleted_total,
            "catalog_keys": len(self.catalog),
            "catalog_bytes": self.catalog.nbytes,
            "stored_bytes_total": self.stored_bytes_total,
            "writing": self.writing,
            "results": self.routing.results,
            "prefer": self.routing.prefer,
        }
