"""Reading dropped results back on a worker without blocking its event loop.

The worker reads its data mapping synchronously, on its event loop: the inputs of a task
(``Worker.execute``) and the keys a peer asks for (``Worker.get_data``). For a result
that :class:`~storage_scheduler.worker.spill.StoreSpillBuffer` dropped, that would be a
store read on the loop. :class:`ReadBack` wraps both: it awaits the store first, so that
the mapping then hands out the values it holds.

A dropped result the store cannot serve is lost on this worker, as a dead worker's results
are: the worker tells the scheduler (``storage-lost``), which forgets this worker's
replica (and the lane's, if the object is missing or damaged), moves the tasks that
needed it off this worker, and recomputes the key if nobody else holds it. The task that
found out is rescheduled; a peer that asked gets an answer without the key.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from distributed.worker_state_machine import StateMachineEvent

from storage_scheduler import _compat
from storage_scheduler.worker.spill import StoreSpillBuffer

if TYPE_CHECKING:
    from distributed import Worker

__all__ = ["ReadBack"]

Execute = Callable[..., Awaitable[StateMachineEvent]]


class ReadBack:
    """Wraps ``Worker.execute`` and the ``get_data`` handler of one worker."""

    worker: Worker
    buffer: StoreSpillBuffer

    def __init__(self, worker: Worker, buffer: StoreSpillBuffer):
        self.worker = worker
        self.buffer = buffer

    def wrap_execute(self, original: Execute) -> Execute:
        async def execute(key: Any, *, stimulus_id: str) -> StateMachineEvent:
            ts = _compat.worker_task(self.worker, key)
            dropped = self.buffer.dropped
            deps = [d.key for d in ts.dependencies if d.key in dropped] if ts else []
            held: list[object] = []
            if deps:
                held, lost = await self.buffer.read_back(deps)
                if lost:
                    self.report_lost(lost)
                    return _compat.reschedule_event(key, f"storage-lost-{time.time()}")
            try:
                return await original(key, stimulus_id=stimulus_id)
            finally:
                del held  # the inputs stay alive as long as the task needs them

        return execute

    def wrap_get_data(self, original: Callable[..., Any]) -> Callable[..., Any]:
        async def get_data(comm: Any, keys: Any = (), **kwargs: Any) -> Any:
            dropped = self.buffer.dropped
            wanted = [k for k in keys if k in dropped]
            held: list[object] = []
            if wanted:
                held, lost = await self.buffer.read_back(wanted)
                if lost:
                    self.report_lost(lost)
                    keys = [k for k in keys if k not in lost]
            try:
                return await original(comm, keys=keys, **kwargs)
            finally:
                del held

        return get_data

    def report_lost(self, lost: dict[Any, bool]) -> None:
        """Tell the scheduler which dropped keys this worker cannot serve any more;
        ``lost`` says for each whether its stored object is missing or damaged."""
        for damaged in (True, False):
            keys = [k for k, d in lost.items() if d is damaged]
            if keys:
                self.worker.batched_send(
                    {
                        "op": "storage-lost",
                        "keys": keys,
                        "damaged": damaged,
                        "stimulus_id": f"storage-lost-{time.time()}",
                    }
                )
