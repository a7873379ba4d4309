"""Storage lanes: the store, seen by the scheduler as holders of stored keys.

Each lane is a scheduler ``WorkerState`` with a ``storage://<store-id>-lane<i>`` address,
paused and without threads, that is never added to ``scheduler.workers``. A stored key
gets its lane as a replica in ``TaskState.who_has``, and stock code paths do the rest:

* ``remove_worker`` recomputes a key only when no holder is left: a stored key survives
  the loss of every worker;
* dependents, ``Client.gather`` and ``replicate`` fetch from the lane, which the
  ``storage://`` comm answers by reading the store;
* ``retire_workers`` only drops the retiring worker's replicas: nothing is copied.

Several lanes, because a worker keeps at most one transfer in flight per holder: the
lane count is the number of concurrent store reads per worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from distributed.scheduler import TaskState, WorkerState

from storage_scheduler import _compat
from storage_scheduler._protocol import lane_addresses

if TYPE_CHECKING:
    from distributed import Scheduler

logger = logging.getLogger(__name__)

__all__ = ["Lanes"]


class Lanes:
    """A store's lanes on one scheduler.

    Notes
    -----
    Every method runs on the scheduler's event loop and does no I/O; none blocks it.
    """

    scheduler: Scheduler
    #: The lanes by address.
    by_address: dict[str, WorkerState]
    #: The token of each held key's object: what readers must find in it.
    tokens: dict[Any, str]
    _list: list[WorkerState]

    def __init__(self, scheduler: Scheduler, store_id: str, n: int):
        self.scheduler = scheduler
        self._list = [_compat.make_lane(scheduler, a) for a in lane_addresses(store_id, n)]
        self.by_address = {ws.address: ws for ws in self._list}
        self.tokens = {}

    def __contains__(self, address: object) -> bool:
        return address in self.by_address

    @property
    def addresses(self) -> list[str]:
        return list(self.by_address)

    def lane_for(self, key: Any) -> WorkerState:
        """The lane that holds ``key`` (a fixed spread of keys over lanes)."""
        return self._list[hash(key) % len(self._list)]

    def add(self, ts: TaskState, token: str | None) -> None:
        """Record that the store holds ``ts`` (a task in memory), as an object with
        ``token`` (None: unknown, readers check only the key)."""
        _compat.add_replica(self.scheduler, ts, self.lane_for(ts.key))
        self.remember(ts.key, token)

    def remember(self, key: Any, token: str | None) -> None:
        if token is None:
            self.tokens.pop(key, None)
        else:
            self.tokens[key] = token

    def drop(self, ts: TaskState) -> int:
        """Forget that the store holds ``ts``; return how many lane replicas went."""
        held = [ws for ws in ts.who_has or () if ws.address in self.by_address]
        for ws in held:
            _compat.remove_replica(self.scheduler, ts, ws)
        self.tokens.pop(ts.key, None)
        return len(held)

    def forget_unreadable(self, keys: Iterable[Any], stimulus_id: str | None = None) -> int:
        """Drop the lane replicas of these keys (their objects are unreadable); release a
        key left with no holder, which recomputes it if anything still wants it (what
        ``remove_worker`` does for a lost worker's keys). Returns the replicas dropped."""
        recommendations: dict[Any, str] = {}
        dropped = 0
        for key in keys:
            ts = self.scheduler.tasks.get(key)
            if ts is None or ts.state != "memory":
                continue
            dropped += self.drop(ts)
            if not ts.who_has:
                recommendations[key] = "released"
        if recommendations:
            logger.warning(
                "Recomputing %d keys whose stored results cannot be read", len(recommendations)
            )
            self.scheduler.transitions(
                recommendations,  # type: ignore[arg-type]
                stimulus_id or f"storage-unreadable-{time.time()}",
            )
        return dropped

    def tokens_of(self, tasks: Iterable[TaskState]) -> dict[Any, str]:
        """The tokens of those ``tasks`` the lanes hold."""
        return {ts.key: self.tokens[ts.key] for ts in tasks if ts.key in self.tokens}

    async def lookup(self, keys: list[Any]) -> dict[Any, str]:
        """The tokens of those ``keys`` the lanes hold (for this process's lane reads)."""
        return {k: self.tokens[k] for k in keys if k in self.tokens}

    def holds(self, ts: TaskState) -> bool:
        return any(ws.address in self.by_address for ws in ts.who_has or ())

    def keys(self) -> Iterator[Any]:
        """Every key the lanes hold."""
        for ws in self._list:
            for ts in ws.has_what:
                yield ts.key

    async def snapshot(self) -> list[list[TaskState]]:
        """What each lane holds, as lists that later changes leave alone, for a thread to
        read. One lane at a time, letting the loop run in between: a copy touches every
        task (~10 ms per 100,000 keys)."""
        out = []
        for ws in self._list:
            out.append(list(ws.has_what))
            await asyncio.sleep(0)
        return out

    @property
    def nkeys(self) -> int:
        return sum(len(ws.has_what) for ws in self._list)

    @property
    def nbytes(self) -> int:
        return sum(ws.nbytes for ws in self._list)

    def clear(self) -> None:
        """Forget everything (``Scheduler.restart`` forgot every task)."""
        for ws in self._list:
            _compat.clear_lane(ws)
        self.tokens.clear()
