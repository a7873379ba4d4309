"""The ``scale`` workload: is the scheduler, not the tasks, the limit?

16 workers of one thread each (``dask worker --nworkers 16``) run a pairwise tree over
25,000 leaves that sleep 1 ms (~50,000 tasks): the tasks cost no CPU, so the scheduler's
own work per task decides how fast it goes. The scheduler runs in its own process
(``dask scheduler``), so its CPU time is measured alone (``psutil``, all its threads:
the event loop and the threads it offloads to).

Reported per mode: scheduler CPU seconds per task, and the scheduler's resident memory
with the leaves' results held (persisted) against before the graph arrived, per held
key. The suite compares both with stock (``storage / stock``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from dask import delayed
from distributed import Client, wait

from benchmarks.common import _traffic


def nap(i: int, seconds: float, token: str) -> int:
    time.sleep(seconds)
    return i


def plus(a: int, b: int) -> int:
    return a + b


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)


def _stored_keys(dask_scheduler: Any) -> int:
    plugin = dask_scheduler.plugins.get("storage-scheduler")
    return len(plugin.catalog) if plugin is not None else 0


@contextmanager
def processes(
    workers: int, store: str | None, work: Path
) -> Iterator[tuple[Client, psutil.Process]]:
    """A ``dask scheduler`` and ``dask worker --nworkers`` as separate processes."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    bin_dir = Path(sys.executable).parent
    scheduler_file = work / "scheduler.json"
    scheduler_cmd = [
        str(bin_dir / "dask"),
        "scheduler",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--no-dashboard",
        "--scheduler-file",
        str(scheduler_file),
    ]
    worker_cmd = [
        str(bin_dir / "dask"),
        "worker",
        "--scheduler-file",
        str(scheduler_file),
        "--nworkers",
        str(workers),
        "--nthreads",
        "1",
        "--memory-limit",
        "1GiB",
        "--no-dashboard",
        "--local-directory",
        str(work / "workers"),
    ]
    if store is not None:
        scheduler_cmd += ["--preload", "storage_scheduler", "--storage-url", store]
        worker_cmd += ["--preload", "storage_scheduler"]
    log = open(work / "cluster.log", "wb")
    procs = [subprocess.Popen(scheduler_cmd, env=env, stdout=log, stderr=log)]
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists():
            if time.monotonic() > deadline or procs[0].poll() is not None:
                raise RuntimeError(f"the scheduler did not start; see {work / 'cluster.log'}")
            time.sleep(0.1)
        procs.append(subprocess.Popen(worker_cmd, env=env, stdout=log, stderr=log))
        with Client(scheduler_file=str(scheduler_file), timeout=60) as client:
            client.wait_for_workers(workers, timeout=180)
            yield client, psutil.Process(procs[0].pid)
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in reversed(procs):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


def scale(mode: str, store: str, params: dict[str, Any]) -> dict[str, Any]:
    leaves, seconds, workers = params["leaves"], params["task_seconds"], params["workers"]
    token = uuid.uuid4().hex
    naps = [delayed(nap)(i, seconds, token) for i in range(leaves)]
    layer = naps
    while len(layer) > 1:
        layer = [delayed(plus)(*layer[i : i + 2]) for i in range(0, len(layer) - 1, 2)] + (
            [layer[-1]] if len(layer) % 2 else []
        )
    tasks = 2 * leaves - 1
    with (
        tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp,
        processes(workers, store if mode == "storage" else None, Path(tmp)) as (client, sched),
    ):
        rss_before = client.run_on_scheduler(_rss)
        cpu_before = sum(sched.cpu_times()[:2])
        start = time.perf_counter()
        # The leaves are asked for too: their results stay held, as persisted data.
        futures = client.compute([*naps, layer[0]])
        wait(futures)
        wall = time.perf_counter() - start
        cpu = sum(sched.cpu_times()[:2]) - cpu_before
        got = futures[-1].result()
        rss_held = client.run_on_scheduler(_rss)
        stored = client.run_on_scheduler(_stored_keys)
        traffic = [
            t for t in client.run(_traffic, on_error="ignore").values() if isinstance(t, dict)
        ]
        del futures
    return {
        "correct": got == leaves * (leaves - 1) // 2,
        "wall_seconds": wall,
        "tasks": tasks,
        "scheduler_cpu_seconds": cpu,
        "scheduler_cpu_per_task_us": cpu / tasks * 1e6,
        "held_keys": leaves + 1,
        "stored_keys": stored,
        "scheduler_rss_growth": rss_held - rss_before,
        "scheduler_bytes_per_held_key": (rss_held - rss_before) / (leaves + 1),
        **{
            k: sum(t[k] for t in traffic)
            for k in ("peer_bytes", "store_bytes_written", "store_bytes_read")
        },
        "peak_rss": [],
    }
