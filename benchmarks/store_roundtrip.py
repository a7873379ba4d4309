"""Put+get throughput of the store on a local directory, against plain file I/O.

For each object size, the same bytes (a numpy array) are written and read back
``--repeat`` times by ``Store.put``/``Store.get`` and by a plain ``open().write()`` /
``open().read()`` in the same directory, alternating, and the medians compared::

    python benchmarks/store_roundtrip.py [--sizes 1KiB 1MiB 64MiB] [--repeat 9] [--json out.jsonl]

A ratio of 1.0 means the store is as fast as plain file I/O.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import fsspec
import numpy as np

import dask
import distributed
from dask.utils import format_bytes, parse_bytes

from storage_scheduler import Store


def plain_roundtrip(directory: str, i: int, data: np.ndarray) -> np.ndarray:
    path = os.path.join(directory, f"plain-{i}")
    with open(path, "wb") as f:
        f.write(data)
    with open(path, "rb") as f:
        out = np.frombuffer(f.read(), dtype=data.dtype)
    os.unlink(path)
    return out


async def store_roundtrip(store: Store, i: int, data: np.ndarray) -> np.ndarray:
    await store.put(("bench", i), data)
    out = await store.get(("bench", i))
    await store.delete([("bench", i)])
    return out  # type: ignore[no-any-return]


async def bench_size(directory: str, nbytes: int, repeat: int) -> dict[str, object]:
    data = np.random.default_rng(0).integers(0, 255, nbytes, dtype="u1")
    with dask.config.set({"storage-scheduler.compression": False}):
        store = Store.from_url(os.path.join(directory, "store"))
    await store_roundtrip(store, -1, data)  # warm up the thread pool and directories
    plain, stored = [], []
    for i in range(repeat):
        t0 = time.perf_counter()
        out = plain_roundtrip(directory, i, data)
        t1 = time.perf_counter()
        out2 = await store_roundtrip(store, i, data)
        t2 = time.perf_counter()
        assert np.array_equal(out, data) and np.array_equal(out2, data)
        plain.append(t1 - t0)
        stored.append(t2 - t1)
    store.close()
    p, s = statistics.median(plain), statistics.median(stored)
    return {
        "benchmark": "store_roundtrip",
        "backend": "file",
        "nbytes": nbytes,
        "repeat": repeat,
        "plain_seconds": p,
        "store_seconds": s,
        "plain_MBps": 2 * nbytes / p / 1e6,
        "store_MBps": 2 * nbytes / s / 1e6,
        "ratio": p / s,
        "python": platform.python_version(),
        "dask": dask.__version__,
        "distributed": distributed.__version__,
        "fsspec": fsspec.__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
    }


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["1KiB", "1MiB", "64MiB"])
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--json", help="append results as JSON lines to this file")
    parser.add_argument("--dir", help="directory to write in (default: a temporary one)")
    args = parser.parse_args(argv)

    directory = tempfile.mkdtemp(prefix="store-bench-", dir=args.dir)
    try:
        rows = [await bench_size(directory, parse_bytes(s), args.repeat) for s in args.sizes]
    finally:
        shutil.rmtree(directory, ignore_errors=True)

    print(f"{'size':>10} {'plain MB/s':>12} {'store MB/s':>12} {'store/plain':>12}")
    for r in rows:
        print(
            f"{format_bytes(int(r['nbytes'])):>10} {r['plain_MBps']:>12.0f} "  # type: ignore[call-overload]
            f"{r['store_MBps']:>12.0f} {r['ratio']:>12.2f}"
        )
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
