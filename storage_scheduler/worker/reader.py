"""The read path on workers: loading requested stored results, reporting lost objects.

Inputs a worker fetches from a lane go through the ``storage://`` comm
(:mod:`storage_scheduler.comm`); which holder a worker prefers is the job of the
``WorkerState`` subclasses in :mod:`storage_scheduler._compat`. What is here: the body of
the task that loads a requested stored key, and the report that tells the scheduler a
lane's object cannot be read, so that it drops the lane replica instead of sending
readers back to it forever.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from dask._task_spec import Task
from distributed import Reschedule
from distributed.utils import sync
from distributed.worker import get_worker

from storage_scheduler.store import classify, is_outage

if TYPE_CHECKING:
    from distributed import Worker

__all__ = ["is_loader", "load_stored", "report_unreadable"]

logger = logging.getLogger(__name__)


def report_unreadable(worker: Worker, keys: list[Any], outage: bool = False) -> None:
    """Tell the scheduler that the store could not serve ``keys`` (stream op): their
    objects are missing or damaged, or (``outage``) the store does not answer for now."""
    worker.batched_send(
        {
            "op": "storage-unreadable",
            "keys": keys,
            "outage": outage,
            "stimulus_id": f"storage-unreadable-{time.time()}",
        }
    )


def load_stored(key: Any, token: str | None = None) -> Any:
    """Task body of a requested key whose result the store already holds.

    The scheduler gives a stored key that a client asks for this body instead of its own
    (see :mod:`storage_scheduler.scheduler.reuse`). It runs in a worker thread. If the
    object is missing or damaged, the key is reported unreadable and the task
    rescheduled; the scheduler then restores the original task and its dependencies, and
    the result is computed instead. If the store does not answer (for
    ``retry.outage-window``), the task is rescheduled as it is: it loads again, later or
    elsewhere, and the stored result is not given up. ``token`` is the token of the result
    the scheduler decided to reuse: an object with another one (another cluster's result
    under the same key) is not loaded.
    """
    from storage_scheduler.worker.plugin import StorageWorkerPlugin

    worker = get_worker()
    plugin = worker.plugins.get(StorageWorkerPlugin.name)
    if not isinstance(plugin, StorageWorkerPlugin) or plugin.store is None:
        raise Reschedule()
    try:
        value = sync(worker.loop, plugin.store.get, key, token)
    except OSError as e:  # StoreError is one too
        outcome = classify(e)
        if outcome != "unavailable":
            logger.warning("Cannot load the stored result of %r (%s); computing it instead", key, e)
            # Queued on the worker's stream ahead of the reschedule message.
            worker.loop.add_callback(report_unreadable, worker, [key])
        elif is_outage(e):  # the store has warned once for the outage
            logger.info("Cannot load the stored result of %r now (%s); will try again", key, e)
            worker.loop.add_callback(report_unreadable, worker, [key], True)
        else:  # refused (permissions): compute it, keep the stored result
            logger.warning("Cannot load the stored result of %r (%s); computing it instead", key, e)
        raise Reschedule() from e
    plugin.loaded(value)
    return value


def is_loader(spec: Any) -> bool:
    """Whether a task spec is a :func:`load_stored` body."""
    return isinstance(spec, Task) and spec.func is load_stored


def loader_token(spec: Any) -> str | None:
    """The token a :func:`load_stored` body loads."""
    token = spec.args[1] if len(spec.args) > 1 else None
    return token if isinstance(token, str) else None
