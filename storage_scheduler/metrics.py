"""Prometheus metrics of the store, on the scheduler's and the workers' ``/metrics``.

Dask serves ``/metrics`` from the process-global ``prometheus_client`` registry. One pull
collector per process reads, when scraped, the state of every storage plugin alive in the
process: scheduler figures are unlabelled, worker figures carry a ``worker`` label, so an
in-process cluster (one registry, several workers) reports each worker. The plugins are
found on the live servers (``server.plugins``), not kept here.

Names follow ``<namespace>_storage_scheduler_<what>[_total|_bytes|_seconds]``, with Dask's
``distributed.dashboard.prometheus.namespace`` (``dask``). ``prometheus_client`` is
optional (the ``prometheus`` extra): without it nothing is registered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import dask.config

from storage_scheduler import _compat
from storage_scheduler._protocol import PLUGIN_NAME, Heartbeat
from storage_scheduler.store import LATENCY_BUCKETS, LatencyHistogram, StoreCounters

if TYPE_CHECKING:
    from storage_scheduler.scheduler.plugin import StorageSchedulerPlugin
    from storage_scheduler.worker.plugin import StorageWorkerPlugin

__all__ = ["METRICS", "StorageCollector", "ensure_collector"]

#: Every metric: name (after the prefix), type, help text. The README lists these.
METRICS: dict[str, tuple[str, str]] = {
    "lane_keys": ("gauge", "Keys whose results the cluster holds in the store (storage lanes)"),
    "lane_bytes": ("gauge", "Size of the results the cluster holds in the store"),
    "catalog_keys": ("gauge", "Keys the store holds, per the catalog (all clusters sharing it)"),
    "catalog_bytes": ("gauge", "Bytes the store holds, per the catalog"),
    "results_stored_total": (
        "counter",
        "Task results written to the store and added as lane replicas",
    ),
    "keys_reused_total": ("counter", "Keys taken from the store instead of being computed"),
    "unreadable_objects_total": (
        "counter",
        "Stored objects found missing or corrupt, and recomputed",
    ),
    "objects_deleted_total": ("counter", "Stored objects deleted by the lifecycle policy"),
    "worker_written_bytes_total": ("counter", "Bytes this worker wrote to the store"),
    "worker_written_objects_total": ("counter", "Objects this worker wrote to the store"),
    "worker_read_bytes_total": ("counter", "Bytes (in memory) this worker took from the store"),
    "worker_write_seconds": ("histogram", "Time to serialize and write one result"),
    "worker_read_seconds": ("histogram", "Time to read, verify and deserialize one result"),
    "worker_write_failures_total": (
        "counter",
        "Results that could not be stored (kept in worker memory)",
    ),
    "worker_peer_fallbacks_total": (
        "counter",
        "Results left to stock peer-to-peer Dask (not stored)",
    ),
    "worker_untrusted_objects_total": (
        "counter",
        "Stored objects refused: not signed with the signing key (recomputed)",
    ),
    "worker_uploads_in_flight": ("gauge", "Results being written to the store right now"),
    "worker_not_stored_total": (
        "counter",
        "Results not stored, by reason: annotation, not-annotated, recomputable (the "
        "policy), side-effect (writers), write-failed, store-down",
    ),
    "worker_evicted_bytes_total": (
        "counter",
        "Bytes (in memory) of stored results dropped from RAM without a write",
    ),
    "worker_evicted_total": ("counter", "Stored results dropped from RAM without a write"),
    "worker_dropped_bytes": (
        "gauge",
        "Bytes (in memory) of the results the worker holds in the store only, now",
    ),
    "worker_read_back_total": ("counter", "Dropped results read back from the store"),
    "worker_lost_total": (
        "counter",
        "Dropped results the store could not serve (recomputed or read elsewhere)",
    ),
    "worker_spilled_bytes": ("gauge", "Bytes spilled to local disk now (unstored results)"),
    "worker_spill_written_bytes_total": ("counter", "Bytes written to the local spill directory"),
    "worker_memory_bytes": (
        "gauge",
        "Worker RAM: type=results (results in RAM, not those spilled or dropped), "
        "type=tasks (the rest of the process)",
    ),
}


def _prefix() -> str:
    namespace = dask.config.get("distributed.dashboard.prometheus.namespace", "dask")
    return f"{namespace}_storage_scheduler_"


class StorageCollector:
    """Pull collector over the storage plugins alive in this process.

    One per process, registered by the first plugin that starts and never unregistered
    (as distributed does with its own collectors): the process-global registry refuses a
    second one, and with no plugin alive it reports nothing.
    """

    registered: ClassVar[bool] = False

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

        schedulers, workers = _plugins()
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
                metric.add_metric([], info[field])  # type: ignore[literal-required]
                yield metric

        if not workers:
            return
        live = [(p.heartbeat(), p.worker, p.store) for p in workers if p.worker and p.store]
        simple: dict[str, Callable[[Heartbeat, StoreCounters], int]] = {
            "worker_written_bytes_total": lambda h, c: c.bytes_written,
            "worker_written_objects_total": lambda h, c: c.objects_written,
            "worker_read_bytes_total": lambda h, c: h["bytes_read"],
            "worker_write_failures_total": lambda h, c: h["write_failures"],
            "worker_peer_fallbacks_total": lambda h, c: h["not_stored"],
            "worker_uploads_in_flight": lambda h, c: c.writes_in_flight,
            "worker_untrusted_objects_total": lambda h, c: c.objects_untrusted,
            "worker_evicted_bytes_total": lambda h, c: h["evicted_bytes"],
            "worker_evicted_total": lambda h, c: h["evicted"],
            "worker_dropped_bytes": lambda h, c: h["dropped_bytes"],
            "worker_read_back_total": lambda h, c: h["read_back"],
            "worker_lost_total": lambda h, c: h["lost"],
            "worker_spilled_bytes": lambda h, c: h["spilled_bytes"],
            "worker_spill_written_bytes_total": lambda h, c: h["spill_written_bytes"],
        }
        for name, read in simple.items():
            metric = family(name, ["worker"])
            for beat, worker, store in live:
                metric.add_metric([worker.address], read(beat, store.counters))
            yield metric

        reasons = family("worker_not_stored_total", ["worker", "reason"])
        for beat, worker, _ in live:
            for reason, count in sorted(beat["not_stored_by_reason"].items()):
                reasons.add_metric([worker.address, reason], count)
        yield reasons

        memory = family("worker_memory_bytes", ["worker", "type"])
        for _, worker, _ in live:
            results, tasks = worker_memory(worker)
            memory.add_metric([worker.address, "results"], results)
            memory.add_metric([worker.address, "tasks"], tasks)
        yield memory

        for name, attr in [
            ("worker_write_seconds", "write_seconds"),
            ("worker_read_seconds", "read_seconds"),
        ]:
            hist = HistogramMetricFamily(prefix + name, METRICS[name][1], labels=["worker"])
            for _, worker, store in live:
                h: LatencyHistogram = getattr(store.counters, attr)
                cumulative, buckets = 0, []
                for bound, count in zip(LATENCY_BUCKETS, h.counts, strict=True):
                    cumulative += count
                    buckets.append(("+Inf" if bound == float("inf") else str(bound), cumulative))
                hist.add_metric([worker.address], buckets, sum_value=h.total)
            yield hist


def worker_memory(worker: Any) -> tuple[int, int]:
    """RAM held by results (managed memory) and the rest of the process (tasks, overhead).

    Results spilled to disk or dropped (held by the store only) are not in RAM."""
    try:
        out_of_ram = int(worker.data.spilled_total.memory)
    except AttributeError:  # no SpillBuffer
        out_of_ram = 0
    results = max(0, int(worker.state.nbytes) - out_of_ram)
    process = int(worker.monitor.get_process_memory())
    return results, max(0, process - results)


def _plugins() -> tuple[list[StorageSchedulerPlugin], list[StorageWorkerPlugin]]:
    """The started storage plugins of the servers alive in this process."""
    from storage_scheduler.scheduler.plugin import StorageSchedulerPlugin
    from storage_scheduler.worker.plugin import StorageWorkerPlugin

    schedulers, workers = _compat.live_servers()
    on_schedulers = [s.plugins.get(PLUGIN_NAME) for s in schedulers]
    on_workers = [w.plugins.get(PLUGIN_NAME) for w in workers]
    return (
        [p for p in on_schedulers if isinstance(p, StorageSchedulerPlugin) and p.started],
        [
            p
            for p in on_workers
            if isinstance(p, StorageWorkerPlugin) and p.worker is not None and p.store is not None
        ],
    )


def ensure_collector() -> None:
    """Register the process's collector, once (without ``prometheus_client``: nothing)."""
    if StorageCollector.registered:
        return
    try:
        import prometheus_client
    except ImportError:
        return
    prometheus_client.REGISTRY.register(StorageCollector())
    StorageCollector.registered = True
