"""What the cluster benchmarks share: RSS sampling, cluster figures, output."""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from typing import Any

import dask
import distributed
import psutil
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


def cluster_figures(cluster: LocalCluster, client: Client, sampler: Sampler) -> dict[str, Any]:
    """Pauses, worker restarts, bytes spilled to local disk and peak RSS of a finished run."""
    sampler.stop.set()
    sampler.join()
    events = [m for _, m in cluster.scheduler.get_events("all") if isinstance(m, dict)]
    spilled = client.run(
        lambda dask_worker: getattr(dask_worker.data, "spilled_total", (0, 0))[1], on_error="ignore"
    )
    return {
        "pauses": sum(
            1 for m in events if m.get("action") == "worker-status-change" and m.get("status") == "paused"
        ),
        "worker_restarts": sum(1 for m in events if m.get("action") == "remove-worker"),
        "spilled_bytes": int(sum(v for v in spilled.values() if isinstance(v, int))),
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
        f"(limit {memory_limit}), spilled {format_bytes(row['spilled_bytes'])}"
        + ("" if row["completed"] else f" — {row['error']}")
    )


def append_jsonl(path: str | None, rows: list[dict[str, Any]]) -> None:
    if path:
        with open(path, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
