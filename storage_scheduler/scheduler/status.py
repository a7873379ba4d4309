"""What the scheduler reports of its store: counters, per-worker figures, history.

Read by clients (``storage_info`` / ``storage_status`` RPCs: ``enable``, ``dask storage
status``), by the ``/storage`` page and by the Prometheus collector; all of them get the
typed records of :mod:`storage_scheduler._protocol`.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from storage_scheduler._protocol import (
    HEARTBEAT_KEY,
    Heartbeat,
    WorkerStatus,
    empty_heartbeat,
)

if TYPE_CHECKING:
    from distributed.scheduler import WorkerState

__all__ = ["Counters", "History", "heartbeat_of", "worker_status"]


@dataclass
class Counters:
    """What the scheduler plugin has seen since it started."""

    #: Keys whose result a worker reported stored (lane replicas added).
    stored: int = 0
    #: Bytes of the objects workers reported stored.
    stored_bytes: int = 0
    #: Lane replicas dropped because their object could not be read.
    unreadable: int = 0


def heartbeat_of(ws: WorkerState) -> Heartbeat:
    """The store figures ``ws`` sent with its last heartbeat."""
    sent = ws.metrics.get(HEARTBEAT_KEY)
    return cast(Heartbeat, sent) if isinstance(sent, dict) else empty_heartbeat()


def worker_status(ws: WorkerState) -> WorkerStatus:
    """One worker's RAM (results held vs the rest) and store traffic."""
    memory = ws.memory
    return WorkerStatus(
        **heartbeat_of(ws),
        address=ws.address,
        name=str(ws.name),
        results_ram=memory.managed,
        tasks_ram=memory.unmanaged,
        memory_limit=ws.memory_limit,
    )


@dataclass
class History:
    """(time, bytes stored so far, bytes read so far), at most one sample a second."""

    samples: collections.deque[tuple[float, int, int]] = field(
        default_factory=lambda: collections.deque(maxlen=600)
    )

    def sample(self, stored_bytes: int, workers: Iterable[WorkerState]) -> None:
        now = time.time()
        if self.samples and now - self.samples[-1][0] < 1.0:
            return
        read = sum(heartbeat_of(ws)["bytes_read"] for ws in workers)
        self.samples.append((now, stored_bytes, read))
