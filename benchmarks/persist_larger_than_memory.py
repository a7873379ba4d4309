"""Persist, then reduce, an array about three times larger than the cluster's memory.

Stock Dask and storage_scheduler run the same workload on the same kind of cluster, one
after the other, in this process tree: a ``LocalCluster`` of 2 workers (processes with
nannies, one thread each) with ``--memory-limit`` each. Reported per run: whether it
completed, wall time, worker restarts and pauses, peak RSS of each worker, bytes spilled
to local disk; and the ratio of wall times::

    python benchmarks/persist_larger_than_memory.py [--size-gib 12] [--memory-limit 2GiB]
        [--json results.jsonl]

storage_scheduler runs with ``memory-relief: always``: persisted chunks live in the store
(a local directory), workers keep only what running tasks need.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from typing import Any

import dask
import dask.array as da
import distributed
import psutil
from dask.utils import format_bytes, parse_bytes
from distributed import Client, LocalCluster, wait


class Sampler(threading.Thread):
    """Peak RSS of every worker process, sampled every 100 ms."""

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


def workload(size_gib: float) -> da.Array:
    side = int((size_gib * 2**30 / 8) ** 0.5)
    chunk = 4096  # 128 MiB chunks
    side = max(chunk, side // chunk * chunk)
    return da.random.default_rng(0).random((side, side), chunks=(chunk, chunk)) + 1


def run(mode: str, size_gib: float, memory_limit: str, store_dir: str, timeout: float) -> dict[str, Any]:
    scheduler_kwargs: dict[str, Any] = {}
    config: dict[str, Any] = {"distributed.scheduler.active-memory-manager.interval": "200ms"}
    if mode == "storage":
        scheduler_kwargs = {
            "preload": ["storage_scheduler"],
            "preload_argv": ["--storage-url", f"file://{store_dir}"],
        }
        config["storage-scheduler.memory-relief"] = "always"
    x = workload(size_gib)
    out: dict[str, Any] = {
        "benchmark": "persist_larger_than_memory",
        "mode": mode,
        "array_bytes": int(x.nbytes),
        "workers": 2,
        "memory_limit": parse_bytes(memory_limit),
    }
    with dask.config.set(config), LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        memory_limit=memory_limit,
        processes=True,
        dashboard_address=":0",
        scheduler_kwargs=scheduler_kwargs,
    ) as cluster, Client(cluster) as client:
        sampler = Sampler(client)
        sampler.start()
        start = time.perf_counter()
        try:
            y = x.persist()
            wait(y, timeout=timeout)
            persisted = time.perf_counter()
            total = float(y.sum().compute(timeout=timeout))
            out.update(completed=True, sum=total)
            out["persist_seconds"] = persisted - start
        except Exception as e:  # a run that fails is a result too
            out.update(completed=False, error=f"{type(e).__name__}: {e}"[:300])
        out["wall_seconds"] = time.perf_counter() - start
        sampler.stop.set()
        sampler.join()
        events = cluster.scheduler.get_events("all")
        statuses = [msg for _, msg in events if isinstance(msg, dict) and msg.get("action") == "worker-status-change"]
        out["pauses"] = sum(1 for m in statuses if m.get("status") == "paused")
        out["worker_restarts"] = sum(
            1 for _, msg in events if isinstance(msg, dict) and msg.get("action") == "remove-worker"
        )
        spilled = client.run(
            lambda dask_worker: getattr(dask_worker.data, "spilled_total", (0, 0))[1], on_error="ignore"
        )
        out["spilled_bytes"] = int(sum(v for v in spilled.values() if isinstance(v, int)))
        out["peak_rss"] = sorted(sampler.peaks.values())
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gib", type=float, default=12)
    parser.add_argument("--memory-limit", default="2GiB")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--json", help="append results as JSON lines to this file")
    args = parser.parse_args(argv)

    rows = []
    for mode in ["stock", "storage"]:
        store_dir = tempfile.mkdtemp(prefix="persist-bench-")
        try:
            row = run(mode, args.size_gib, args.memory_limit, store_dir, args.timeout)
        finally:
            shutil.rmtree(store_dir, ignore_errors=True)
        row.update(
            python=platform.python_version(),
            dask=dask.__version__,
            distributed=distributed.__version__,
            machine=f"{platform.machine()} {os.cpu_count()} cpus",
        )
        rows.append(row)
        print(
            f"{mode:>8}: {'completed' if row['completed'] else 'FAILED'} in {row['wall_seconds']:.1f} s, "
            f"restarts {row['worker_restarts']}, pauses {row['pauses']}, "
            f"peak RSS {', '.join(format_bytes(r) for r in row['peak_rss'])} "
            f"(limit {args.memory_limit}), spilled {format_bytes(row['spilled_bytes'])}"
            + ("" if row["completed"] else f" — {row['error']}"),
            flush=True,
        )
    stock, storage = rows
    if stock["completed"] and storage["completed"]:
        assert abs(stock["sum"] - storage["sum"]) <= 1e-6 * abs(stock["sum"]), "results differ"
        print(f"wall time storage/stock: {storage['wall_seconds'] / stock['wall_seconds']:.2f}")
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
