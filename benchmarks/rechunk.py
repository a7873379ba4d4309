"""Rechunk a large array from tall-skinny to short-fat chunks and write it to zarr.

The rechunk that runs clusters out of memory (see the seed essay): every output chunk
needs a piece of every input chunk. Three runs on the same kind of cluster (2 workers,
processes with nannies, one thread each, ``--memory-limit`` each), one after the other:

* stock Dask, ``rechunk(method="tasks")``;
* stock Dask, ``rechunk(method="p2p")`` (distributed's shuffle service);
* storage_scheduler with its default settings (``memory-relief: pressure``: workers drop
  stored results from RAM instead of spilling them) and a local directory store, with
  ``method="tasks"`` (``storage-tasks``: every intermediate lives in the store, not in
  worker RAM) and with ``method="p2p"`` (``storage-p2p``: the shuffle service moves the
  pieces, the store holds the rechunked chunks).

Reported per run: completed, wall time, worker restarts and pauses, peak RSS per worker,
bytes spilled; and the faster storage run's wall time against the faster stock method::

    python -m benchmarks.rechunk [--size-gib 16] [--memory-limit 2GiB] [--chunk-mib 128]
        [--json out.jsonl]

A reduced run keeps the pressure and the graph of the full one when all three shrink
together: ``--size-gib 2 --memory-limit 256MiB --chunk-mib 16`` is the 16 GiB run at 1/8.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import dask.array as da
from dask.utils import parse_bytes

from benchmarks.common import append_jsonl, bench_cluster, cluster_figures, environment, summary

METHODS = ["tasks", "p2p", "storage-tasks", "storage-p2p"]


def source(size_gib: float, chunk_mib: float = 128) -> da.Array:
    side = int((size_gib * 2**30 / 8) ** 0.5)
    narrow = max(1, int(chunk_mib * 2**20) // (8 * side))  # ~chunk_mib MiB chunks
    side = side // narrow * narrow
    return da.random.default_rng(0).random((side, side), chunks=(side, narrow))


def run(
    method: str,
    size_gib: float,
    memory_limit: str,
    work: str,
    timeout: float,
    chunk_mib: float = 128,
) -> dict[str, Any]:
    storage = method.startswith("storage")
    rechunk_method = method.removeprefix("storage-")
    x = source(size_gib, chunk_mib)
    narrow = x.chunks[1][0]
    target = os.path.join(work, f"{method}.zarr")
    out: dict[str, Any] = {
        "benchmark": "rechunk",
        "method": method,
        "rechunk_method": rechunk_method,
        "array_bytes": int(x.nbytes),
        "input_chunks": [x.shape[0], narrow],
        "output_chunks": [narrow, x.shape[1]],
        "workers": 2,
        "memory_limit": parse_bytes(memory_limit),
    }
    url = f"file://{work}/store" if storage else None
    with bench_cluster(memory_limit, url, relief=None) as (
        cluster,
        client,
        sampler,
    ):
        start = time.perf_counter()
        try:
            y = x.rechunk((narrow, x.shape[1]), method=rechunk_method)
            future = client.compute(y.to_zarr(target, compute=False))
            future.result(timeout=timeout)
            out["completed"] = True
        except Exception as e:
            out.update(completed=False, error=f"{type(e).__name__}: {e}"[:300])
        out["wall_seconds"] = time.perf_counter() - start
        out.update(cluster_figures(cluster, client, sampler))
    if out["completed"]:
        check = da.from_zarr(target)
        out["checked"] = bool(
            check.shape == x.shape
            and float(check[:: max(1, x.shape[0] // 7), 0].sum().compute()) > 0
        )
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gib", type=float, default=16)
    parser.add_argument("--memory-limit", default="2GiB")
    parser.add_argument("--chunk-mib", type=float, default=128, help="input chunk size")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--json", help="append results as JSON lines to this file")
    args = parser.parse_args(argv)

    rows = []
    for method in args.methods:
        work = tempfile.mkdtemp(prefix="rechunk-bench-")
        try:
            row = run(method, args.size_gib, args.memory_limit, work, args.timeout, args.chunk_mib)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        row.update(environment())
        rows.append(row)
        print(summary(method, row, args.memory_limit), flush=True)
    done = {r["method"]: r for r in rows if r["completed"]}
    stock = [done[m]["wall_seconds"] for m in ("tasks", "p2p") if m in done]
    for m in ("storage-tasks", "storage-p2p"):
        if m in done and stock:
            print(
                f"wall time {m} / faster stock method: {done[m]['wall_seconds'] / min(stock):.2f}"
            )
    append_jsonl(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
