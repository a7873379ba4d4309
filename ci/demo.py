"""The main job: a real cluster whose results live in a local-directory store.

1. ``dask scheduler --preload storage_scheduler --storage-url <dir>`` and two
   ``dask worker`` processes (no nanny: a killed worker stays dead);
2. a dask.array workload of a few GiB whose tasks exchange data between workers;
3. one worker is killed with SIGKILL when about half of the tasks have finished;
   a fresh worker joins, and the computation finishes;
4. the result is checked against the same computation on a local thread pool, and a
   report says how many tasks ran, how many were recomputed, and how many bytes went
   to and from the store and between workers;
5. the whole cluster is shut down, a new one is started on the same store, and the same
   code runs again: the stored result is reused, no task of the workload runs.

Run it with ``ci/demo.sh [--size-gib 1.5] [--keep-store]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

import dask
import dask.array as da
from dask.utils import format_bytes
from distributed import Client
from distributed.diagnostics.plugin import SchedulerPlugin

from tests.cluster_cli import CommandLineCluster

ROOT = Path(__file__).resolve().parents[1]


class ExecutionCounter(SchedulerPlugin):
    """Counts, per key, how often a task finished: independently of storage_scheduler."""

    name = "demo-execution-counter"

    def __init__(self) -> None:
        self.finished: Counter[str] = Counter()
        self.loaded = 0
        self.scheduler: Any = None

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if start == "processing" and finish == "memory":
            ts = self.scheduler.tasks.get(key)
            func = getattr(getattr(ts, "run_spec", None), "func", None)
            if getattr(func, "__name__", "") == "load_stored":
                self.loaded += 1  # a stored result read back, not a task of the workload
            elif not str(key).startswith("finalize-"):  # Client.compute's own wrapper
                self.finished[str(key)] += 1


def worker_sample(dask_worker: Any) -> dict[str, Any]:
    """Store and transfer figures of one worker (run on the worker)."""
    plugin = dask_worker.plugins.get("storage-scheduler")
    counters = plugin.store.counters if plugin is not None and plugin.store else None
    from storage_scheduler._protocol import is_lane

    log = list(dask_worker.transfer_incoming_log)
    return {
        "bytes_written": counters.bytes_written if counters else 0,
        "bytes_read": counters.bytes_read if counters else 0,
        "from_store": sum(e["total"] for e in log if is_lane(e["who"])),
        "from_peers": sum(e["total"] for e in log if not is_lane(e["who"])),
    }


class Sampler(threading.Thread):
    """Polls the workers, keeping the last figures of a worker after it dies."""

    def __init__(self, client: Client):
        super().__init__(daemon=True)
        self.client = client
        self.last: dict[str, dict[str, Any]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.3):
            try:
                self.last.update(self.client.run(worker_sample, on_error="ignore"))
            except Exception:
                pass

    def total(self, field: str) -> int:
        return sum(s[field] for s in self.last.values())


def workload(size_gib: float) -> da.Array:
    n = int((size_gib * 2**30 / 8) ** 0.5) // 2000 * 2000
    x = da.random.default_rng(42).random((n, n), chunks=(2000, 2000))
    y = (x + x.T) * 0.5  # the transpose pairs up blocks that live on different workers
    return (y - y.mean(axis=0)).std(axis=0)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="storage_scheduler demo")
    parser.add_argument("--size-gib", type=float, default=1.5, help="size of the input array")
    parser.add_argument("--keep-store", action="store_true", help="keep the store afterwards")
    args = parser.parse_args(argv)

    work = ROOT / ".demo"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    store_dir = work / "store"
    result = workload(args.size_gib)
    ntasks = len(dask.optimize(result)[0].__dask_graph__())  # what the scheduler will run
    print(f"storage_scheduler demo: {ntasks} tasks over a {args.size_gib:g} GiB array")
    print(f"  store    : {store_dir}")
    print(
        f"  cluster  : dask scheduler --preload storage_scheduler + 2 dask worker (log: {work / 'cluster.log'})"
    )

    with CommandLineCluster(work, f"file://{store_dir}", n_workers=2, nthreads=1) as cluster:
        with Client(scheduler_file=str(cluster.scheduler_file)) as client:
            client.wait_for_workers(2, timeout=60)
            client.register_plugin(ExecutionCounter())
            sampler = Sampler(client)
            sampler.start()

            t0 = time.perf_counter()
            future = client.compute(result)
            while True:  # wait for about half of the tasks
                done = client.run_on_scheduler(
                    lambda dask_scheduler: sum(
                        dask_scheduler.plugins["demo-execution-counter"].finished.values()
                    )
                )
                if done >= ntasks // 2 or future.done():
                    break
                time.sleep(0.1)
            victim = next(
                addr
                for addr, w in client.scheduler_info()["workers"].items()
                if w["name"] == "worker-0"
            )
            sampler.last.update(client.run(worker_sample, workers=[victim]))
            pid = client.run(os.getpid, workers=[victim])[victim]
            os.kill(pid, signal.SIGKILL)
            print(f"  killed   : worker-0 (pid {pid}) with SIGKILL after {done} of {ntasks} tasks")
            cluster.start_worker("worker-2")

            value = future.result()
            elapsed = time.perf_counter() - t0
            sampler.stop.set()
            sampler.join()
            sampler.last.update(client.run(worker_sample))
            finished = client.run_on_scheduler(
                lambda dask_scheduler: dict(
                    dask_scheduler.plugins["demo-execution-counter"].finished
                )
            )

    with dask.config.set(scheduler="threads"):
        expected = result.compute()
    correct = bool(np.allclose(value, expected))
    recomputed = sum(n - 1 for n in finished.values() if n > 1)

    print()
    print(
        f"  result correct        : {'yes' if correct else 'NO'} (checked against a local thread pool)"
    )
    print(f"  wall time             : {elapsed:.1f} s")
    print(f"  tasks executed        : {sum(finished.values())} (graph: {ntasks} tasks)")
    print(f"  tasks recomputed      : {recomputed}")
    print(f"  bytes written to store: {format_bytes(sampler.total('bytes_written'))}")
    print(f"  bytes read from store : {format_bytes(sampler.total('from_store'))}")
    print(f"  bytes peer-to-peer    : {format_bytes(sampler.total('from_peers'))}")
    print(
        f"  left in the store     : {_store_summary(store_dir)} (intermediates are deleted once done)"
    )

    print()
    print("Restart: the whole cluster is shut down; a new one runs the same code on the same store")
    with CommandLineCluster(
        work / "second", f"file://{store_dir}", n_workers=2, nthreads=1
    ) as cluster:
        with Client(scheduler_file=str(cluster.scheduler_file)) as client:
            client.wait_for_workers(2, timeout=60)
            client.register_plugin(ExecutionCounter())
            t0 = time.perf_counter()
            again = client.compute(workload(args.size_gib)).result()
            rerun = time.perf_counter() - t0
            counts = client.run_on_scheduler(
                lambda dask_scheduler: (
                    sum(dask_scheduler.plugins["demo-execution-counter"].finished.values()),
                    dask_scheduler.plugins["demo-execution-counter"].loaded,
                )
            )
    same = bool(np.array_equal(again, value))
    print(f"  result identical      : {'yes' if same else 'NO'}")
    print(f"  wall time             : {rerun:.1f} s (first run: {elapsed:.1f} s)")
    print(
        f"  tasks executed        : {counts[0]} (plus dask's finalize step, which assembles the result)"
    )

    if not args.keep_store:
        shutil.rmtree(work, ignore_errors=True)
    ok = correct and recomputed == 0 and same and counts[0] == 0
    return 0 if ok else 1


def _store_summary(store_dir: Path) -> str:
    objects = [p for p in (store_dir / "objects").rglob("*") if p.is_file()]
    return f"{len(objects)} objects, {format_bytes(sum(p.stat().st_size for p in objects))}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
