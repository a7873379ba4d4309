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
    StorageInfo,
    StorageStatus,
    WorkerStatus,
    empty_heartbeat,
)
from storage_scheduler.config import redact_url

if TYPE_CHECKING:
    from distributed.scheduler import WorkerState

    from storage_scheduler.scheduler.plugin import StorageSchedulerPlugin

__all__ = [
    "Counters",
    "History",
    "heartbeat_of",
    "storage_info",
    "storage_status",
    "worker_status",
]


@dataclass
class Counters:
    """What the scheduler plugin has seen since it started."""

    #: Keys whose result a worker reported stored (lane replicas added).
    stored: int = 0
    #: Bytes of the objects workers reported stored.
    stored_bytes: int = 0
    #: Stored results found missing or damaged (so computed): lane replicas dropped,
    #: and loads of requested keys that failed.
    unreadable: int = 0


def heartbeat_of(ws: WorkerState) -> Heartbeat:
    """The store figures ``ws`` sent with its last heartbeat."""
    sent = ws.metrics.get(HEARTBEAT_KEY)
    # Merged over the defaults: a worker of an older version sends fewer figures.
    return (
        cast(Heartbeat, {**empty_heartbeat(), **sent})
        if isinstance(sent, dict)
        else empty_heartbeat()
    )


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


def storage_info(plugin: StorageSchedulerPlugin) -> StorageInfo:
    """What the store holds for a cluster, for clients and ``dask storage``."""
    settings = plugin.settings.worker
    return StorageInfo(
        url=redact_url(plugin.store_settings.url),
        store_id=plugin.store_id,
        lanes=plugin.lanes.addresses,
        keys_in_lanes=plugin.lanes.nkeys,
        bytes_in_lanes=plugin.lanes.nbytes,
        stored_total=plugin.counters.stored,
        unreadable_total=plugin.counters.unreadable,
        reused_total=plugin.reuse.reused_total,
        deleted_total=plugin.retention.deleted_total,
        catalog_keys=len(plugin.catalog),
        catalog_bytes=plugin.catalog.nbytes,
        stored_bytes_total=plugin.counters.stored_bytes,
        writing=settings.write,
        results=settings.results,
        prefer=settings.prefer,
    )


def storage_status(plugin: StorageSchedulerPlugin) -> StorageStatus:
    """:func:`storage_info` with every worker's RAM and store traffic, and the history."""
    workers = sorted(plugin.scheduler.workers.values(), key=lambda w: w.address)
    return StorageStatus(
        **storage_info(plugin),
        workers=[worker_status(ws) for ws in workers],
        history=list(plugin.history.samples),
    )
