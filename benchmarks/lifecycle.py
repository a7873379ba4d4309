"""Event-loop cost of the lifecycle on a real scheduler: leases and reuse planning.

* lease: the lanes hold ``--held`` keys (1M); times the first lease (every key listed),
  an update after ``--new`` keys more (incremental), a renewal, and reading the lease
  as another cluster would (first read, then cached); then compacting a catalog of as
  many entries;
* reuse: a catalog of ``--stored`` entries (100k) whose tokens match a graph of that many
  leaves under one reduction; times ``update_graph`` until reuse is planned.

Each step reports its wall time and the longest event-loop stall, as distributed's own
monitor sees it (``tick-duration``, ticks every 20 ms) and as a 5 ms sleeper sees it::

    python -m benchmarks.lifecycle [--held 1000000] [--stored 100000] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import platform
import pstats
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import dask
import distributed
from distributed import Client, Scheduler
from distributed.utils_test import async_poll_for

from storage_scheduler import StorageSchedulerPlugin
from storage_scheduler.store.leases import LeaseReader

TICK = 0.02  # distributed.admin.tick.interval


class Stalls:
    """The longest event-loop stall while it runs: a sleeper's lateness, and the
    scheduler's own ``tick-duration`` (minus the tick interval)."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.sleeper = 0.0
        self.sleeper_cpu = 0.0
        self.gen2 = gc.get_stats()[2]["collections"]
        scheduler.digests_max["tick-duration"] = 0.0
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            start, cpu = time.perf_counter(), time.process_time()
            await asyncio.sleep(0.005)
            late = time.perf_counter() - start - 0.005
            self.sleeper = max(self.sleeper, late)
            # Only as long as this process ran meanwhile: on a shared machine the OS also
            # stops the whole process, which is no stall of the code measured.
            self.sleeper_cpu = max(self.sleeper_cpu, min(late, time.process_time() - cpu))

    async def stop(self) -> dict[str, float]:
        await asyncio.sleep(2 * TICK)  # a last tick after the step
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        tick = self.scheduler.digests_max["tick-duration"] - TICK
        gen2 = gc.get_stats()[2]["collections"] - self.gen2
        return {
            "stall_tick_s": max(tick, 0.0),
            "stall_sleeper_s": self.sleeper,
            "stall_sleeper_cpu_s": self.sleeper_cpu,
            "full_gcs": gen2,
        }


async def step(
    rows: list[dict[str, Any]], s: Scheduler, name: str, fn: Callable[[], Awaitable[Any]]
) -> None:
    await asyncio.sleep(3 * TICK)  # a tick after whatever ran before (setup) first
    stalls = Stalls(s)
    start = time.perf_counter()
    await fn()
    seconds = time.perf_counter() - start
    row = {"step": name, "seconds": seconds, **(await stalls.stop())}
    rows.append(row)
    print(
        f"{name:<34} {seconds:7.2f} s   longest stall: tick {row['stall_tick_s'] * 1000:5.0f} ms,"
        f" sleeper {row['stall_sleeper_s'] * 1000:5.0f} ms"
        f" ({row['stall_sleeper_cpu_s'] * 1000:4.0f} ms of CPU)   full GCs {row['full_gcs']}"
    )


async def leases(args: argparse.Namespace, url: str, rows: list[dict[str, Any]]) -> None:
    async with Scheduler(dashboard_address=":0") as s:
        plugin = StorageSchedulerPlugin(url)
        await s.register_scheduler_plugin(plugin, name=plugin.name, idempotent=False)
        retention = plugin.retention
        await retention.stop()  # the background rounds: steps are run by hand
        t0 = time.perf_counter()
        for i in range(args.held + args.new):
            ts = s.new_task(("leaf-0123456789abcdef", i), None, "memory")
            ts.set_nbytes(8)
            if i < args.held:
                plugin.lanes.add(ts, f"{i:032x}")
        print(f"({args.held:,} held keys set up in {time.perf_counter() - t0:.0f} s)")
        gc.collect()  # the setup's objects are old by now, as a scheduler's would be
        await step(rows, s, f"lease: first, {args.held:,} keys", retention.update_lease)
        for i in range(args.held, args.held + args.new):
            plugin.lanes.add(s.tasks[("leaf-0123456789abcdef", i)], "0" * 32)
        retention._lease_not_before = 0.0
        await step(rows, s, f"lease: update, {args.new:,} new keys", retention.update_lease)
        retention._lease_signature = (-1, -1)
        retention._lease_not_before = 0.0
        await step(rows, s, "lease: update, no change", retention.update_lease)
        await step(rows, s, "lease: renewal", retention.lease.renew)
        reader = LeaseReader()
        await step(rows, s, "lease: read by another cluster", lambda: reader.leased(plugin.store))
        await step(rows, s, "lease: read again (cached)", lambda: reader.leased(plugin.store))
        for i in range(args.held):
            plugin.catalog.add(("leaf-0123456789abcdef", i), f"{i:032x}", 8)
        await plugin.catalog.flush()
        gc.collect()
        await step(rows, s, f"catalog: compaction, {args.held:,} keys", plugin.catalog.compact)


def leaf(i: int) -> int:
    return i


def total(*xs: int) -> int:
    return sum(xs)


async def reuse(args: argparse.Namespace, url: str, rows: list[dict[str, Any]]) -> None:
    async with Scheduler(dashboard_address=":0") as s:
        plugin = StorageSchedulerPlugin(url)
        await s.register_scheduler_plugin(plugin, name=plugin.name, idempotent=False)
        async with Client(s.address, asynchronous=True) as c:
            leaves = [dask.delayed(leaf)(i, dask_key_name=("leaf", i)) for i in range(args.stored)]
            mids = [
                dask.delayed(total)(*leaves[j : j + 100], dask_key_name=("mid", j))
                for j in range(0, args.stored, 100)
            ]
            top = dask.delayed(total)(*mids, dask_key_name="top")
            # First submission (empty catalog: nothing planned) only to learn the tokens.
            future = c.compute(top)
            await async_poll_for(lambda: "top" in s.tasks, 60)
            memo: dict[Any, str] = {}
            tokens = {
                ("leaf", i): plugin.reuse.tokens.wanted(s.tasks[("leaf", i)], memo)
                for i in range(args.stored)
            }
            await c.cancel(future)
            await async_poll_for(lambda: not s.tasks, 60)
            for key, token in tokens.items():
                plugin.catalog.add(key, token, 8)

            timing: dict[str, float] = {}
            hook = plugin.reuse.on_update_graph
            profile = cProfile.Profile() if args.profile else None

            def timed(keys: Any) -> dict[Any, str | None]:
                gc_started: list[float] = []
                timing["gc"] = 0.0

                def gc_time(phase: str, info: dict[str, int]) -> None:
                    if phase == "start":
                        gc_started.append(time.perf_counter())
                    elif gc_started:
                        timing["gc"] += time.perf_counter() - gc_started.pop()

                gc.callbacks.append(gc_time)
                start, cpu = time.perf_counter(), time.thread_time()
                if profile is not None:
                    profile.enable()
                try:
                    return hook(keys)
                finally:
                    if profile is not None:
                        profile.disable()
                    timing["plan"] = time.perf_counter() - start
                    timing["cpu"] = time.thread_time() - cpu
                    gc.callbacks.remove(gc_time)

            plugin.reuse.on_update_graph = timed  # type: ignore[method-assign]
            futures = []

            async def submit() -> None:
                futures.append(c.compute(top))
                await async_poll_for(lambda: plugin.reuse.reused_total >= args.stored, 120)

            await step(rows, s, f"update_graph: {args.stored:,} stored keys", submit)
            rows[-1]["plugin_hook_s"] = timing["plan"]
            rows[-1]["plugin_hook_cpu_s"] = timing["cpu"]
            rows[-1]["plugin_hook_gc_s"] = timing["gc"]
            print(
                f"{'  of which the plugin hook':<34} {timing['plan']:7.2f} s"
                f"   ({timing['cpu']:.2f} s of CPU, garbage collection {timing['gc']:.2f} s)"
            )
            if profile is not None:
                pstats.Stats(profile).sort_stats("tottime").print_stats(25)
            await c.cancel(futures)


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--held", type=int, default=1_000_000)
    parser.add_argument("--new", type=int, default=1_000)
    parser.add_argument("--stored", type=int, default=100_000)
    parser.add_argument("--only", choices=["lease", "reuse"])
    parser.add_argument("--profile", action="store_true", help="cProfile the reuse hook")
    parser.add_argument("--json", help="append the results as JSON lines to this file")
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    tmp = tempfile.mkdtemp(prefix="lifecycle-bench-")
    try:
        if args.only != "reuse":
            await leases(args, f"{tmp}/lease-store", rows)
        if args.only != "lease":
            await reuse(args, f"{tmp}/reuse-store", rows)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        versions = {
            "python": platform.python_version(),
            "dask": dask.__version__,
            "distributed": distributed.__version__,
        }
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps({"benchmark": "lifecycle", **row, **versions}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
