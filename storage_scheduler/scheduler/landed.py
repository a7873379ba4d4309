"""Write-behind on the scheduler: results whose writes land after their task finished.

With ``durability: write-behind`` a worker reports a task as soon as it is computed and
writes its result in the background; once the write lands it calls the scheduler's
``storage_stored`` RPC (several results at once), and only when that returns does it
free the result's room in its write budget. So the scheduler hears of every stored result
before the worker may start writing more than its budget holds: a worker lost at any
moment leaves at most ``max-concurrency`` results (``write-buffer`` bytes) reported but
not recorded as stored.

Notes
-----
Runs on the scheduler's event loop, without I/O.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from storage_scheduler import _compat
from storage_scheduler._protocol import StoredResult

if TYPE_CHECKING:
    from distributed import Scheduler
    from distributed.scheduler import TaskState

    from storage_scheduler.scheduler.plugin import StorageSchedulerPlugin

__all__ = ["flush_workers", "handle_stored", "is_current"]

logger = logging.getLogger(__name__)


def is_current(ts: TaskState | None, run_id: int) -> bool:
    """Whether run ``run_id`` of ``ts`` is the result the cluster holds: the key is in
    memory from that run (on its worker, or copied from it since: a retired worker's
    results move to another before its writes land)."""
    return ts is not None and ts.state == "memory" and _compat.task_run_id(ts) == run_id


def handle_stored(
    plugin: StorageSchedulerPlugin, key: Any, run_id: int, stored: StoredResult, worker: str
) -> None:
    """The store holds ``key``'s result of run ``run_id``, computed on ``worker``.

    Its lane replica is added only if that run is current (:func:`is_current`). A
    notification that comes after the key was released, forgotten or recomputed adds no
    replica; the object is still a valid result of its token, recorded in the catalog,
    and deleted like any intermediate if nothing holds the key any more (kept if a client
    had asked for it). Its lineage token is recorded if the task is still the one that
    ran (released since, not run again): with write-behind most writes land after their
    key was released, and without a lineage the result could never be reused.
    """
    ts = plugin.scheduler.tasks.get(key)
    current = is_current(ts, run_id)
    if current and ts is not None:
        plugin.lanes.add(ts, stored.get("token"))
    same_run = ts is not None and _compat.task_run_id(ts) == run_id
    plugin.record(key, ts if same_run else None, stored)
    if not current and (ts is None or ts.state in ("released", "forgotten", "erred")):
        plugin.retention.dropped(key, stored.get("token"))


async def flush_workers(scheduler: Scheduler, timeout: float) -> None:
    """Let the workers' writes still running land, and their notifications arrive
    (before a closing scheduler writes its catalog for the last time)."""
    try:
        await asyncio.wait_for(
            scheduler.broadcast(msg={"op": "storage_flush"}, on_error="ignore"), timeout
        )
    except Exception as e:  # workers already gone, say: nothing more to wait for
        logger.debug("Waiting for the workers' writes failed: %s", e)
