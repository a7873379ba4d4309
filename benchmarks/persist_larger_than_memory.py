"""Persist, then reduce, an array about three times larger than the cluster's memory.

Stock Dask and storage_scheduler run the same workload on the same kind of cluster, one
after the other, in this process tree: a ``LocalCluster`` of 2 workers (processes with
nannies, one thread each) with ``--memory-limit`` each. Reported per run: whether it
completed, wall time, worker restarts and pauses, peak RSS of each worker, bytes spilled
to local disk; and the ratio of wall times::

    python -m benchmarks.persist_larger_than_memory [--size-gib 12] [--memory-limit 2GiB]
        [--json results.jsonl]

storage_scheduler runs with ``memory-relief: always``: persisted chunks live in the store
(a local directory), workers keep only what running tasks need.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from typing import Any

import dask.array as da
from dask.utils import parse_bytes
from distributed import wait

from benchmarks.common import append_jsonl, bench_cluster, cluster_figures, environment, summary


def workload(size_gib: float) -> da.Array:
    side = int((size_gib * 2**30 / 8) ** 0.5)
    chunk = 4096  # 128 MiB chunks
    side = max(chunk, side // chunk * chunk)
    return da.random.default_rng(0).random((side, side), chunks=(chunk, chunk)) + 1


def run(
    mode: str, size_gib: float, memory_limit: str, store_dir: str, timeout: float
) -> dict[str, Any]:
    x = workload(size_gib)
    out: dict[str, Any] = {
        "benchmark": "persist_larger_than_memory",
        "mode": mode,
        "array_bytes": int(x.nbytes),
        "workers": 2,
        "memory_limit": parse_bytes(memory_limit),
    }
    store_url = f"file://{store_dir}" if mode == "storage" else None
    with bench_cluster(memory_limit, store_url) as (cluster, client, sampler):
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
        out.update(cluster_figures(cluster, client, sampler))
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
        row.update(environment())
        rows.append(row)
        print(summary(mode, row, args.memory_limit), flush=True)
    stock, storage = rows
    if stock["completed"] and storage["completed"]:
        assert abs(stock["sum"] - storage["sum"]) <= 1e-6 * abs(stock["sum"]), "results differ"
        print(f"wall time storage/stock: {storage['wall_seconds'] / stock['wall_seconds']:.2f}")
    append_jsonl(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
