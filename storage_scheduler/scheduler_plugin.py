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

Notes
-----
Everything here runs on the scheduler's event loop and does no store I/O, except
``start`` (the startup probe) which is awaited before the scheduler accepts work.
Uses private scheduler API (the ``WorkerState`` constructor, ``add_replica``,
``remove_replica``); ``distributed`` is pinned to a tested range for that reason.
"""

from __future__ import annotations

import logging
import shlex
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from distributed.active_memory_manager import (
    ActiveMemoryManagerPolicy,
    ReduceReplicas,
    Suggestion,
    SuggestionGenerator,
)
from distributed.core import Status
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.protocol.pickle import dumps
from distributed.scheduler import TaskState, WorkerState

from storage_scheduler._exceptions import StorageConfigError
from storage_scheduler.comm import is_lane, lane_addresses, registry, store_id_for
from storage_scheduler.config import RoutingSettings, StoreSettings
from storage_scheduler.store import Store
from storage_scheduler.worker_plugin import METADATA_KEY, PLUGIN_NAME, StorageWorkerPlugin

if TYPE_CHECKING:
    from distributed import Scheduler

__all__ = ["LaneAwareReduceReplicas", "StorageSchedulerPlugin", "parse_storage_options"]

logger = logging.getLogger(__name__)


def parse_storage_options(items: Iterable[str]) -> dict[str, Any]:
    """Parse ``key=value`` command-line options; values are read as YAML scalars.

    Examples
    --------
    >>> parse_storage_options(["anon=true", "endpoint_url=http://127.0.0.1:9000"])
    {'anon': True, 'endpoint_url': 'http://127.0.0.1:9000'}
    """
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise StorageConfigError(f"--storage-option takes key=value, got {shlex.quote(item)}")
        out[key.strip()] = yaml.safe_load(value) if value else ""
    return out


class LaneAwareReduceReplicas(ActiveMemoryManagerPolicy):
    """``ReduceReplicas`` that counts and drops only worker replicas, never lanes.

    The stock policy offers every holder as a drop candidate, and the memory manager
    looks lanes up among the workers (``KeyError``). Here a stored key keeps one replica
    in worker memory, like an unstored one, plus as many as there are dependents waiting.
    """

    def run(self) -> SuggestionGenerator:
        for ts in self.manager.scheduler.replicated_tasks:
            assert ts.who_has
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
        self.store = store
        self.store_id = store_id_for(self.settings.url)
        self._lane_list = [self._make_lane(addr) for addr in lane_addresses(self.store_id, self.routing.lanes)]
        self.lanes = {ws.address: ws for ws in self._lane_list}
        registry.register(self.store_id, self.store, self._drop_unreadable)
        scheduler.stream_handlers["storage-unreadable"] = self.handle_unreadable
        scheduler.handlers["storage_info"] = self.storage_info
        self._install_amm_policy()
        await scheduler.register_worker_plugin(
            None,
            dumps(StorageWorkerPlugin(self.settings, self.store_id, self.routing)),
            name=PLUGIN_NAME,
            idempotent=False,
        )
        logger.info(
            "Storing results in %s (%d lanes, results=%s, prefer=%s)",
            self.settings.url,
            self.routing.lanes,
            self.routing.results,
            self.routing.prefer,
        )

    async def close(self) -> None:
        if not hasattr(self, "store"):
            return  # never started
        registry.unregister(self.store_id, self.store)
        self.scheduler.stream_handlers.pop("storage-unreadable", None)
        self.scheduler.handlers.pop("storage_info", None)
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

    def restart(self, scheduler: Scheduler) -> None:
        # Scheduler.restart forgets all tasks but only clears the real workers.
        for ws in self._lane_list:
            ws._has_what.clear()
            ws.nbytes = 0

    # ---------------------------------------------------------------- replicas

    def lane_for(self, key: Any) -> WorkerState:
        """The lane that holds ``key`` (a fixed spread of keys over lanes)."""
        return self._lane_list[hash(key) % len(self._lane_list)]

    def transition(
        self, key: Any, start: str, finish: str, *args: Any, stimulus_id: str, **kwargs: Any
    ) -> None:
        if start != "processing" or finish != "memory":
            return
        if METADATA_KEY not in (kwargs.get("metadata") or {}):
            return
        ts = self.scheduler.tasks.get(key)
        if ts is not None and ts.state == "memory":
            self.scheduler.add_replica(ts, self.lane_for(key))
            self.stored_total += 1

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
            "results": self.routing.results,
            "prefer": self.routing.prefer,
        }
