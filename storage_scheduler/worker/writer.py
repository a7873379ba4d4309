"""The write path: every finished result goes to the store before it is reported.

``worker.execute`` is wrapped (see :func:`storage_scheduler._compat.wrap_execute`): after a
successful run, the result is serialized and written off the event loop, and the report
carries :class:`~storage_scheduler._protocol.StoredResult` metadata, from which the
scheduler adds the lane replica in the same transition that puts the key in memory — a
result is never "finished but not yet stored". While the write runs, the task gives its
thread slot back, as a task that calls ``distributed.secede`` does, so the next task
computes meanwhile.

A failure to serialize or store a result never fails the task: the result stays in
worker memory as in stock Dask, a warning is logged once, and the failure is counted.
"""

from __future__ import annotations

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
from storage_scheduler.store import Store
from storage_scheduler.worker.policy import StoragePolicy
from storage_scheduler.worker.reader import is_loader, loader_token

if TYPE_CHECKING:
    from distributed import Worker

__all__ = ["ResultWriter", "WriterStats"]

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
    #: Results not stored, by reason (see ``Heartbeat.not_stored_by_reason``).
    not_stored_by_reason: Counter[str] = field(default_factory=Counter)

    def skipped(self, reason: str) -> None:
        self.not_stored += 1
        self.not_stored_by_reason[reason] += 1


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

    def wrap(self, original: _compat.Execute) -> _compat.Execute:
        async def execute(key: Any, *, stimulus_id: str) -> StateMachineEvent:
            event = await original(key, stimulus_id=stimulus_id)
            if isinstance(event, ExecuteSuccessEvent):
                # Nothing may escape from here: an exception would leave the task
                # executing forever in the worker state machine.
                try:
                    await self.store_result(key, event)
                except Exception as e:  # pragma: no cover - store_result catches its own
                    logger.exception("Storing the result of %r failed unexpectedly: %s", key, e)
            return event

        return execute

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

    async def store_result(self, key: Any, event: ExecuteSuccessEvent) -> None:
        if self.closed or not self._wants_stored(key):
            return
        if time.monotonic() < self._skip_until:
            self.stats.skipped("store-down")
            return
        ts = _compat.worker_task(self.worker, key)
        if ts is None:
            return
        metadata = _compat.finished_metadata(ts)
        if is_loader(ts.run_spec):
            # Read back from the store: already there. Only tell the scheduler.
            loaded = loader_token(ts.run_spec)
            metadata[METADATA_KEY] = (
                StoredResult(loaded=True, token=loaded) if loaded else StoredResult(loaded=True)
            )
            if self.on_stored is not None:
                self.on_stored(key, loaded)
            return
        if self._not_worth_storing(ts, event):
            return
        spec, annotations, version = ts.run_spec, ts.annotations, self.settings.version
        detached = self._release_thread_slot(ts, event)
        try:
            # Shows in Dask's fine performance metrics as execute / <prefix> / store-write.
            with context_meter.meter("store-write", "seconds"):
                tokens: list[str] = []

                def token() -> str:  # computed in the store's thread pool: CPU work
                    tokens.append(result_token(spec, version, annotations))
                    return tokens[0]

                created = time.time()
                nbytes = await self.store.put(key, event.value, token=token, created=created)
        except Exception as e:
            self._write_failed(key, e)
            return
        finally:
            if detached:
                self.stats.writes_detached -= 1
        context_meter.digest_metric("store-write", 1, "count")
        context_meter.digest_metric("store-write", nbytes, "bytes")
        metadata[METADATA_KEY] = StoredResult(nbytes=nbytes, token=tokens[0], created=created)
        if self.on_stored is not None:
            self.on_stored(key, tokens[0])
        self.stats.stored += 1
        if self._skip_until:
            self._skip_until = 0.0
            logger.warning("The store %s is writable again", self.store)

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

    def _release_thread_slot(self, ts: Any, event: ExecuteSuccessEvent) -> bool:
        """Let the next task compute while this result is written.

        At most as many writes as threads run detached: a store slower than the
        computation holds slots again instead of piling up results in memory.
        """
        if self.stats.writes_detached >= self.worker.state.nthreads:
            return False
        released = _compat.release_thread_slot(
            self.worker, ts, event.stop - event.start, f"storage-write-{time.time()}"
        )
        if released:
            self.stats.writes_detached += 1
        return released

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
