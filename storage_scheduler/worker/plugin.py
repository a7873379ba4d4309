"""The worker plugin: installs the write path and the read path on a worker.

The scheduler plugin pushes :class:`StorageWorkerPlugin` to every worker, present and
future. On each worker it opens the store, wraps ``worker.execute`` with the
:class:`~storage_scheduler.worker.writer.ResultWriter`, makes the worker fetch inputs from
a storage lane whenever one holds them (or from a peer first, with ``prefer: peer``),
registers the store for the ``storage://`` comm, and adds its figures to heartbeats.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

from dask.sizeof import sizeof
from distributed.diagnostics.plugin import WorkerPlugin

from storage_scheduler import _compat
from storage_scheduler._exceptions import StoreUnavailableError
from storage_scheduler._protocol import HEARTBEAT_KEY, PLUGIN_NAME, Heartbeat
from storage_scheduler.comm import registry
from storage_scheduler.config import StoreSettings, WorkerSettings, redact_url
from storage_scheduler.metrics import ensure_collector
from storage_scheduler.store import Store, probe
from storage_scheduler.worker.policy import StoragePolicy
from storage_scheduler.worker.reader import report_unreadable
from storage_scheduler.worker.relief import ReadBack
from storage_scheduler.worker.spill import StoreSpillBuffer
from storage_scheduler.worker.writer import ResultWriter

if TYPE_CHECKING:
    from distributed import Worker

__all__ = ["StorageWorkerPlugin", "WorkerStoreOverride"]

logger = logging.getLogger(__name__)

#: Tokens (and costs) a worker keeps before it forgets the oldest half.
MAX_TOKENS = 100_000
#: Longest wait of a closing worker for its writes still running (seconds).
FLUSH_WAIT = 10.0

T = TypeVar("T")


def _remember(known: dict[Any, T], new: dict[Any, T]) -> None:
    if len(known) > MAX_TOKENS:  # those of long-gone tasks: forget the oldest
        for key in list(known)[: MAX_TOKENS // 2]:
            del known[key]
    known.update(new)


@dataclass(frozen=True)
class WorkerStoreOverride:
    """A worker's own store settings (``dask worker --preload storage_scheduler
    --storage-url ...``), kept in ``worker.extensions[PLUGIN_NAME]``; they win over the
    scheduler's (a worker that mounts the store elsewhere, or has its own credentials)."""

    settings: StoreSettings


class StorageWorkerPlugin(WorkerPlugin):
    """Worker half of storage_scheduler; registered by the scheduler plugin.

    Parameters
    ----------
    store_settings
        How to open the store (the scheduler's, unless the worker's preload overrides it).
    store_id
        The id in the scheduler's lane addresses for this store.
    settings
        Which results to store and where to read inputs from.
    probe
        Name and content of the file the scheduler wrote in its store: a worker that does
        not read the same back sees another store and is refused.
    """

    name = PLUGIN_NAME
    idempotent = False

    store_settings: StoreSettings
    store_id: str
    settings: WorkerSettings
    #: (name, nonce) of the scheduler's probe file, or None (nothing to check).
    probe: tuple[str, str] | None
    #: Set up on a worker (None before ``setup`` and after ``teardown``).
    worker: Worker | None
    store: Store | None
    writer: ResultWriter | None
    #: The worker's data mapping, when it drops stored results under memory pressure.
    buffer: StoreSpillBuffer | None
    #: Bytes (in memory) of requested keys loaded from the store instead of computed.
    bytes_loaded: int
    #: Tokens of the inputs this worker may read from the store (sent by the scheduler
    #: with the tasks that need them): what each object must carry.
    tokens: dict[Any, str]
    #: Recompute costs (seconds) of inputs stored nowhere, sent like ``tokens``.
    costs: dict[Any, float]
    _original_execute: _compat.Execute | None
    _original_state_class: type | None
    _original_get_data: Any

    def __init__(
        self,
        store_settings: StoreSettings,
        store_id: str,
        settings: WorkerSettings,
        probe: tuple[str, str] | None = None,
    ):
        self.store_settings = store_settings
        self.store_id = store_id
        self.settings = settings
        self.probe = probe
        self._init_state()

    def _init_state(self) -> None:
        self.worker = None
        self.store = None
        self.writer = None
        self.buffer = None
        self.bytes_loaded = 0
        self.tokens = {}
        self.costs = {}
        self._original_execute = None
        self._original_state_class = None
        self._original_get_data = None

    def __getstate__(self) -> dict[str, Any]:
        return {
            "store_settings": self.store_settings,
            "store_id": self.store_id,
            "settings": self.settings,
            "probe": self.probe,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_state()

    async def setup(self, worker: Worker) -> None:
        # Install everything before the first await: a worker joining a cluster is already
        # running (it may receive tasks) while its plugins are set up.
        override = worker.extensions.get(PLUGIN_NAME)
        settings = self.store_settings
        if isinstance(override, WorkerStoreOverride):
            # Its own path and credentials; the cluster's signing keys unless it has some.
            keys = override.settings.signing_keys or settings.signing_keys
            settings = replace(override.settings, signing_keys=keys)
        self.store = store = Store(settings)
        self.worker = worker
        self.writer = ResultWriter(worker, store, self.settings)
        if self.settings.policy == "worth-storing":
            self.writer.policy = StoragePolicy(
                store.counters, self.settings.recompute_limit, self._input_cost
            )
        registry.register(self.store_id, store, self._report_unreadable, self._lookup)
        worker.stream_handlers["storage-tokens"] = self._receive_tokens
        worker.handlers["storage_flush"] = self.flush
        self.writer.on_stored = self._stored
        wrap = self.writer.wrap
        if self.settings.relief_threshold is not None:
            self.buffer = self._install_buffer(worker, store, self.settings.relief_threshold)
        if self.buffer is not None:
            readback = ReadBack(worker, self.buffer)
            self._original_get_data = _compat.wrap_handler(
                worker, "get_data", readback.wrap_get_data
            )

            def wrap(original: _compat.Execute) -> _compat.Execute:
                assert self.writer is not None
                return self.writer.wrap(readback.wrap_execute(original))

        self._original_execute = _compat.wrap_execute(worker, wrap)
        state_class = (
            _compat.StoreFirstWorkerState
            if self.settings.prefer == "store"
            else _compat.PeerFirstWorkerState
        )
        self._original_state_class = _compat.swap_state_class(worker, state_class)
        # Sent with every heartbeat: the scheduler's view of each worker's store traffic.
        worker.metrics[HEARTBEAT_KEY] = self.heartbeat
        ensure_collector()
        try:
            await store.check()  # a worker that cannot reach the store says so now
            await self._check_same_store(worker, store)
        except Exception:
            await self.teardown(worker)
            raise
        logger.info(
            "Worker %s %s results in %s",
            worker.address,
            "stores" if self.settings.write else "reads stored",
            redact_url(settings.url),
        )

    async def teardown(self, worker: Worker) -> None:
        worker.metrics.pop(HEARTBEAT_KEY, None)
        worker.stream_handlers.pop("storage-tokens", None)
        worker.handlers.pop("storage_flush", None)
        if self.writer is not None:
            self.writer.closed = True
            # Write-behind: results reported but not stored yet are stored now, while
            # the scheduler can still hear of them (the stream closes after plugins).
            if not await self.writer.flush(FLUSH_WAIT):
                logger.warning("Worker %s closed with results still being written", worker.address)
        if self._original_execute is not None:
            _compat.restore_execute(worker, self._original_execute)
            self._original_execute = None
        if self._original_state_class is not None:
            _compat.swap_state_class(worker, self._original_state_class)
            self._original_state_class = None
        if self._original_get_data is not None:
            _compat.restore_handler(worker, "get_data", self._original_get_data)
            self._original_get_data = None
        if self.buffer is not None:
            self.buffer.detach()
            self.buffer = None
        if self.store is not None:
            registry.unregister(self.store_id, self.store)
            self.store.close()
            self.store = None
        self.worker = None

    def _install_buffer(
        self, worker: Worker, store: Store, threshold: float
    ) -> StoreSpillBuffer | None:
        """Make the worker's ``SpillBuffer`` drop stored results before it spills."""
        data = worker.data
        if not isinstance(data, StoreSpillBuffer):  # else: left by the plugin this replaces
            adopted = _compat.adopt_spill_buffer(worker, StoreSpillBuffer)
            if not isinstance(adopted, StoreSpillBuffer):
                logger.debug("Worker %s has no SpillBuffer: no memory relief", worker.address)
                return None
            data = adopted
        limit = worker.memory_manager.memory_limit or 0
        data.adopt(store, self.tokens.get, threshold * limit if limit else data.n)
        return data

    async def _check_same_store(self, worker: Worker, store: Store) -> None:
        """Refuse to work on a store other than the scheduler's (another host's cache
        directory, another bucket): results would not be shared, old objects served."""
        if self.probe is None:
            return
        name, nonce = self.probe
        seen = await probe.read_nonce(store, name)
        if seen == nonce:
            return
        what = "nothing" if seen is None else "another cluster's probe"
        # Nothing this worker computes could be shared: take it out of the cluster (with
        # its nanny, which would otherwise start it again on the same store), once the
        # scheduler has had this error as the answer to its plugin-add.
        asyncio.get_running_loop().call_later(
            1.0,
            lambda: asyncio.ensure_future(
                worker.close(nanny=True, reason="storage-scheduler: not the scheduler's store")
            ),
        )
        raise StoreUnavailableError(
            f"worker {worker.address} does not see the scheduler's store: it opened "
            f"{store.url!r} and found {what} at {probe.PROBES}/{name}. Give every worker "
            "the same store (a shared directory or bucket), or its own path to it with "
            "dask worker --preload storage_scheduler --storage-url URL"
        )

    async def flush(self) -> bool:
        """Wait for the writes running in the background (RPC, before the scheduler
        closes); False if some still run after ``FLUSH_WAIT``."""
        return True if self.writer is None else await self.writer.flush(FLUSH_WAIT)

    def _receive_tokens(
        self, tokens: dict[Any, str], costs: dict[Any, float] | None = None
    ) -> None:
        _remember(self.tokens, tokens)
        _remember(self.costs, costs or {})

    def _stored(self, key: Any, token: str | None) -> None:
        """A result of this worker's is in the store: its token is known here (the
        scheduler sends tokens only of inputs a worker does not hold)."""
        if token is not None:
            _remember(self.tokens, {key: token})
        if self.buffer is not None:
            self.buffer.mark_stored(key, token)

    def _input_cost(self, key: Any) -> float | None:
        """An input's recompute cost: nothing if the store holds it."""
        return 0.0 if key in self.tokens else self.costs.get(key)

    async def _lookup(self, keys: list[Any]) -> dict[Any, str]:
        """Tokens of ``keys``: sent ahead by the scheduler, else asked for (``replicate``
        and ``rebalance`` fetch without a task on this worker)."""
        found = {k: self.tokens[k] for k in keys if k in self.tokens}
        missing = [k for k in keys if k not in found]
        if missing and self.worker is not None:
            found.update(await self.worker.scheduler.storage_tokens(keys=missing))
        return found

    def _report_unreadable(self, keys: list[Any]) -> None:
        if self.worker is not None:
            report_unreadable(self.worker, keys)

    def loaded(self, value: object) -> None:
        """A requested key was loaded from the store (called from a task thread)."""
        self.bytes_loaded += sizeof(value)

    def bytes_read(self) -> int:
        """Bytes this worker took from the store: inputs fetched from lanes, loaded keys."""
        address = self.worker.address if self.worker is not None else None
        return registry.bytes_served.get(address or "", 0) + self.bytes_loaded

    def heartbeat(self, worker: Worker | None = None) -> Heartbeat:
        """This worker's store traffic, as sent to the scheduler with each heartbeat."""
        counters = self.store.counters if self.store is not None else None
        stats = self.writer.stats if self.writer is not None else None
        buffer = self.buffer
        evicted = buffer.stats if buffer is not None else None
        spilled, written = _compat.spilled_to_disk(self.worker)
        return Heartbeat(
            bytes_written=counters.bytes_written if counters else 0,
            objects_written=counters.objects_written if counters else 0,
            bytes_read=self.bytes_read(),
            writes_in_flight=counters.writes_in_flight if counters else 0,
            write_failures=stats.write_failures if stats else 0,
            not_stored=stats.not_stored if stats else 0,
            untrusted_objects=counters.objects_untrusted if counters else 0,
            not_stored_by_reason=dict(stats.not_stored_by_reason) if stats else {},
            evicted_bytes=evicted.evicted_bytes if evicted else 0,
            evicted=evicted.evicted if evicted else 0,
            dropped_bytes=buffer.dropped_bytes if buffer is not None else 0,
            read_back=evicted.read_back if evicted else 0,
            lost=evicted.lost if evicted else 0,
            spilled_bytes=spilled,
            spill_written_bytes=written,
        )
