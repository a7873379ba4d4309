"""Prometheus metrics of the store, on the scheduler's and the workers' ``/metrics``.

Dask serves ``/metrics`` from the process-global ``prometheus_client`` registry. One pull
collector per process reads, when scraped, the state of every storage plugin alive in the
process: scheduler figures are unlabelled, worker figures carry a ``worker`` label, so an
in-process cluster (one registry, several workers) reports each worker. The collector is
registered when the first plugin starts and unregistered when the last one stops; a
second registration would fail with "Duplicated timeseries".

Names follow ``<namespace>_storage_scheduler_<what>[_total|_bytes|_seconds]``, with Dask's
``distributed.dashboard.prometheus.namespace`` (``dask``). ``prometheus_client`` is
optional (the ``prometheus`` extra): without it nothing is registered.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

import dask.config

from storage_scheduler.store import LATENCY_BUCKETS, LatencyHistogram

__all__ = [
    "METRICS",
    "register_scheduler_plugin",
    "register_worker_plugin",
    "unregister_scheduler_plugin",
    "unregister_worker_plugin",
]

_scheduler_plugins: weakref.WeakSet[Any] = weakref.WeakSet()
_worker_plugins: weakref.WeakSet[Any] = weakref.WeakSet()
_collector: StorageCollector | None = None

#: Every metric: name (after the prefix), type, help text. The README lists these.
METRICS: dict[str, tuple[str, str]] = {
    "lane_keys": ("gauge", "Keys whose results the cluster holds in the store (storage lanes)"),
    "lane_bytes": ("gauge", "Size of the results the cluster holds in the store"),
    "catalog_keys": ("gauge", "Keys the store holds, per the catalog (all clusters sharing it)"),
    "catalog_bytes": ("gauge", "Bytes the store holds, per the catalog"),
    "results_stored_total": ("counter", "Task results written to the store and added as lane replicas"),
    "keys_reused_total": ("counter", "Keys taken from the store instead of being computed"),
    "unreadable_objects_total": ("counter", "Stored objects found missing or corrupt, and recomputed"),
    "objects_deleted_total": ("counter", "Stored objects deleted by the lifecycle policy"),
    "worker_written_bytes_total": ("counter", "Bytes this worker wrote to the store"),
    "worker_written_objects_total": ("counter", "Objects this worker wrote to the store"),
    "worker_read_bytes_total": ("counter", "Bytes (in memory) this worker took from the store"),
    "worker_write_seconds": ("histogram", "Time to serialize and write one result"),
    "worker_read_seconds": ("histogram", "Time to read, verify and deserialize one result"),
    "worker_write_failures_total": ("counter", "Results that could not be stored (kept in worker memory)"),
    "worker_peer_fallbacks_total": ("counter", "Results left to stock peer-to-peer Dask (not stored)"),
    "worker_uploads_in_flight": ("gauge", "Results being written to the store right now"),
    "worker_memory_bytes": ("gauge", "Worker RAM: type=results (held results), type=tasks (the rest of the process)"),
}


def _prefix() -> str:
    namespace = dask.config.get("distributed.dashboard.prometheus.namespace", "dask")
    return f"{namespace}_storage_scheduler_"


class StorageCollector:
    """Pull collector over the storage plugins alive in this process."""

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        prefix = _prefix()
        kinds = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily}

        def family(name: str, labels: list[str] | None = None) -> Any:
            kind, doc = METRICS[name]
            full = prefix + name
            if kind == "counter":
                full = full.removesuffix("_total")  # the client library appends it
            return kinds[kind](full, doc, labels=labels)

        schedulers = [p for p in _scheduler_plugins if hasattr(p, "catalog")]
        if schedulers:
            info = schedulers[-1].storage_info()
            for name, field in [
                ("lane_keys", "keys_in_lanes"),
                ("lane_bytes", "bytes_in_lanes"),
                ("catalog_keys", "catalog_keys"),
                ("catalog_bytes", "catalog_bytes"),
                ("results_stored_total", "stored_total"),
                ("keys_reused_total", "reused_total"),
                ("unreadable_objects_total", "unreadable_total"),
                ("objects_deleted_total", "deleted_total"),
            ]:
                metric = family(name)
                metric.add_metric([], info[field])
                yield metric

        workers = [p for p in _worker_plugins if p.store is not None and p._worker is not None]
        if not workers:
            return
        simple = {
            "worker_written_bytes_total": lambda p: p.store.counters.bytes_written,
            "worker_written_objects_total": lambda p: p.store.counters.objects_written,
            "worker_read_bytes_total": lambda p: p.bytes_read(),
            "worker_write_failures_total": lambda p: p.stats.write_failures,
            "worker_peer_fallbacks_total": lambda p: p.stats.not_stored,
            "worker_uploads_in_flight": lambda p: p.store.counters.writes_in_flight,
        }
        for name, read in simple.items():
            metric = family(name, ["worker"])
            for p in workers:
                metric.add_metric([p._worker.address], read(p))
            yield metric

        memory = family("worker_memory_bytes", ["worker", "type"])
        for p in workers:
            results, tasks = worker_memory(p._worker)
            memory.add_metric([p._worker.address, "results"], results)
            memory.add_metric([p._worker.address, "tasks"], tasks)
        yield memory

        for name, attr in [("worker_write_seconds", "write_seconds"), ("worker_read_seconds", "read_seconds")]:
            hist = HistogramMetricFamily(prefix + name, METRICS[name][1], labels=["worker"])
            for p in workers:
                h: LatencyHistogram = getattr(p.store.counters, attr)
                cumulative, buckets = 0, []
                for bound, count in zip(LATENCY_BUCKETS, h.counts):
                    cumulative += count
                    buckets.append(("+Inf" if bound == float("inf") else str(bound), cumulative))
                hist.add_metric([p._worker.address], buckets, sum_value=h.total)
            yield hist


def worker_memory(worker: Any) -> tuple[int, int]:
    """RAM held by results (managed memory) and the rest of the process (tasks, overhead)."""
    results = int(worker.state.nbytes)
    process = int(worker.monitor.get_process_memory())
    return results, max(0, process - results)


def _sync_registration() -> None:
    global _collector
    try:
        import prometheus_client
    except ImportError:
        return
    alive = len(_scheduler_plugins) + len(_worker_plugins)
    if alive and _collector is None:
        _collector = StorageCollector()
        prometheus_client.REGISTRY.register(_collector)
    elif not alive and _collector is not None:
        prometheus_client.REGISTRY.unregister(_collector)
        _collector = None


def register_scheduler_plugin(plugin: Any) -> None:
    _scheduler_plugins.add(plugin)
    _sync_registration()


def unregister_scheduler_plugin(plugin: Any) -> None:
    _scheduler_plugins.discard(plugin)
    _sync_registration()


def register_worker_plugin(plugin: Any) -> None:
    _worker_plugins.add(plugin)
    _sync_registration()


def unregister_worker_plugin(plugin: Any) -> None:
    _worker_plugins.discard(plugin)
    _sync_registration()
