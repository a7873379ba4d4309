"""Graphs as schedulers materialize them, off the event loop (see the package's docstring).

``Scheduler.update_graph`` materializes a submitted graph in distributed's offload thread
(the module-level ``_materialize_graph``), then creates its tasks and calls
``SchedulerPlugin.update_graph`` in one synchronous step on the event loop. Work that
depends only on the graph itself can be done in the offload thread instead, ahead of
that step, by a watcher of materialized graphs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import distributed.scheduler as _scheduler

__all__ = ["watch_graphs"]

logger = logging.getLogger(__name__)

#: Called with each graph (key -> task spec) and its annotations by type, in the thread
#: that materialized it. Annotations it adds are applied to the graph's tasks.
GraphWatcher = Callable[[Mapping[Any, Any], MutableMapping[str, Any]], None]

_watchers: list[GraphWatcher] = []
_lock = threading.Lock()
_materialize = _scheduler._materialize_graph


def _materialize_and_watch(*args: Any, **kwargs: Any) -> Any:
    dsk, annotations = _materialize(*args, **kwargs)
    for watcher in list(_watchers):
        try:
            watcher(dsk, annotations)
        except Exception:  # a watcher only prepares work: the graph goes on regardless
            logger.exception("Watching a new graph failed")
    return dsk, annotations


def watch_graphs(watcher: GraphWatcher) -> Callable[[], None]:
    """Call ``watcher`` with every graph a scheduler of this process materializes, in the
    offload thread, before its tasks exist; return the function that stops it.

    It sees every scheduler's graphs (``_materialize_graph`` does not say whose), and may
    see graphs that are then cancelled or culled.
    """
    with _lock:
        _scheduler._materialize_graph = _materialize_and_watch
        _watchers.append(watcher)

    def unwatch() -> None:
        with _lock:
            if watcher in _watchers:
                _watchers.remove(watcher)

    return unwatch
