"""Memory relief on the worker: stored results leave RAM without being written anywhere.

A worker's ``data`` is a :class:`~distributed.spill.SpillBuffer` (a ``zict.Buffer``: a
fast dict in RAM over a slow mapping on local disk), which the worker drives in two
places: inserting a result past ``distributed.worker.memory.target`` moves the least
recently used results to disk, and the memory monitor calls ``evict()`` while the
process is above ``distributed.worker.memory.spill``. :class:`StoreSpillBuffer` is that
buffer with one more tier: a result the store already holds is *dropped* — it leaves
RAM, nothing is written, and the key, its token and its size are remembered — before any
result the store does not hold goes to disk. Reading a dropped key reads it back from the
store through the verified path (:meth:`Store.get <storage_scheduler.store.Store.get>`,
token checked). Results the store does not hold (annotated ``storage=False``, not yet
written, or whose write failed) spill to disk exactly as in stock Dask.

The plugin installs it in place, from its ``setup`` (so ``dask worker --preload
storage_scheduler`` works): see :func:`storage_scheduler._compat.adopt_spill_buffer`.

What the worker reports stays true: dropped results are not in ``fast`` (not managed
memory in RAM), not in ``slow`` (not spilled to disk); ``spilled_total`` counts their
size in memory (so that the scheduler's managed memory, ``nbytes - spilled.memory``,
excludes them) but not on disk (the dashboard's "spilled" bar is local disk only). Their
bytes are reported separately, in the heartbeat and on ``/metrics``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, ItemsView, Iterator, ValuesView
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import zict

from distributed.spill import SpillBuffer, SpilledSize

from storage_scheduler.store import Store, classify

__all__ = ["EvictionStats", "StoreSpillBuffer"]

logger = logging.getLogger(__name__)

#: Tokens of results written but not yet inserted that a buffer keeps at most.
MAX_PENDING = 10_000
#: Seconds a read of a dropped key may block the caller (``__getitem__`` on the loop).
BLOCKING_READ_TIMEOUT = 300.0

_MISSING = object()


@dataclass
class EvictionStats:
    """What a worker's buffer did with its results under memory pressure."""

    #: Results dropped from RAM because the store holds them (nothing written).
    evicted: int = 0
    #: Their size in memory (``sizeof``), summed over every drop.
    evicted_bytes: int = 0
    #: Dropped results read back from the store (for a task or a peer).
    read_back: int = 0
    #: Dropped results the store could not serve (recomputed elsewhere).
    lost: int = 0


class StoreSpillBuffer(SpillBuffer):
    """A ``SpillBuffer`` that drops results the store holds instead of spilling them.

    Not constructed: an existing ``SpillBuffer`` becomes one with :meth:`adopt` (the
    worker, its state machine and its memory manager all hold the same object).

    Notes
    -----
    Every method runs on the worker's event loop (the state machine and the memory
    monitor), except :meth:`__getitem__` called from a task thread. A dropped key read
    with :meth:`__getitem__` blocks its caller for one store read, as stock Dask blocks
    on a read from its spill directory; the worker reads task inputs and answers peers
    through :meth:`read_back` instead, which awaits the store.
    """

    store: Store
    stats: EvictionStats
    #: Keys in ``fast`` whose results the store holds, oldest first: token of each.
    _stored: dict[Any, str | None]
    #: Tokens of results written to the store and not yet inserted.
    _pending: dict[Any, str | None]
    #: Dropped keys: (token, size in memory).
    _dropped: dict[Any, tuple[str | None, int]]
    #: Dropped keys the store could not serve.
    _lost: set[Any]
    _dropped_bytes: int
    #: Values read back that are still referenced (by a running task, say).
    _alive: zict.WeakValueMapping[Any, Any]
    #: Values read back that cannot be weakly referenced: given to the next read only.
    _once: dict[Any, object]
    #: Managed memory (bytes) above which stored results are dropped: at most the
    #: buffer's own target (``distributed.worker.memory.target``), above which it spills.
    relief_target: float
    #: The token of an input the scheduler says the store holds (None: not known).
    _known_token: Callable[[Any], str | None]
    #: A loop in its own thread, for blocking reads from ``__getitem__``.
    _reader: asyncio.AbstractEventLoop | None

    def adopt(
        self, store: Store, known_token: Callable[[Any], str | None], relief_target: float
    ) -> None:
        """Start dropping stored results, reading them back from ``store``.

        On a buffer whose class was just swapped to this one; or again, by the plugin
        that replaces another (``storage_scheduler.disable``, say): the results dropped
        so far stay dropped, and are read from the new plugin's store.
        """
        if not hasattr(self, "stats"):
            self.stats = EvictionStats()
            self._dropped, self._lost, self._dropped_bytes = {}, set(), 0
            self._alive, self._once = zict.WeakValueMapping(), {}
        self._stored, self._pending = {}, {}
        self.store = store
        self._known_token = known_token
        self._reader = None
        self.relief_target = relief_target

    def detach(self) -> None:
        """Stop dropping (plugin teardown). Results dropped so far stay dropped: reading
        them all back could be more than the worker's memory."""
        self._stored.clear()
        self._pending.clear()
        self._stop_reader()

    # -------------------------------------------------------------- what is droppable

    def mark_stored(self, key: Any, token: str | None) -> None:
        """The store now holds ``key``'s result under ``token`` (the writer, before the
        worker inserts the result)."""
        if key in self.fast:
            self._stored[key] = token
            return
        if len(self._pending) >= MAX_PENDING:  # results of tasks that were cancelled
            for old in list(self._pending)[: MAX_PENDING // 2]:
                del self._pending[old]
        self._pending[key] = token

    def _token_for(self, key: Any) -> object:
        token = self._pending.pop(key, _MISSING)
        if token is _MISSING:  # an input fetched from a lane or a peer
            known = self._known_token(key)
            return _MISSING if known is None else known
        return token

    # ------------------------------------------------------------- zict.Buffer hooks

    def __setitem__(self, key: Any, value: object) -> None:
        self._forget(key)
        self._stored.pop(key, None)
        token = self._token_for(key)
        weight = int(self.weight(key, value))
        if token is not _MISSING and weight > self.n:
            # Stock Dask would write it straight to disk: the store has it already.
            self._drop(key, token, weight)  # type: ignore[arg-type]
            return
        self._make_room(weight)
        if token is not _MISSING:
            self._stored[key] = token  # type: ignore[assignment]
        super().__setitem__(key, value)

    def _make_room(self, weight: int) -> None:
        """Drop stored results, oldest first, until ``weight`` more fits under the
        target: so that the LRU spills nothing to disk while a stored result is in RAM."""
        fast, target = self.fast, min(self.relief_target, self.n)
        while self._stored and fast.total_weight + fast.offset + weight > target:
            fast.evict(next(iter(self._stored)))

    def fast_to_slow(self, key: Any, value: object) -> None:
        """Called by the LRU for every result leaving RAM: drop it if stored, else spill."""
        token = self._stored.pop(key, _MISSING)
        if token is _MISSING:
            super().fast_to_slow(key, value)
            return
        self._drop(key, token, int(self.fast.weights[key]))  # type: ignore[arg-type]

    def _drop(self, key: Any, token: str | None, weight: int) -> None:
        self._dropped[key] = (token, weight)
        self._dropped_bytes += weight
        self.stats.evicted += 1
        self.stats.evicted_bytes += weight

    def evict(self) -> int:
        """The memory monitor's call: drop the oldest stored result in RAM, if any;
        else spill the least recently used result to disk, as stock Dask does."""
        if self._stored:
            _, _, weight = self.fast.evict(next(iter(self._stored)))
            return int(weight)
        return super().evict()

    def __getitem__(self, key: Any) -> object:
        entry = self._dropped.get(key)
        if entry is None:
            return super().__getitem__(key)
        alive = self._once.pop(key, _MISSING)
        if alive is _MISSING:
            alive = self._alive.get(key, _MISSING)
        if alive is not _MISSING:
            return alive
        if key in self._lost:
            raise KeyError(key)
        return self._read_blocking(key, entry[0])

    def __delitem__(self, key: Any) -> None:
        if key in self._dropped:
            self._forget(key)
            return
        self._stored.pop(key, None)
        super().__delitem__(key)

    def _forget(self, key: Any) -> None:
        entry = self._dropped.pop(key, None)
        if entry is not None:
            self._dropped_bytes -= entry[1]
            self._lost.discard(key)
            self._alive.pop(key, None)
            self._once.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._dropped or super().__contains__(key)

    def __len__(self) -> int:
        return super().__len__() + len(self._dropped)

    def __iter__(self) -> Iterator[Any]:
        yield from super().__iter__()
        yield from list(self._dropped)

    def items(self) -> ItemsView[Any, object]:
        return ItemsView(self)

    def values(self) -> ValuesView[object]:
        return ValuesView(self)

    @property
    def spilled_total(self) -> SpilledSize:
        """Spilled to disk, plus (in memory only) what was dropped: the worker's managed
        memory excludes both, its "spilled" figure counts only the disk."""
        return super().spilled_total + SpilledSize(self._dropped_bytes, 0)

    # ------------------------------------------------------------------ reading back

    @property
    def dropped(self) -> dict[Any, tuple[str | None, int]]:
        """Dropped keys: (token, size in memory). For inspection only."""
        return self._dropped

    @property
    def dropped_bytes(self) -> int:
        """Size in memory of the results currently dropped (held by the store only)."""
        return self._dropped_bytes

    def is_lost(self, key: Any) -> bool:
        return key in self._lost

    async def read_back(self, keys: list[Any]) -> tuple[list[object], dict[Any, bool]]:
        """Read dropped ``keys`` from the store, on the calling loop; keep each value
        readable by ``__getitem__`` for as long as the caller holds the returned list.

        Returns the values, and the keys that could not be read, each with whether its
        object is missing or damaged (rather than the store not answering).
        """
        wanted = [
            k for k in keys if k in self._dropped and k not in self._alive and k not in self._once
        ]
        lost = {k: False for k in keys if k in self._lost}
        wanted = [k for k in wanted if k not in lost]
        results = await asyncio.gather(
            *(self.store.get(k, self._dropped[k][0], patient=False) for k in wanted),
            return_exceptions=True,
        )
        held: list[object] = [v for v in map(self._alive.get, keys) if v is not None]
        for key, result in zip(wanted, results, strict=True):
            if key not in self._dropped:  # released while it was read
                continue
            if isinstance(result, BaseException):
                lost[key] = self._lose(key, result)
                continue
            self.stats.read_back += 1
            held.append(result)
            try:
                self._alive[key] = result
            except TypeError:  # not weakly referenceable (list, dict): kept for one read
                self._once[key] = result
        return held, lost

    def _lose(self, key: Any, error: BaseException) -> bool:
        outcome = classify(error)
        logger.warning(
            "Cannot read back the stored result of %r (%s: %s); it is lost on this worker",
            key,
            outcome,
            error,
        )
        self._lost.add(key)
        self.stats.lost += 1
        return outcome != "unavailable"

    def _read_blocking(self, key: Any, token: str | None) -> object:
        loop = self._reader_loop()
        future: Future[object] = asyncio.run_coroutine_threadsafe(
            self.store.get(key, token, patient=False), loop
        )
        try:
            value = future.result(BLOCKING_READ_TIMEOUT)
        except Exception as e:
            self._lose(key, e)
            raise KeyError(key) from e
        self.stats.read_back += 1
        return value

    def _reader_loop(self) -> asyncio.AbstractEventLoop:
        if self._reader is None:
            loop = asyncio.new_event_loop()
            threading.Thread(
                target=loop.run_forever, name="storage-scheduler-readback", daemon=True
            ).start()
            self._reader = loop
        return self._reader

    def _stop_reader(self) -> None:
        if self._reader is not None:
            self._reader.call_soon_threadsafe(self._reader.stop)
            self._reader = None
