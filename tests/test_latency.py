"""Store traffic at latency (#18): writes bounded by a memory budget, write-behind.

Slow stores come from ``faulty://`` (a real filesystem whose every call takes
``latency`` longer) or from S3 behind the latency proxy.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dask import delayed
from distributed import wait
from distributed.utils_test import gen_cluster, inc

from storage_scheduler.scheduler import landed
from storage_scheduler.worker.writer import WriteBudget
from tests.faulty_fs import FaultyFileSystem
from tests.utils import async_poll_until, enable_storage, lane_keys

FAULTS = FaultyFileSystem.faults
KiB = 2**10


def blob(i: int, nbytes: int) -> Any:
    return np.random.default_rng(i).random(nbytes // 8)


def total(*xs: Any) -> float:
    return float(sum(x.sum() for x in xs))


# ------------------------------------------------------------------ the budget alone


@pytest.mark.asyncio
async def test_budget_bounds_bytes_and_count() -> None:
    budget = WriteBudget(max_bytes=100, max_count=3)
    assert budget.take(60) and not budget.take(50)  # 110 bytes: no room
    assert budget.take(40) and not budget.take(1)  # full
    budget.give(60)
    assert budget.take(10) and budget.take(10)
    assert (budget.count, budget.bytes) == (3, 60)
    assert not budget.take(1)  # three results: the count is full
    for n in (40, 10, 10):
        budget.give(n)
    assert budget.take(1000)  # alone, a result larger than the budget goes in


@pytest.mark.asyncio
async def test_budget_waits_for_room() -> None:
    budget = WriteBudget(max_bytes=100, max_count=10)
    budget.take(80)
    waiter = asyncio.ensure_future(budget.wait_take(50))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    budget.give(80)
    await asyncio.wait_for(waiter, 1)
    assert (budget.count, budget.bytes) == (1, 50)


# ------------------------------------------------------------------ on a cluster


async def peak_writes(worker: Any, until: asyncio.Future[Any]) -> tuple[int, int]:
    """The most writes in flight on ``worker``, and the most bytes awaiting upload."""
    plugin = worker.plugins["storage-scheduler"]
    count = nbytes = 0
    while not until.done():
        count = max(count, plugin.store.counters.writes_in_flight)
        nbytes = max(nbytes, plugin.writer.budget.bytes)
        await asyncio.sleep(0.005)
    return count, nbytes


@pytest.mark.parametrize("durability", ["write-through", "write-behind"])
def test_writes_in_flight_bounded_by_bytes(tmp_path: Path, durability: str) -> None:
    """One thread, a slow store: several writes run at once (not one per thread), and
    never more bytes than ``write-buffer``."""
    config = {
        "storage-scheduler.write-buffer": "100KiB",
        "storage-scheduler.durability": durability,
    }

    @gen_cluster(client=True, nthreads=[("", 1)], config=config)
    async def run(c: Any, s: Any, a: Any) -> None:
        await enable_storage(s, f"faulty://{tmp_path}/store")
        FAULTS.latency = 0.2
        try:
            # 64 KiB results: the budget holds one of them, or up to three 32 KiB ones.
            big = c.map(blob, range(4), nbytes=64 * KiB, key=[f"big-{i}" for i in range(4)])
            small = c.map(blob, range(12), nbytes=32 * KiB, key=[f"small-{i}" for i in range(12)])
            done = asyncio.ensure_future(wait(big + small))
            count, nbytes = await peak_writes(a, done)
            await done
            await async_poll_until(
                lambda: not a.plugins["storage-scheduler"].writer.budget.count, what="writes"
            )
        finally:
            FAULTS.latency = 0.0
        assert 2 <= count <= 3, count
        assert nbytes <= 100 * KiB, nbytes
        assert lane_keys(await c.who_has(big + small)) == {f.key for f in big + small}

    run()


@gen_cluster(
    client=True,
    nthreads=[("", 1), ("", 1)],
    config={"storage-scheduler.durability": "write-behind"},
)
async def test_write_behind_reports_before_the_write(c: Any, s: Any, a: Any, b: Any) -> None:
    """A slow store does not hold the computation back: results are reported, served by
    their worker, and the lanes hold them once the writes land."""
    plugin = await enable_storage(s, f"faulty://{tempfile.mkdtemp()}/store")
    FAULTS.latency = 0.5
    try:
        x = c.submit(inc, 1, key="x", workers=[a.address])
        y = c.submit(inc, x, key="y", workers=[b.address])
        start = time.monotonic()
        assert await y == 3
        assert time.monotonic() - start < 0.5  # not a single write waited for
        assert lane_keys(await c.who_has([x, y])) == set()
        await async_poll_until(lambda: plugin.lanes.nkeys == 2, what="both writes", timeout=10)
    finally:
        FAULTS.latency = 0.0
    assert lane_keys(await c.who_has([x, y])) == {"x", "y"}
    assert plugin.catalog.get("x", plugin.lanes.tokens["x"]) is not None


@gen_cluster(
    client=True,
    nthreads=[("", 1)],
    config={
        "storage-scheduler.durability": "write-behind",
        "storage-scheduler.flush-interval": "50ms",
    },
)
async def test_write_behind_late_for_a_released_key(c: Any, s: Any, a: Any) -> None:
    """A write that lands after its key was released adds no lane replica; the
    intermediate it stored is deleted as any other."""
    plugin = await enable_storage(s, f"faulty://{tempfile.mkdtemp()}/store")
    FAULTS.latency = 0.5
    try:
        graph = delayed(inc)(delayed(inc)(1, dask_key_name="inner"), dask_key_name="outer")
        outer = c.compute(graph)
        assert await outer == 3
        # "inner" was consumed and released before its write landed.
        assert s.tasks["inner"].state == "released"
        await async_poll_until(lambda: plugin.counters.stored == 2, what="writes", timeout=10)
    finally:
        FAULTS.latency = 0.0
    assert "inner" not in plugin.lanes.tokens
    await async_poll_until(
        lambda: plugin.retention.deleted_total == 1, what="the intermediate deleted"
    )
    assert [e.kept for e in plugin.catalog.versions("outer")] == [True]
    assert lane_keys(await c.who_has([outer])) == {"outer"}
    assert not plugin.catalog.versions("inner")


@gen_cluster(
    client=True, nthreads=[("", 1)], config={"storage-scheduler.durability": "write-behind"}
)
async def test_write_behind_stale_run_adds_no_replica(c: Any, s: Any, a: Any) -> None:
    """A notification of another run of the key than the one the scheduler holds (the
    key was recomputed meanwhile) adds no lane replica."""
    plugin = await enable_storage(s, f"memory://{uuid.uuid4().hex}")
    x = c.submit(inc, 1, key="x")
    assert await x == 2
    await async_poll_until(lambda: plugin.lanes.nkeys == 1, what="x stored")
    ts = s.tasks["x"]
    stored = {"nbytes": 10, "token": "another", "created": time.time()}
    plugin.lanes.drop(ts)
    landed.handle_stored(plugin, "x", ts.run_id - 1, stored, worker=a.address)
    assert not plugin.lanes.holds(ts)
    landed.handle_stored(plugin, "x", ts.run_id, stored, worker=a.address)
    assert plugin.lanes.holds(ts) and plugin.lanes.tokens["x"] == "another"


def gather_inputs(*xs: Any) -> float:
    return float(sum(x.sum() for x in xs))


@gen_cluster(
    client=True,
    nthreads=[("", 1), ("", 1)],
    config={"storage-scheduler.durability": "write-through"},  # stored once reported
)
async def test_inputs_of_a_task_are_read_together(c: Any, s: Any, a: Any, b: Any) -> None:
    """A task's inputs in the store are fetched at once (one batch per lane, lanes in
    parallel, the keys of a batch read concurrently): one store latency, not one per
    input."""
    await enable_storage(s, f"faulty://{tempfile.mkdtemp()}/store")
    inputs = c.map(blob, range(8), nbytes=8 * KiB, key=[f"in-{i}" for i in range(8)],
                   workers=[a.address])  # fmt: skip
    await wait(inputs)
    assert lane_keys(await c.who_has(inputs)) == {f.key for f in inputs}
    # The faulty filesystem's calls run in the loop's default thread pool (cpus + 4
    # threads), which this one-process cluster's catalog and lease writes share, as slow:
    # room for 8 reads at once, so that only the comm can serialize them.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(32))
    FAULTS.reset()
    FAULTS.latency = 1.0
    try:
        start = time.monotonic()
        out = c.submit(gather_inputs, *inputs, key="out", workers=[b.address])
        expected = sum(float(blob(i, 8 * KiB).sum()) for i in range(8))
        assert await out == pytest.approx(expected)
        elapsed = time.monotonic() - start
    finally:
        FAULTS.latency = 0.0
    assert FAULTS.calls["read"] >= 8  # from the store, not from worker a
    # At once: 3 s, the inputs read together, then out written through and gathered back
    # from the store. One after the other: 8 s for the inputs alone.
    assert elapsed < 5.0, elapsed
