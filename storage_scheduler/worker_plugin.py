"""The worker side: write every result to the store, read inputs from it.

The scheduler plugin pushes :class:`StorageWorkerPlugin` to every worker, present and
future. On each worker it

* wraps ``worker.execute`` so that a successful result is serialized and written to the
  store (off the event loop) before the task is reported finished; the report carries
  ``metadata["storage-scheduler"]``, from which the scheduler adds the lane replica in the
  same transition that puts the key in memory — a result is never "finished but not yet
  stored". While the write runs, the task gives its thread slot back, as a task that
  calls ``distributed.secede`` does, so the next task computes meanwhile;
* makes the worker fetch inputs from a storage lane whenever one holds them (or from a
  peer first, with ``prefer: peer``) by swapping in a ``WorkerState`` subclass;
* registers the store for the ``storage://`` comm and reports keys it could not read to
  the scheduler.

A failure to serialize or store a result never fails the task: the result stays in
worker memory as in stock Dask, a warning is logged once, and the failure is counted.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dask.sizeof import sizeof
from dask.utils import key_split
from distributed import Reschedule
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.metrics import context_meter
from distributed.utils import sync
from distributed.worker import get_worker
from distributed.worker_state_machine import ExecuteSuccessEvent, SecedeEvent, StateMachineEvent
from distributed.worker_state_machine import TaskState as WorkerTaskState
from distributed.worker_state_machine import WorkerState as _WorkerState

from storage_scheduler._exceptions import StoreError
from storage_scheduler.comm import is_lane, registry
from storage_scheduler.config import RoutingSettings, StoreSettings
from storage_scheduler.metrics import register_worker_plugin, unregister_worker_plugin
from storage_scheduler.store import Store
from storage_scheduler.tokens import task_token

if TYPE_CHECKING:
    from distributed import Worker

__all__ = ["PLUGIN_NAME", "StorageWorkerPlugin", "WorkerStats", "load_stored"]

logger = logging.getLogger(__name__)

PLUGIN_NAME = "storage-scheduler"
#: Key of the task-finished metadata that tells the scheduler a result was stored.
METADATA_KEY = "storage-scheduler"
#: Key of this plugin's figures in worker heartbeats (``WorkerState.metrics``).
HEARTBEAT_KEY = "storage"
#: After the store fails a write, results skip it for this long (seconds): a store that
#: is down must not hold every task's thread slot through a round of retries.
DEGRADED_BACKOFF = 10.0

# Per-worker store settings given to the worker's own preload; they win over the
# scheduler's (a worker that mounts the store elsewhere, or has its own credentials).
_overrides: weakref.WeakKeyDictionary[Worker, StoreSettings] = weakref.WeakKeyDictionary()


def set_store_override(worker: Worker, settings: StoreSettings) -> None:
    """Make ``worker`` open its store with ``settings`` instead of the scheduler's."""
    _overrides[worker] = settings


def is_finalize_key(key: Any) -> bool:
    """Whether ``key`` is the one-off wrapper ``Client.compute`` puts around a collection.

    Its name is new at every call, so its result can never be reused: it is not stored,
    and what it wraps (the collection's own keys) counts as the requested result.
    """
    return key_split(key).startswith("finalize")


class StoreFirstWorkerState(_WorkerState):
    """Fetch an input from a storage lane whenever one holds it."""

    __slots__ = ()  # layout-compatible: installed by swapping ``__class__``

    def _update_who_has(self, who_has: Mapping[Any, Collection[str]]) -> None:
        super()._update_who_has(
            {k: [w for w in ws if is_lane(w)] or ws for k, ws in who_has.items()}
        )


class PeerFirstWorkerState(_WorkerState):
    """Fetch an input from a worker that holds it; from the store only if none does."""

    __slots__ = ()

    def _update_who_has(self, who_has: Mapping[Any, Collection[str]]) -> None:
        super()._update_who_has(
            {k: [w for w in ws if not is_lane(w)] or ws for k, ws in who_has.items()}
        )


@dataclass
class WorkerStats:
    """Counters of one worker's use of the store."""

    #: Results written to the store.
    stored: int = 0
    #: Results left in worker memory only (not selected, or the write failed).
    not_stored: int = 0
    #: Writes that failed (serialization or store errors).
    write_failures: int = 0
    #: Bytes (in memory) of requested keys loaded from the store instead of computed.
    bytes_loaded: int = 0
    #: Writes running after their task gave its thread slot back.
    writes_detached: int = 0


class StorageWorkerPlugin(WorkerPlugin):
    """Worker half of storage_scheduler; registered by the scheduler plugin.

    Parameters
    ----------
    settings
        How to open the store (the scheduler's, unless the worker's preload overrides it).
    store_id
        The id in the scheduler's lane addresses for this store.
    routing
        Which results to store and where to read inputs from.
    """

    name = PLUGIN_NAME
    idempotent = False

    settings: StoreSettings
    store_id: str
    routing: RoutingSettings
    #: Whether results are written (False after ``storage_scheduler.disable``: stored
    #: results are still read, new ones are not stored).
    write: bool
    stats: WorkerStats
    store: Store | None
    _worker: Worker | None
    _original_execute: Callable[..., Awaitable[StateMachineEvent]] | None
    _original_state_class: type | None
    _skip_until: float
    _warned: set[str]

    def __init__(
        self, settings: StoreSettings, store_id: str, routing: RoutingSettings, write: bool = True
    ):
        self.settings = settings
        self.store_id = store_id
        self.routing = routing
        self.write = write
        self._init_state()

    def _init_state(self) -> None:
        self.stats = WorkerStats()
        self.store = None
        self._worker = None
        self._original_execute = None
        self._original_state_class = None
        self._skip_until = 0.0
        self._warned = set()

    def __getstate__(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "store_id": self.store_id,
            "routing": self.routing,
            "write": self.write,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_state()

    # ------------------------------------------------------------------ lifecycle

    async def setup(self, worker: Worker) -> None:
        # Install everything before the first await: a worker joining a cluster is already
        # running (it may receive tasks) while its plugins are set up.
        settings = _overrides.get(worker, self.settings)
        self.store = Store(settings)
        self._worker = worker
        registry.register(self.store_id, self.store, self._report_unreadable)
        self._original_execute = worker.execute
        worker.execute = self._execute  # type: ignore[method-assign]
        state_class = StoreFirstWorkerState if self.routing.prefer == "store" else PeerFirstWorkerState
        self._original_state_class = type(worker.state)
        worker.state.__class__ = state_class
        # Sent with every heartbeat: the scheduler's view of each worker's store traffic.
        worker.metrics[HEARTBEAT_KEY] = self.heartbeat_metrics
        register_worker_plugin(self)
        try:
            await self.store.check()  # a worker that cannot reach the store says so now
        except Exception:
            await self.teardown(worker)
            raise
        logger.info(
            "Worker %s %s results in %s",
            worker.address,
            "stores" if self.write else "reads stored",
            settings.url,
        )

    async def teardown(self, worker: Worker) -> None:
        unregister_worker_plugin(self)
        worker.metrics.pop(HEARTBEAT_KEY, None)
        if self._original_execute is not None:
            worker.execute = self._original_execute  # type: ignore[method-assign]
            self._original_execute = None
        if self._original_state_class is not None:
            worker.state.__class__ = self._original_state_class
            self._original_state_class = None
        if self.store is not None:
            registry.unregister(self.store_id, self.store)
            self.store.close()
            self.store = None

    def heartbeat_metrics(self, worker: Worker | None = None) -> dict[str, Any]:
        """This worker's store traffic, as sent to the scheduler with each heartbeat."""
        c = self.store.counters if self.store is not None else None
        return {
            "bytes_written": c.bytes_written if c else 0,
            "objects_written": c.objects_written if c else 0,
            "bytes_read": self.bytes_read(),
            "writes_in_flight": c.writes_in_flight if c else 0,
            "write_failures": self.stats.write_failures,
            "not_stored": self.stats.not_stored,
        }

    def bytes_read(self) -> int:
        """Bytes this worker took from the store: inputs fetched from lanes, loaded keys."""
        address = self._worker.address if self._worker is not None else None
        return registry.bytes_served.get(address, 0) + self.stats.bytes_loaded

    # ----------------------------------------------------------------- write path

    def _wants_stored(self, key: Any) -> bool:
        assert self._worker is not None
        if not self.write:
            return False
        state = self._worker.state
        ts = state.tasks.get(key)
        if ts is None or key in state.actors:  # actors live on their worker, as in stock Dask
            return False
        if is_finalize_key(key):
            return False
        choice = (ts.annotations or {}).get("storage")
        if self.routing.results == "annotated":
            return choice is True
        return choice is not False

    async def _execute(self, key: Any, *, stimulus_id: str) -> StateMachineEvent:
        assert self._original_execute is not None
        event = await self._original_execute(key, stimulus_id=stimulus_id)
        if isinstance(event, ExecuteSuccessEvent):
            # Nothing may escape from here: an exception would leave the task executing
            # forever in the worker state machine.
            try:
                await self._store_result(key, event)
            except Exception as e:  # pragma: no cover - _store_result catches its own
                logger.exception("Storing the result of %r failed unexpectedly: %s", key, e)
        return event

    def _release_thread_slot(self, ts: WorkerTaskState, event: ExecuteSuccessEvent) -> bool:
        """Let the next task compute while this result is written.

        The computation is over; only the write keeps the task from being reported
        finished. Dask's own ``secede`` mechanism moves it to ``long-running`` on the worker
        and the scheduler, which frees its thread slot without reporting it finished.
        At most as many writes as threads run detached: a store slower than the
        computation holds slots again instead of piling up results in memory.
        """
        assert self._worker is not None
        if ts.state != "executing" or self.stats.writes_detached >= self._worker.state.nthreads:
            return False
        self.stats.writes_detached += 1
        self._worker.handle_stimulus(
            SecedeEvent(
                key=ts.key,
                compute_duration=event.stop - event.start,
                stimulus_id=f"storage-write-{time.time()}",
            )
        )
        return True

    async def _store_result(self, key: Any, event: ExecuteSuccessEvent) -> None:
        if self._worker is None or self.store is None:
            return  # torn down while the task ran
        if not self._wants_stored(key):
            return
        if time.monotonic() < self._skip_until:
            self.stats.not_stored += 1
            return
        ts = self._worker.state.tasks.get(key)
        if ts is None:
            return
        if getattr(ts.run_spec, "func", None) is load_stored:
            # Read back from the store: already there. Only tell the scheduler.
            ts.metadata[METADATA_KEY] = {"loaded": True}
            return
        salt = (self.routing.version, (ts.annotations or {}).get("storage_version"))
        spec = ts.run_spec
        detached = self._release_thread_slot(ts, event)
        try:
            # Shows in Dask's fine performance metrics as execute / <prefix> / store-write.
            with context_meter.meter("store-write", "seconds"):
                nbytes, token = await self._put(key, event.value, lambda: task_token(spec, salt))
        except Exception as e:
            self._write_failed(key, e)
            return
        finally:
            if detached:
                self.stats.writes_detached -= 1
        context_meter.digest_metric("store-write", 1, "count")
        context_meter.digest_metric("store-write", nbytes, "bytes")
        # Travels with the task-finished message to SchedulerPlugin.transition.
        ts.metadata[METADATA_KEY] = {"nbytes": nbytes, "token": token}
        self.stats.stored += 1
        if self._skip_until:
            self._skip_until = 0.0
            logger.warning("The store %s is writable again", self.store and self.store.url)

    async def _put(
        self, key: Any, value: object, make_token: Callable[[], str]
    ) -> tuple[int, str]:
        """Write one result; return the object size and the token recorded with it."""
        assert self.store is not None
        tokens: list[str] = []

        def token() -> str:
            tokens.append(make_token())
            return tokens[0]

        nbytes = await self.store.put(key, value, token=token)
        return nbytes, tokens[0]

    def _write_failed(self, key: Any, error: Exception) -> None:
        self.stats.write_failures += 1
        self.stats.not_stored += 1
        if isinstance(error, OSError):
            # The store itself failed: skip it for a while; warn once per outage.
            if not self._skip_until:
                logger.warning(
                    "Cannot write to the store (%s); results stay in worker memory and move "
                    "between workers as in stock Dask until it recovers",
                    error,
                )
            self._skip_until = time.monotonic() + DEGRADED_BACKOFF
        else:
            kind = type(error).__name__
            if kind not in self._warned:
                self._warned.add(kind)
                logger.warning(
                    "Result of %r could not be stored (%s: %s); it stays in worker memory. "
                    "Further %s errors are not logged.",
                    key,
                    kind,
                    error,
                    kind,
                )

    # ------------------------------------------------------------------ read path

    def _report_unreadable(self, keys: list[Any]) -> None:
        if self._worker is not None:
            self._worker.batched_send(
                {
                    "op": "storage-unreadable",
                    "keys": keys,
                    "stimulus_id": f"storage-unreadable-{time.time()}",
                }
            )


def load_stored(key: Any) -> Any:
    """Task body of a requested key whose result the store already holds.

    The scheduler gives a stored key that a client asks for this body instead of its own
    (see ``StorageSchedulerPlugin.update_graph``). It runs in a worker thread. If the
    object cannot be read (deleted, damaged, store down), the key is reported unreadable
    and the task rescheduled; the scheduler then restores the original task and its
    dependencies, and the result is computed instead.
    """
    worker = get_worker()
    plugin = worker.plugins.get(PLUGIN_NAME)
    if not isinstance(plugin, StorageWorkerPlugin) or plugin.store is None:
        raise Reschedule()
    try:
        value = sync(worker.loop, plugin.store.get, key)
        plugin.stats.bytes_loaded += sizeof(value)
        return value
    except (OSError, StoreError) as e:
        logger.warning("Cannot load the stored result of %r (%s); computing it instead", key, e)
        worker.loop.add_callback(plugin._report_unreadable, [key])
        raise Reschedule() from e
