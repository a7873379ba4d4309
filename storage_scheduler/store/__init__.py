"""The store: task results as immutable, verified objects at an fsspec URL.

* :mod:`~storage_scheduler.store.serialize`: object names and the byte layout;
* :class:`Store`: the async key/value API over a backend (a local directory, or any
  fsspec filesystem), with retries and error classification;
* :mod:`~storage_scheduler.store.catalog`: the index of stored keys (the manifest);
* :mod:`~storage_scheduler.store.leases`: what live clusters hold, so that nobody else
  deletes it.
"""

from __future__ import annotations

from storage_scheduler.store._errors import classify, is_outage
from storage_scheduler.store._store import (
    LATENCY_BUCKETS,
    THREAD_PREFIX,
    LatencyHistogram,
    Store,
    StoreCounters,
)

__all__ = [
    "LATENCY_BUCKETS",
    "THREAD_PREFIX",
    "LatencyHistogram",
    "Store",
    "StoreCounters",
    "classify",
    "is_outage",
]
