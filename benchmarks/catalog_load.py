"""How long the scheduler takes to load a catalog of N stored keys from the manifest.

Writes a manifest of ``--entries`` keys (dask.array-style tuple keys, 32-character tokens)
as one compacted snapshot plus ``--segments`` incremental segments, into a local directory
(or ``--url``), then times ``Catalog.load`` in a fresh catalog::

    python benchmarks/catalog_load.py [--entries 1000000] [--segments 10] [--url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import sys
import tempfile
import time

import dask
import distributed

from storage_scheduler.store import Store
from storage_scheduler.store.catalog import Catalog, Entry


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--segments", type=int, default=10)
    parser.add_argument("--url", help="store URL (default: a temporary directory)")
    parser.add_argument("--json", help="append the result as a JSON line to this file")
    args = parser.parse_args(argv)

    tmp = None if args.url else tempfile.mkdtemp(prefix="catalog-bench-")
    store = Store.from_url(args.url or tmp)
    try:
        writer = Catalog(store)
        per_segment = max(1, args.entries // 100)
        bulk = args.entries - per_segment * args.segments
        now = time.time()
        writer._replace(
            {
                (f"array-{i // 10_000:08x}", i % 100, i // 100): Entry(f"{i:032x}", 8_000_000, now)
                for i in range(bulk)
            }
        )
        t0 = time.perf_counter()
        await writer.compact()
        for s in range(args.segments):
            for i in range(per_segment):
                writer.add(("late", s, i), f"{i:032x}", 1000)
            await writer.flush()
        t1 = time.perf_counter()

        reader = Catalog(store)
        t2 = time.perf_counter()
        await reader.load()
        t3 = time.perf_counter()
        assert len(reader) == args.entries, (len(reader), args.entries)
        row = {
            "benchmark": "catalog_load",
            "entries": args.entries,
            "segments": args.segments + 1,
            "write_seconds": t1 - t0,
            "load_seconds": t3 - t2,
            "python": platform.python_version(),
            "dask": dask.__version__,
            "distributed": distributed.__version__,
        }
        print(
            f"catalog of {args.entries:,} keys in {args.segments + 1} segments: "
            f"written in {t1 - t0:.2f} s, loaded in {t3 - t2:.2f} s"
        )
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    finally:
        store.close()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
