"""A store that fails for a while loses nothing: outages are waited out, never taken for
missing objects (#14). Faults come from a real filesystem, ``faulty://`` (tests/faulty_fs.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import dask
from dask import delayed
from distributed.utils_test import async_poll_for, gen_test

from storage_scheduler import Store, StoreUnavailableError
from storage_scheduler.store import classify, is_outage
from tests.faulty_fs import FaultyFileSystem, os_error
from tests.utils import record_run, runs, storage_cluster

FAULTS = FaultyFileSystem.faults
#: Short backoff, so that tests see many retries in a short outage.
FAST = {
    "storage-scheduler.retry.delay-min": "20ms",
    "storage-scheduler.retry.delay-max": "200ms",
}


@pytest.fixture(autouse=True)
def no_faults() -> Iterator[None]:
    FAULTS.reset()
    yield
    FAULTS.reset()


@contextlib.contextmanager
def store_log() -> Iterator[list[str]]:
    """Messages the stores log (at WARNING and above)."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("storage_scheduler.store")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def faulty_store(tmp_path: Path, **config: Any) -> Store:
    with dask.config.set({**FAST, **config}):
        return Store.from_url(f"faulty://{tmp_path}/store")


async def loop_stalls(during: asyncio.Future[Any]) -> float:
    """The longest the event loop was blocked while ``during`` ran (seconds)."""
    worst, last = 0.0, time.monotonic()
    while not during.done():
        await asyncio.sleep(0.01)
        now = time.monotonic()
        worst, last = max(worst, now - last - 0.01), now
    return worst


# ------------------------------------------------------------------ the store alone


@pytest.mark.asyncio
async def test_outage_is_waited_out(tmp_path: Path) -> None:
    store = faulty_store(tmp_path)
    await store.put("k", 42)
    FAULTS.outage(1.0)
    start = time.monotonic()
    with store_log() as log:
        reads = asyncio.gather(*(store.get("k") for _ in range(5)))
        stall = await loop_stalls(reads)
        assert await reads == [42] * 5
    assert 1.0 <= time.monotonic() - start < 5
    assert stall < 0.1
    # Backoff doubles up to 200 ms: about 9 tries each in a 1 s outage, not a busy loop.
    assert 5 <= FAULTS.failed["read"] <= 5 * 12
    # Once per outage, not per read or attempt; and once when it ends.
    assert len(log) == 2, log
    assert "does not answer" in log[0] and "answers again" in log[1]
    store.close()


@pytest.mark.asyncio
async def test_outage_longer_than_the_window(tmp_path: Path) -> None:
    store = faulty_store(tmp_path, **{"storage-scheduler.retry.outage-window": "500ms"})
    await store.put("k", 42)
    FAULTS.outage(30)
    start = time.monotonic()
    with pytest.raises(StoreUnavailableError, match="outage-window") as info:
        await store.get("k")
    assert 0.5 <= time.monotonic() - start < 2
    assert classify(info.value) == "unavailable" and is_outage(info.value)
    FAULTS.reset()
    assert await store.get("k") == 42
    store.close()


@pytest.mark.asyncio
async def test_outage_read_can_be_cancelled(tmp_path: Path) -> None:
    store = faulty_store(tmp_path)
    await store.put("k", 42)
    FAULTS.outage(60)
    read = asyncio.create_task(store.get("k"))
    assert await loop_stalls(asyncio.ensure_future(asyncio.sleep(0.5))) < 0.1
    read.cancel()
    with pytest.raises(asyncio.CancelledError):
        await read
    await asyncio.sleep(0.1)  # a call already in a thread finishes there
    calls = FAULTS.calls["read"]
    await asyncio.sleep(0.5)
    assert FAULTS.calls["read"] == calls  # no retry after cancellation
    store.close()


@pytest.mark.asyncio
async def test_nth_call_fails(tmp_path: Path) -> None:
    store = faulty_store(tmp_path)
    await store.put("k", 42)
    FAULTS.fail_nth(1, "read", TimeoutError)
    with store_log() as log:
        assert await store.get("k") == 42
    assert FAULTS.calls["read"] == 2 and FAULTS.failed["read"] == 1
    assert log == []  # a blip the short retries absorb is no outage
    store.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
async def test_full_or_read_only_store_fails_writes_at_once(tmp_path: Path, code: int) -> None:
    store = faulty_store(tmp_path)
    FAULTS.fail_writes(code)
    with pytest.raises(OSError) as info:
        await store.put("k", 1)
    assert info.value.errno == code and FAULTS.calls["write"] == 1
    assert classify(info.value) == "unavailable" and not is_outage(info.value)
    store.close()


@pytest.mark.asyncio
async def test_writes_do_not_wait_for_the_store(tmp_path: Path) -> None:
    """A write gets the short retries only: the writer keeps results in memory instead."""
    store = faulty_store(tmp_path)
    FAULTS.outage(60, ops=["write"])
    start = time.monotonic()
    with pytest.raises(ConnectionResetError):
        await store.put("k", 1)
    assert time.monotonic() - start < 2 and FAULTS.calls["write"] == 4
    store.close()


@pytest.mark.asyncio
async def test_latency_and_outage_from_storage_options(tmp_path: Path) -> None:
    """Processes that do not share the class's faults get theirs from the URL's options."""
    now = time.time()
    with dask.config.set(FAST):
        store = Store.from_url(
            f"faulty://{tmp_path}/store", outage_between=[now, now + 1], latency=0.02
        )
    await store.put("k", 42)
    start = time.monotonic()
    read = asyncio.ensure_future(store.get("k"))
    assert await loop_stalls(read) < 0.1
    assert await read == 42 and time.monotonic() - start >= 0.5
    store.close()


@pytest.mark.asyncio
async def test_missing_and_damaged_are_not_outages(tmp_path: Path) -> None:
    store = faulty_store(tmp_path)
    with pytest.raises(FileNotFoundError) as missing:
        await store.get("never-written")
    await store.put("k", b"x" * 1000)
    obj = Path(store.path("k"))
    obj.write_bytes(obj.read_bytes()[:20])
    with pytest.raises(OSError) as damaged:
        await store.get("k")
    assert classify(missing.value) == "missing" and not is_outage(missing.value)
    assert classify(damaged.value) == "damaged" and not is_outage(damaged.value)
    assert FAULTS.calls["read"] == 2  # neither is retried
    await store.put("k", 7)
    FAULTS.fail_nth(1, "read", os_error(errno.EREMOTEIO))  # s3fs's 500 InternalError
    assert await store.get("k") == 7
    store.close()


# ------------------------------------------------------------------ clusters

# Runs are recorded in files, not in a module-level list: a task token covers the values
# of the globals a function reads, and a list that grows would change it.


def produce(i: int, runs: str) -> int:
    record_run(runs, f"produce-{i}")
    return i * 10


def consume(x: int, i: int, runs: str) -> int:
    record_run(runs, f"consume-{i}")
    return x + 1


class Graphs:
    """Stored inputs ``x-i`` and their consumers ``y-i``, counting their runs."""

    def __init__(self, tmp_path: Path):
        self.runs = tmp_path / "runs"
        self.runs.mkdir()

    def inputs(self, n: int) -> list[Any]:
        return [delayed(produce)(i, str(self.runs), dask_key_name=f"x-{i}") for i in range(n)]

    def consumers(self, xs: list[Any]) -> list[Any]:
        runs = str(self.runs)
        return [delayed(consume)(x, i, runs, dask_key_name=f"y-{i}") for i, x in enumerate(xs)]

    def ran(self, what: str) -> list[int]:
        """Which ``what-i`` ran (once per run), since the last :meth:`forget`."""
        counts = runs(self.runs)
        return sorted(
            int(k.split("-")[1]) for k in counts if k.startswith(what) for _ in range(counts[k])
        )

    def forget(self) -> None:
        for f in self.runs.iterdir():
            f.unlink()

    async def read_stored_inputs(self, c: Any, n: int) -> float:
        """Compute consumers of ``n`` stored inputs, one of them requested too (a
        loader); check the results; return how long it took."""
        xs = self.inputs(n)
        start = time.monotonic()
        results = await c.gather(c.compute([*self.consumers(xs), xs[0]]))
        assert results == [i * 10 + 1 for i in range(n)] + [0]
        return time.monotonic() - start


N = 6


@pytest.mark.parametrize("window", ["30s", "500ms"])
@gen_test(timeout=90)
async def test_burst_of_resets_recomputes_nothing(tmp_path: Path, window: str) -> None:
    """3 s bursts of connection resets while dependents read stored inputs, then while
    requested stored results are loaded: waited out within the window; past it, readers
    ask the lane again later and loaders load again. Either way nothing is recomputed
    and the catalog keeps every entry."""
    url, g = f"faulty://{tmp_path}/store", Graphs(tmp_path)
    with dask.config.set({**FAST, "storage-scheduler.retry.outage-window": window}):
        async with storage_cluster(url) as (c, s, plugin):
            assert await c.gather(c.compute(g.inputs(N))) == [i * 10 for i in range(N)]
            await async_poll_for(lambda: not s.tasks, timeout=10)
            assert all(plugin.catalog.versions(f"x-{i}") for i in range(N))
            g.forget()
            FAULTS.outage(3.0)
            with store_log() as log:
                took = await g.read_stored_inputs(c, N)
            assert g.ran("produce") == []
            assert g.ran("consume") == list(range(N))
            assert all(plugin.catalog.versions(f"x-{i}") for i in range(N))
            assert plugin.counters.unreadable == 0
            assert took >= 2.5 and FAULTS.failed["read"] >= N
            # Capped backoff: at most a few tries a second per read, not a busy loop.
            assert FAULTS.failed["read"] <= N * 3 * 12, FAULTS.failed
            # Each store (the scheduler's, serving lane reads, and a worker's, loading)
            # warns once that the outage began.
            assert sum("does not answer" in m for m in log) <= 3, log

            await async_poll_for(lambda: not s.tasks, timeout=10)
            FAULTS.reset()
            FAULTS.outage(3.0)
            start = time.monotonic()
            assert await c.gather(c.compute(g.inputs(N))) == [i * 10 for i in range(N)]
            assert g.ran("produce") == []
            assert time.monotonic() - start >= 2.5 and FAULTS.failed["read"] >= N
            assert all(plugin.catalog.versions(f"x-{i}") for i in range(N))
            assert FAULTS.failed["read"] <= N * 3 * 12, FAULTS.failed


@gen_test(timeout=60)
async def test_lane_outage_falls_back_to_a_peer(tmp_path: Path) -> None:
    """An input held by the lane and by a peer comes from the peer while the store is
    down: the busy lane is skipped."""
    url, g = f"faulty://{tmp_path}/store", Graphs(tmp_path)
    with dask.config.set({**FAST, "storage-scheduler.retry.outage-window": "500ms"}):
        async with storage_cluster(url) as (c, s, plugin):
            a, b = sorted(s.workers)
            x = c.submit(produce, 1, str(g.runs), key="x-1", workers=[a])
            await x
            assert len(s.tasks["x-1"].who_has) == 2  # a and its lane
            FAULTS.outage(60)
            start = time.monotonic()
            y = c.submit(consume, x, 1, str(g.runs), key="y-1", workers=[b])
            assert await y == 11
            assert time.monotonic() - start < 10  # not waiting for the store
            assert FAULTS.failed["read"] > 0  # the lane was asked first
            FAULTS.reset()
            assert g.ran("produce") == [1]
            assert plugin.catalog.versions("x-1") and plugin.counters.unreadable == 0


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
@gen_test(timeout=60)
async def test_full_store_does_not_stop_the_computation(tmp_path: Path, code: int) -> None:
    """Writes failing with ENOSPC/EROFS: results stay in worker memory, correct, unstored;
    the writer skips the store for a while instead of trying every result."""
    url, g = f"faulty://{tmp_path}/store", Graphs(tmp_path)
    with dask.config.set(FAST):
        async with storage_cluster(url) as (c, s, plugin):
            FAULTS.fail_writes(code)
            ys = g.consumers(g.inputs(20))
            assert await c.gather(c.compute(ys)) == [i * 10 + 1 for i in range(20)]
            assert g.ran("produce") == list(range(20))
            objects = [p for op, p in FAULTS.failures if op == "write" and "/objects/" in p]
            assert 1 <= len(objects) <= 4, objects  # once per worker, then skipped
            assert not plugin.catalog.versions("x-0")
            FAULTS.reset()


@gen_test(timeout=60)
async def test_missing_object_is_still_recomputed(tmp_path: Path) -> None:
    """An object deleted behind the cluster's back is verified missing: its catalog entry
    and lane replica go, and it is computed again (a loader's, and a lane read's)."""
    url, g = f"faulty://{tmp_path}/store", Graphs(tmp_path)
    with dask.config.set(FAST):
        async with storage_cluster(url) as (c, s, plugin):
            assert await c.gather(c.compute(g.inputs(N))) == [i * 10 for i in range(N)]
            await async_poll_for(lambda: not s.tasks, timeout=10)
            for key in ("x-0", "x-1"):  # a loader's, a lane read's
                (entry,) = plugin.catalog.versions(key)
                Path(plugin.store.path(key, entry.token)).unlink()
            g.forget()
            await g.read_stored_inputs(c, N)
            assert g.ran("produce") == [0, 1]
            assert plugin.counters.unreadable >= 1
            assert FAULTS.failed["read"] == 0
