"""The write path: every finished result goes to the store, before or after it is reported.

``worker.execute`` is wrapped (see :func:`storage_scheduler._compat.wrap_execute`). After
a successful run the result is serialized and written off the event loop, in one of two
durability modes (``storage-scheduler.durability``):

* ``write-through``: the report waits for the write and carries
  :class:`~storage_scheduler._protocol.StoredResult` metadata, from which the scheduler
  adds the lane replica in the same transition that puts the key in memory: a result is
  never "finished but not yet stored". While the write runs, the task gives its thread
  slot back, as a task that calls ``distributed.secede`` does, so that the next task
  computes meanwhile; except for a small result bound for a local disk, written without
  leaving the event loop (see :meth:`Store.put`) sooner than the slot changes hands.
* ``write-behind``: the task is reported at once, its result in worker memory as in
  stock Dask (peers serve it); the write runs in the background and, once it lands, the
  ``storage_stored`` RPC tells the scheduler to add the lane replica (results that land
  meanwhile go in the same call).

Either way, results awaiting upload are bounded per worker by a :class:`WriteBudget`
(``write-buffer`` bytes, and ``max-concurrency`` results): many writes are in flight, so
that a store's latency is paid once per batch rather than once per task, and a worker
lost mid-run loses at most that many unstored results. A result that does not fit waits
for room, holding its task's thread slot.

A failure to serialize or store a result never fails the task: the result stays in
worker memory as in stock Dask, a warning is logged once, and the failure is counted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from distributed.metrics import context_meter
from distributed.worker_state_machine import ExecuteSuccessEvent, StateMachineEvent

from storage_scheduler import _compat
from storage_scheduler._protocol import METADATA_KEY, StoredResult, result_token
from storage_scheduler.config import WorkerSettings
from storage_scheduler.store import THREAD_PREFIX, Store
from storage_scheduler.worker.policy import StoragePolicy
from storage_scheduler.worker.reader import is_loader, loader_token

if TYPE_CHECKING:
    from distributed import Worker

__all__ = ["ResultWriter", "WriteBudget", "WriterStats"]

logger = logging.getLogger(__name__)

#: After the store fails a write, results skip it for this long (seconds): a store that
#: is down must not hold every task's thread slot through a round of retries.
DEGRADED_BACKOFF = 10.0


@dataclass
class WriterStats:
    """Counters of one worker's writes."""

    #: Results written to the store.
    stored: int = 0
    #: Results left in worker memory only (not selected, or the write failed).
    not_stored: int = 0
    #: Writes that failed (serialization or store errors).
    write_failures: int = 0
    #: Writes running after their task gave its thread slot back.
    writes_detached: int = 0
    #: Results reported before their write landed (write-behind), not yet stored.
    writes_behind: int = 0
    #: Results not stored, by reason (see ``Heartbeat.not_stored_by_reason``).
    not_stored_by_reason: Counter[str] = field(default_factory=Counter)

    def skipped(self, reason: str) -> None:
        self.not_stored += 1
        self.not_stored_by_reason[reason] += 1


class WriteBudget:
    """Results awaiting upload on one worker: at most ``max_bytes`` (as Dask sizes them)
    and ``max_count`` results. One result is always let in, however large.

    Notes
    -----
    Used on the worker's event loop only.
    """

    def __init__(self, max_bytes: int, max_count: int):
        self.max_bytes = max_bytes
        self.max_count = max_count
        self.bytes = 0
        self.count = 0
        #: Set whenever room is given back (created on first wait: on the running loop).
        self._room: asyncio.Event | None = None

    def take(self, nbytes: int) -> bool:
        """Reserve room for a result of ``nbytes``, if there is room now."""
        if self.count and (self.count >= self.max_count or self.bytes + nbytes > self.max_bytes):
            return False
        self.count += 1
        self.bytes += nbytes
        return True

    async def wait_take(self, nbytes: int) -> None:
        """Reserve room for a result of ``nbytes``, waiting for it."""
        while not self.take(nbytes):
            if self._room is None:
                self._room = asyncio.Event()
            self._room.clear()
            await self._room.wait()

    def give(self, nbytes: int) -> None:
        self.count -= 1
        self.bytes -= nbytes
        if self._room is not None:
            self._room.set()


class _UnpicklableResults(logging.Filter):
    """Drops distributed's error (with a traceback) for a result that cannot be pickled
    when the store's threads pickle it: stock Dask pickles a result only to move it, and
    the writer logs one warning per kind of error itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            (record.threadName or "").startswith(THREAD_PREFIX)
            and str(record.msg).startswith("Failed to serialize")
        )


_unpicklable_results = _UnpicklableResults()


class ResultWriter:
    """Stores the results of one worker's tasks.

    Notes
    -----
    :meth:`wrap` returns the coroutine that replaces ``worker.execute``; it runs on the
    worker's event loop and awaits the store, whose CPU work and I/O run off the loop.
    """

    worker: Worker
    store: Store
    settings: WorkerSettings
    stats: WriterStats
    #: Set when the worker plugin is torn down: tasks still running are not stored.
    closed: bool
    #: Told of each result the store holds, with its token, before the worker keeps it.
    on_stored: Callable[[Any, str | None], None] | None
    #: Which results are worth storing (None: every selected result is).
    policy: StoragePolicy | None
    #: Until when (``time.monotonic``) results skip a store that failed.
    _skip_until: float
    #: Error types already logged.
    _warned: set[str]
    #: Results awaiting upload.
    budget: WriteBudget
    #: Writes running in the background (write-behind), to wait for at teardown.
    _behind: set[asyncio.Task[None]]
    #: Landed writes the scheduler is still to hear of, each with what to resolve then.
    _landed: list[tuple[dict[str, Any], asyncio.Future[None]]]
    #: The task sending them, while one runs.
    _notifier: asyncio.Task[None] | None

    def __init__(self, worker: Worker, store: Store, settings: WorkerSettings):
        self.worker = worker
        self.store = store
        self.settings = settings
        self.stats = WriterStats()
        self.closed = False
        self.on_stored = None
        self.policy = None
        self._skip_until = 0.0
        self._warned = set()
        self.budget = WriteBudget(settings.write_buffer, store.settings.max_concurrency)
        self._behind = set()
        self._landed = []
        self._notifier = None
        logging.getLogger("distributed.protocol.pickle").addFilter(_unpicklable_results)

    def wrap(self, original: _compat.Execute) -> _compat.Execute:
        async def execute(key: Any, *, stimulus_id: str) -> StateMachineEvent:
            event = await original(key, stimulus_id=stimulus_id)
            if isinstance(event, ExecuteSuccessEvent):
                # Nothing may escape from here: an exception would leave the task
                # executing forever in the worker state machine.
                try:
                    if self.settings.durability == "write-behind":
                        await self.store_behind(key, event)
                    else:
                        await self.store_result(key, event)
                except Exception as e:  # pragma: no cover - both catch their own
                    logger.exception("Storing the result of %r failed unexpectedly: %s", key, e)
            return event

        return execute

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait for the writes running in the background; False if some still run."""
        pending = list(self._behind)
        if not pending:
            return True
        _, running = await asyncio.wait(pending, timeout=timeout)
        return not running

    def _wants_stored(self, key: Any) -> bool:
        if not self.settings.write or _compat.is_finalize_key(key):
            return False
        ts = _compat.worker_task(self.worker, key)
        if ts is None:
            return False
        choice = (ts.annotations or {}).get("storage")
        if self.settings.results == "annotated" and choice is not True:
            self.stats.skipped("not-annotated")
            return False
        if choice is False:
            self.stats.skipped("annotation")
            return False
        return True

    def _to_write(self, key: Any, event: ExecuteSuccessEvent) -> Any:
        """The worker's task of ``key`` if its result is to be written now, else None
        (a loader's result is marked as already stored)."""
        if self.closed or not self._wants_stored(key):
            return None
        if time.monotonic() < self._skip_until:
            self.stats.skipped("store-down")
            return None
        ts = _compat.worker_task(self.worker, key)
        if ts is None:
            return None
        if is_loader(ts.run_spec):
            # Read back from the store: already there. Only tell the scheduler.
            loaded = loader_token(ts.run_spec)
            _compat.finished_metadata(ts)[METADATA_KEY] = (
                StoredResult(loaded=True, token=loaded) if loaded else StoredResult(loaded=True)
            )
            if self.on_stored is not None:
                self.on_stored(key, loaded)
            return None
        if _compat.runs_for_effect(ts.run_spec, event.value):
            # Reused, it would not run again: what it writes would not be written.
            self.stats.skipped("side-effect")
            return None
        if self._not_worth_storing(ts, event):
            return None
        return ts

    async def _write(
        self, key: Any, value: object, ts: Any, size: int | None
    ) -> StoredResult | None:
        """Write ``value`` (of ``size`` bytes as Dask measures it); its metadata, or None
        if the write failed."""
        spec, annotations, version = ts.run_spec, ts.annotations, self.settings.version
        try:
            # Shows in Dask's fine performance metrics as execute / <prefix> / store-write.
            with context_meter.meter("store-write", "seconds"):
                tokens: list[str] = []

                def token() -> str:  # computed in the store's thread pool: CPU work
                    tokens.append(result_token(spec, version, annotations))
                    return tokens[0]

                created = time.time()
                nbytes = await self.store.put(key, value, token=token, created=created, nbytes=size)
        except Exception as e:
            self._write_failed(key, e)
            return None
        context_meter.digest_metric("store-write", 1, "count")
        context_meter.digest_metric("store-write", nbytes, "bytes")
        if self.on_stored is not None:
            self.on_stored(key, tokens[0])
        self.stats.stored += 1
        if self._skip_until:
            self._skip_until = 0.0
            logger.warning("The store %s is writable again", self.store)
        return StoredResult(nbytes=nbytes, token=tokens[0], created=created)

    def _not_worth_storing(self, ts: Any, event: ExecuteSuccessEvent) -> bool:
        """Leave the result unstored if the policy says so, and tell the scheduler first
        (the message goes ahead of the task's own report, on the same stream): it keeps
        the stored inputs while the result is in memory, and passes its cost on."""
        annotations = ts.annotations or {}
        if (
            self.policy is None
            or annotations.get("storage") is True
            or annotations.get("storage_requested")
        ):
            return False
        inputs = [d.key for d in ts.dependencies]
        cost = self.policy.skip(event.stop - event.start, event.nbytes or 0, inputs)
        if cost is None:
            return False
        self.stats.skipped("recomputable")
        self.worker.batched_send({"op": "storage-skipped", "key": ts.key, "cost": cost})
        return True

    async def store_result(self, key: Any, event: ExecuteSuccessEvent) -> None:
        """Write-through: write, then report with the write's metadata."""
        ts = self._to_write(key, event)
        if ts is None:
            return
        metadata = _compat.finished_metadata(ts)
        size = max(event.nbytes or 0, 1)
        # Waits for room holding the thread slot: a store slower than the computation
        # slows the computation instead of piling up results. Once in, the slot goes to
        # the next task while this result is written, unless it is written at once.
        await self.budget.wait_take(size)
        bound = _size_bound(event)
        inline = bound is not None and bound <= self.store.inline_max_bytes
        detached = not inline and _compat.release_thread_slot(
            self.worker, ts, event.stop - event.start, f"storage-write-{time.time()}"
        )
        if detached:
            self.stats.writes_detached += 1
        try:
            stored = await self._write(key, event.value, ts, bound)
        finally:
            self.budget.give(size)
            if detached:
                self.stats.writes_detached -= 1
        if stored is not None:
            metadata[METADATA_KEY] = stored

    async def store_behind(self, key: Any, event: ExecuteSuccessEvent) -> None:
        """Write-behind: report now, write in the background, then tell the scheduler.

        Waits (holding the task's thread slot) until the result fits in the budget.
        """
        ts = self._to_write(key, event)
        if ts is None:
            return
        size = max(event.nbytes or 0, 1)
        await self.budget.wait_take(size)
        self.stats.writes_behind += 1
        task = asyncio.ensure_future(self._write_behind(key, event, ts, size))
        self._behind.add(task)
        task.add_done_callback(self._behind.discard)

    async def _write_behind(self, key: Any, event: ExecuteSuccessEvent, ts: Any, size: int) -> None:
        try:
            stored = await self._write(key, event.value, ts, _size_bound(event))
            if stored is not None:
                # The run tells the scheduler which computation of the key this result
                # is: a key released or recomputed since gets no lane replica from it.
                await self._notify({"key": key, "run_id": event.run_id, "stored": stored})
        finally:
            # Only once the scheduler knows: a worker lost now loses no stored result
            # the scheduler has not heard of beyond what the budget holds.
            self.budget.give(size)
            self.stats.writes_behind -= 1

    async def _notify(self, record: dict[str, Any]) -> None:
        """Tell the scheduler that a result landed; return once it has recorded it.

        Results that land while a notification is under way go together in the next one.
        """
        done = asyncio.get_running_loop().create_future()
        self._landed.append((record, done))
        if self._notifier is None:
            self._notifier = asyncio.ensure_future(self._send_landed())
        await done

    async def _send_landed(self) -> None:
        try:
            while self._landed:
                batch, self._landed = self._landed, []
                try:
                    await self.worker.scheduler.storage_stored(
                        records=[r for r, _ in batch], worker=self.worker.address
                    )
                except Exception as e:  # the scheduler is gone: nobody to tell
                    logger.debug("Cannot report %d stored results: %s", len(batch), e)
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)
        finally:
            self._notifier = None

    def _write_failed(self, key: Any, error: Exception) -> None:
        self.stats.write_failures += 1
        self.stats.skipped("write-failed")
        if isinstance(error, OSError):
            # The store itself failed: skip it for a while; warn once per outage.
            if not self._skip_until:
                logger.warning(
                    "Cannot write to the store (%s); results stay in worker memory and move "
                    "between workers as in stock Dask until it recovers",
                    error,
                )
            self._skip_until = time.monotonic() + DEGRADED_BACKOFF
            return
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


#: Types whose size as Dask measures it (``sizeof``) bounds their pickled size. Not
#: arbitrary objects (``sys.getsizeof`` of an instance ignores what it refers to), nor
#: containers of them.
_EXACTLY_SIZED = (bytes, bytearray, memoryview, str, int, float, complex, bool, type(None))


def _size_bound(event: ExecuteSuccessEvent) -> int | None:
    """The size of the result, where it bounds what will be written; else None."""
    value = event.value
    if isinstance(value, _EXACTLY_SIZED):
        return event.nbytes
    dtype = getattr(value, "dtype", None)
    if type(value).__module__ == "numpy" and getattr(dtype, "hasobject", True) is False:
        return event.nbytes
    return None
