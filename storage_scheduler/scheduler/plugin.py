"""The scheduler plugin: wiring, and the hooks that delegate to the parts.

* :mod:`~storage_scheduler.scheduler.lanes`: the store as holders of stored keys;
* :mod:`~storage_scheduler.scheduler.reuse`: stored results standing in for tasks;
* :mod:`~storage_scheduler.scheduler.retention`: what stays, what goes, leases;
* :mod:`~storage_scheduler.scheduler.amm`: lane-aware active memory manager policies;
* :mod:`~storage_scheduler.scheduler.status`: what it reports.

Notes
-----
Hooks run on the scheduler's event loop and do no store I/O; catalog writes and deletions
run in one background task, the lease in another (no failure of the first stops it).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.protocol.pickle import dumps

from storage_scheduler import _compat
from storage_scheduler._exceptions import StorageSchedulerError
from storage_scheduler._protocol import (
    METADATA_KEY,
    PLUGIN_NAME,
    StorageInfo,
    StorageStatus,
    StoredResult,
    store_id_for,
)
from storage_scheduler.comm import registry
from storage_scheduler.config import (
    SchedulerSettings,
    StoreSettings,
    parse_storage_options,
    redact_url,
)
from storage_scheduler.dashboard import add_dashboard_page
from storage_scheduler.metrics import ensure_collector
from storage_scheduler.scheduler import landed, status
from storage_scheduler.scheduler.amm import (
    forget_lost_replicas,
    install_policies,
    uninstall_policies,
)
from storage_scheduler.scheduler.lanes import Lanes
from storage_scheduler.scheduler.retention import Retention
from storage_scheduler.scheduler.reuse import Reuse, TaskTokens, mark_p2p_steps
from storage_scheduler.scheduler.skipped import Skipped
from storage_scheduler.scheduler.sources import SOURCES_ANNOTATION
from storage_scheduler.scheduler.status import Counters, History
from storage_scheduler.store import Store, probe
from storage_scheduler.store.catalog import Catalog
from storage_scheduler.worker.plugin import StorageWorkerPlugin

if TYPE_CHECKING:
    from distributed import Scheduler

__all__ = ["StorageSchedulerPlugin"]

logger = logging.getLogger(__name__)

#: Longest wait of a closing scheduler for the workers' writes still running (seconds).
FLUSH_WAIT = 10.0


def _warn_if_unsigned(store: Store) -> None:
    if not store.settings.signing_keys and not store.local:
        logger.warning(
            "The store %s is not signed: whoever can write it can run code on this "
            "cluster's workers and clients. Set storage-scheduler.signing-key "
            "(DASK_STORAGE_SCHEDULER__SIGNING_KEY) on the scheduler.",
            store.url,
        )


#: What the plugin adds to the scheduler's stream handlers and RPC handlers.
STREAM_OPS = ("storage-unreadable", "storage-lost", "storage-skipped")
HANDLERS = (
    *("storage_info", "storage_set_writing", "storage_status", "storage_tokens"),
    "storage_stored",
)


def _failures(responses: dict[str, Any]) -> dict[str, str]:
    """The workers that did not install a plugin, and why."""
    return {
        addr: repr(r) if isinstance(r, BaseException) else (r.get("exception_text") or str(r))
        for addr, r in responses.items()
        if isinstance(r, BaseException) or r.get("status") != "OK"
    }


class StorageSchedulerPlugin(SchedulerPlugin):
    """Scheduler half of storage_scheduler; pushes the worker half to every worker.

    Parameters
    ----------
    url
        fsspec URL of the store; default ``storage-scheduler.url``.
    storage_options
        Filesystem options; merged over ``storage-scheduler.storage-options``. Values may
        be ``key=value`` strings (from the command line).
    lanes
        Number of storage lanes; default ``storage-scheduler.lanes``.
    signing_key
        Key (or keys, the first signing) of the objects' MACs; default
        ``storage-scheduler.signing-key``. Travels to the workers; never shown.

    Settings are read and validated in :meth:`start`, so that a bad URL or an unreachable
    store stops the scheduler from starting instead of being logged and ignored.
    """

    name = PLUGIN_NAME

    #: Whether :meth:`start` completed (and :meth:`close` has not run).
    started: bool
    scheduler: Scheduler
    store: Store
    store_settings: StoreSettings
    settings: SchedulerSettings
    store_id: str
    catalog: Catalog
    lanes: Lanes
    reuse: Reuse
    retention: Retention
    skipped: Skipped
    counters: Counters
    history: History
    #: What workers must read back from ``probes/<catalog writer id>``.
    _nonce: str

    def __init__(
        self,
        url: str | None = None,
        storage_options: dict[str, Any] | Sequence[str] | None = None,
        lanes: int | None = None,
        signing_key: str | Sequence[str] | None = None,
    ):
        self._url = url
        self._storage_options = storage_options
        self._lanes = lanes
        self._signing_key = signing_key
        self.started = False
        self.counters = Counters()
        self.history = History()

    # ------------------------------------------------------------------ lifecycle

    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        options = self._storage_options or {}
        if not isinstance(options, dict):
            options = parse_storage_options(options)
        self.store_settings = StoreSettings.from_config(self._url, options, self._signing_key)
        self.settings = SchedulerSettings.from_config(self._lanes)
        store = Store(self.store_settings)
        try:
            await store.check()
            catalog = Catalog(store, uuid.uuid4().hex[:12])
            await catalog.load()
            # Workers must read this back: proof that they see this store, not another.
            self._nonce = await probe.publish_nonce(store, catalog.writer_id)
        except Exception:
            store.close()
            raise
        self.store, self.catalog = store, catalog
        self.store_id = store_id_for(self.store_settings.url, catalog.writer_id)
        self.lanes = Lanes(scheduler, self.store_id, self.settings.lanes)
        tokens = TaskTokens(self.settings.worker.version, self.settings.lineage, catalog)
        tokens.held, tokens.sources = self.lanes.tokens.get, partial(_sources_of, scheduler)
        self.reuse = Reuse(scheduler, self.lanes, catalog, tokens)
        self.retention = Retention(scheduler, store, catalog, self.lanes, self.settings)
        self.skipped = Skipped(scheduler, self.lanes)
        registry.register(self.store_id, store, self.drop_unreadable, self.lanes.lookup)
        scheduler.stream_handlers["storage-unreadable"] = self.handle_unreadable
        scheduler.stream_handlers["storage-lost"] = self.handle_lost
        scheduler.stream_handlers["storage-skipped"] = self.skipped.add
        scheduler.handlers["storage_stored"] = self.storage_stored
        scheduler.handlers["storage_info"] = self.storage_info
        scheduler.handlers["storage_set_writing"] = self.set_writing
        scheduler.handlers["storage_status"] = self.storage_status
        scheduler.handlers["storage_tokens"] = self.lanes.lookup
        install_policies(scheduler, self.settings)
        await self.retention.announce()
        self.retention.start(
            lambda: self.history.sample(self.counters.stored_bytes, scheduler.workers.values())
        )
        self._unwatch_graphs = _compat.watch_graphs(tokens.ahead)  # tokens off the loop
        self.started = True
        try:
            await self._push_worker_plugin()
        except Exception:
            await scheduler.unregister_worker_plugin(None, PLUGIN_NAME)
            await self.close()
            raise
        ensure_collector()
        add_dashboard_page(scheduler)
        _warn_if_unsigned(store)
        logger.info(
            "Storing results in %s (%d lanes, results=%s, prefer=%s)",
            redact_url(self.store_settings.url),
            self.settings.lanes,
            self.settings.worker.results,
            self.settings.worker.prefer,
        )

    async def _push_worker_plugin(self) -> None:
        """Install (or replace) the worker side on every worker, present and future."""
        plugin = StorageWorkerPlugin(
            self.store_settings,
            self.store_id,
            self.settings.worker,
            probe=(self.catalog.writer_id, self._nonce),
        )
        pickled = dumps(plugin)  # type: ignore[no-untyped-call]
        responses = await _compat.broadcast_worker_plugin(self.scheduler, PLUGIN_NAME, pickled)
        if failed := _failures(responses):
            details = "; ".join(f"{addr}: {text}" for addr, text in sorted(failed.items()))
            raise StorageSchedulerError(
                f"storage_scheduler could not start on {len(failed)} worker(s) with store "
                f"{redact_url(self.store_settings.url)!r}: {details}"
            )

    async def set_writing(self, write: bool) -> StorageInfo:
        """Start or stop storing new results (RPC); stored results stay readable."""
        if write != self.settings.worker.write:
            self.settings = replace(
                self.settings, worker=replace(self.settings.worker, write=write)
            )
            await self._push_worker_plugin()
            logger.info(
                "%s new results in %s",
                "Storing" if write else "No longer storing",
                redact_url(self.store_settings.url),
            )
        return self.storage_info()

    async def before_close(self) -> None:
        if self.started and self.settings.worker.durability == "write-behind":
            await landed.flush_workers(self.scheduler, FLUSH_WAIT)

    async def close(self) -> None:
        if not self.started:
            return
        self.started = False
        self._unwatch_graphs()
        await self.retention.stop()
        try:
            await self.retention.close()
            await probe.forget_nonce(self.store, self.catalog.writer_id)
        except Exception as e:
            logger.warning(
                "Could not save the catalog to %s at close: %s",
                redact_url(self.store_settings.url),
                e,
            )
        registry.unregister(self.store_id, self.store)
        for op in STREAM_OPS:
            self.scheduler.stream_handlers.pop(op, None)
        for handler in HANDLERS:
            self.scheduler.handlers.pop(handler, None)
        uninstall_policies(self.scheduler)
        self.store.close()

    def restart(self, scheduler: Scheduler) -> None:
        # Scheduler.restart forgets all tasks (without transitions) but only clears the
        # real workers. Stored results stay in the store and the catalog.
        self.lanes.clear()
        self.reuse.loaders.clear()
        self.reuse.retrying.clear()
        self.retention.restart()
        self.skipped.clear()

    # ------------------------------------------------------------------ hooks

    def transition(
        self, key: Any, start: str, finish: str, *args: Any, stimulus_id: str, **kwargs: Any
    ) -> None:
        if finish != "memory" and key in self.skipped.costs:
            self.skipped.left(key)
        if finish == "processing":
            self._send_tokens(key)
        elif start == "processing":
            if finish == "memory":
                self._finished(key, kwargs.get("metadata") or {}, stimulus_id)
            else:
                self.reuse.loader_failed(key)
        elif finish == "forgotten":
            self.reuse.forgotten(key)
            self.retention.forgotten(key)
            self.lanes.remember(key, None)
        elif start == "memory" and finish == "released":
            self.retention.released(key)

    def log_event(self, topic: str, msg: Any) -> None:
        # A stolen task goes to its thief outside any transition: the thief needs its
        # inputs' tokens and costs too (queued right behind the task, in the same batch).
        if topic == "stealing" and isinstance(msg, tuple) and msg[0] == "confirm":
            self._send_tokens(msg[1])

    def _send_tokens(self, key: Any) -> None:
        """Tell the worker about to run ``key`` which objects its inputs in the store are,
        and the recompute costs of those stored nowhere (queued ahead of the task)."""
        ts = self.scheduler.tasks.get(key)
        if ts is None or (ws := ts.processing_on) is None:
            return
        # Not those it holds already: it reads no store for them (most inputs, mostly),
        # and knows their tokens from when it stored or fetched them.
        tokens = self.lanes.tokens_of(d for d in ts.dependencies if ws not in (d.who_has or ()))
        costs = self.skipped.costs_of(ts.dependencies) if self.skipped.costs else {}
        if tokens or costs:
            msg = {"op": "storage-tokens", "tokens": tokens, "costs": costs}
            _compat.send_to_worker(self.scheduler, ws.address, msg)

    def _finished(self, key: Any, metadata: dict[str, Any], stimulus_id: str) -> None:
        self.reuse.loader_finished(key)
        stored: StoredResult | None = metadata.get(METADATA_KEY)
        if stored is None:
            return
        ts = self.scheduler.tasks.get(key)
        if ts is None or ts.state != "memory":
            return
        self.lanes.add(ts, stored.get("token"))
        self.record(key, ts, stored)

    def record(self, key: Any, ts: Any, stored: StoredResult) -> None:
        """Record a result a worker wrote (not one it loaded) in the catalog."""
        token = stored.get("token")
        if stored.get("loaded") or token is None or "nbytes" not in stored:
            return
        self.counters.stored += 1
        self.counters.stored_bytes += stored["nbytes"]
        lineage = None if ts is None else self.reuse.tokens.recorded(ts, token)
        keep = self.retention.keeps(key)
        created = stored.get("created")
        self.catalog.add(key, token, stored["nbytes"], keep, lineage, created)
        self.retention.stored(key, token)

    def storage_stored(self, records: list[dict[str, Any]], worker: str) -> None:
        """Write-behinds of ``worker`` landed (RPC): see :mod:`.landed`."""
        for r in records:
            landed.handle_stored(self, r["key"], r["run_id"], r["stored"], worker)

    def update_graph(
        self, scheduler: Scheduler, *, keys: set[Any], stimulus_id: str, **kwargs: Any
    ) -> None:
        wanted = self.retention.requested(keys)  # before reuse rewrites the graph
        self.skipped.requested(wanted)
        mark_p2p_steps(scheduler.tasks, kwargs.get("tasks", ()))
        reused = self.reuse.on_update_graph(keys)
        self.retention.keep_reused(wanted, reused)

    # ------------------------------------------------------------------ handlers

    def handle_unreadable(
        self, keys: list[Any], stimulus_id: str, worker: str | None = None, outage: bool = False
    ) -> None:
        """A worker could not read these keys (stream op): their objects are missing or
        damaged, or (``outage``) the store did not answer, which loses nothing."""
        if outage:
            self.reuse.load_again(keys)
        else:
            self.drop_unreadable(keys, stimulus_id=stimulus_id)

    def handle_lost(
        self, keys: list[Any], stimulus_id: str, worker: str, damaged: bool = False
    ) -> None:
        """A worker dropped these stored results from RAM and cannot read them back
        (stream op): lost on that worker, and (``damaged``) in the store too."""
        if damaged:
            self.drop_unreadable(keys, stimulus_id=stimulus_id)
        forget_lost_replicas(self.scheduler, worker, keys, stimulus_id)

    def drop_unreadable(self, keys: list[Any], stimulus_id: str | None = None) -> None:
        """Forget the lane replicas of keys whose objects are missing or damaged: only
        for a verdict on the objects (see :func:`~storage_scheduler.store.classify`), never
        for a store that does not answer, which would recompute intact results for every
        cluster that shares the catalog. A key left with no holder is recomputed."""
        for key in keys:
            self.catalog.discard(key, self.lanes.tokens.get(key))
        loading = sum(key in self.reuse.loaders for key in keys)  # fail, then are computed
        self.counters.unreadable += loading + self.lanes.forget_unreadable(keys, stimulus_id)

    def storage_info(self) -> StorageInfo:
        """What the store holds for this cluster, for clients and ``dask storage``."""
        return status.storage_info(self)

    def storage_status(self) -> StorageStatus:
        """The store and every worker's use of it: ``dask storage status`` and the page."""
        return status.storage_status(self)


def _sources_of(scheduler: Scheduler, key: Any) -> Sequence[str] | None:
    """The data versions a task the scheduler has is computed from; None if it has no
    such task (read from the offload thread that materializes graphs: dict lookups)."""
    ts = scheduler.tasks.get(key)
    return None if ts is None else (ts.annotations or {}).get(SOURCES_ANNOTATION, ())
