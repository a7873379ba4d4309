"""What the cluster benchmarks share: RSS sampling, cluster figures, output."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import threading
import time
from collections.abc import Iterator
from typing import Any

import psutil

import dask
import distributed
from dask.utils import format_bytes
from distributed import Client, LocalCluster


class Sampler(threading.Thread):
    """Peak RSS of every worker process, sampled every 100 ms (restarted ones included)."""

    def __init__(self, client: Client):
        super().__init__(daemon=True)
        self.client = client
        self.peaks: dict[str, int] = {}
        self.stop = threading.Event()
        self.pids: dict[str, int] = {}

    def run(self) -> None:
        last_refresh = 0.0
        while not self.stop.wait(0.1):
            if time.monotonic() - last_refresh > 1:
                try:
                    self.pids = self.client.run(os.getpid, on_error="ignore")
                except Exception:
                    pass
                last_refresh = time.monotonic()
            for name, pid in list(self.pids.items()):
                try:
                    rss = psutil.Process(pid).memory_info().rss
                except psutil.Error:
                    continue
                self.peaks[name] = max(self.peaks.get(name, 0), rss)


@contextlib.contextmanager
def bench_cluster(
    memory_limit: str | None,
    store_url: str | None,
    *,
    relief: str | None = "always",
    storage_options: dict[str, str] | None = None,
    signing_key: str | None = None,
) -> Iterator[tuple[LocalCluster, Client, Sampler]]:
    """2 workers (processes with nannies, one thread each), stock or with storage.

    With ``store_url``, storage_scheduler runs with ``memory-relief: relief`` (None: the
    default), and signs what it stores with ``signing_key`` if given. The active memory
    manager runs every 200 ms in both, so that the comparison is fair. ``memory_limit``
    None is Dask's default (the machine's memory, shared).
    """
    config: dict[str, Any] = {"distributed.scheduler.active-memory-manager.interval": "200ms"}
    scheduler_kwargs: dict[str, Any] = {}
    if store_url is not None:
        if relief is not None:
            config["storage-scheduler.memory-relief"] = relief
        if signing_key is not None:
            config["storage-scheduler.signing-key"] = signing_key
        argv = ["--storage-url", store_url]
        for key, value in (storage_options or {}).items():
            argv += ["--storage-option", f"{key}={value}"]
        scheduler_kwargs = {"preload": ["storage_scheduler"], "preload_argv": argv}
    with (
        dask.config.set(config),
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            memory_limit="auto" if memory_limit is None else memory_limit,
            processes=True,
            dashboard_address=":0",
            scheduler_kwargs=scheduler_kwargs,
        ) as cluster,
        Client(cluster) as client,
    ):
        sampler = Sampler(client)
        sampler.start()
        yield cluster, client, sampler


def _traffic(dask_worker: Any) -> dict[str, int]:
    plugin = dask_worker.plugins.get("storage-scheduler")
    figures = plugin.heartbeat() if plugin is not None else {}
    return {
        "peer_bytes": dask_worker.transfer_outgoing_bytes_total,
        "store_bytes_written": figures.get("bytes_written", 0),
        "store_bytes_read": figures.get("bytes_read", 0),
        "evicted_bytes": figures.get("evicted_bytes", 0),
    }


def cluster_figures(cluster: LocalCluster, client: Client, sampler: Sampler) -> dict[str, Any]:
    """Pauses, worker restarts, bytes spilled, moved and stored, peak RSS of a finished run.

    ``peer_bytes`` counts task inputs sent from worker to worker (what stock Dask moves;
    a P2P shuffle's own traffic is not in it); ``store_bytes_*`` what went through the store.
    """
    sampler.stop.set()
    sampler.join()
    events = [m for _, m in cluster.scheduler.get_events("all") if isinstance(m, dict)]
    spilled = client.run(
        lambda dask_worker: getattr(dask_worker.data, "spilled_total", (0, 0))[1], on_error="ignore"
    )
    # What went to the spill directory over the run (spilled_total is only what is left).
    spill_written = client.run(
        lambda dask_worker: int(
            getattr(dask_worker.data, "cumulative_metrics", {}).get(("disk-write", "bytes"), 0)
        ),
        on_error="ignore",
    )
    traffic = client.run(_traffic, on_error="ignore").values()
    return {
        **{
            k: int(sum(t[k] for t in traffic if isinstance(t, dict)))
            for k in ("peer_bytes", "store_bytes_written", "store_bytes_read")
        },
        "pauses": sum(
            1
            for m in events
            if m.get("action") == "worker-status-change" and m.get("status") == "paused"
        ),
        "worker_restarts": sum(1 for m in events if m.get("action") == "remove-worker"),
        "spilled_bytes": int(sum(v for v in spilled.values() if isinstance(v, int))),
        "spill_written_bytes": int(sum(v for v in spill_written.values() if isinstance(v, int))),
        "evicted_bytes": int(
            sum(t.get("evicted_bytes", 0) for t in traffic if isinstance(t, dict))
        ),
        "peak_rss": sorted(sampler.peaks.values()),
    }


def environment() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "dask": dask.__version__,
        "distributed": distributed.__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
    }


def summary(label: str, row: dict[str, Any], memory_limit: str) -> str:
    return (
        f"{label:>8}: {'completed' if row['completed'] else 'FAILED'} in {row['wall_seconds']:.1f} s, "
        f"restarts {row['worker_restarts']}, pauses {row['pauses']}, "
        f"peak RSS {', '.join(format_bytes(r) for r in row['peak_rss'])} "
        f"(limit {memory_limit}), spilled {format_bytes(row['spilled_bytes'])} "
        f"(written to disk {format_bytes(row.get('spill_written_bytes', 0))}), "
        f"dropped without a write {format_bytes(row.get('evicted_bytes', 0))}, "
        f"peer-to-peer {format_bytes(row['peer_bytes'])}, "
        f"store written/read {format_bytes(row['store_bytes_written'])}/{format_bytes(row['store_bytes_read'])}"
        + ("" if row["completed"] else f" — {row['error']}")
    )


def append_jsonl(path: str | None, rows: list[dict[str, Any]]) -> None:
    if path:
        with open(path, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
