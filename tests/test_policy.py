"""The storage policy (``policy: worth-storing``): results cheaper to recompute from stored
inputs than to write and read back are not stored, and stay recomputable."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import dask
from dask import delayed
from distributed.utils_test import gen_cluster, gen_test

from storage_scheduler import Store
from storage_scheduler.scheduler.skipped import PIN_CLIENT
from storage_scheduler.store import StoreCounters
from storage_scheduler.worker.policy import StoragePolicy, Throughput
from tests.utils import (
    async_poll_until,
    enable_storage,
    lane_keys,
    process_cluster,
    record_run,
    runs,
    storage_cluster,
)

POLICY = {"storage-scheduler.policy": "worth-storing"}


def expensive(directory: str, n: int = 100_000) -> np.ndarray:
    """A stored input: costs more to compute than to write."""
    record_run(directory, "x")
    time.sleep(0.3)
    return np.arange(n, dtype="f8")


def head(x: np.ndarray, directory: str, n: int = 10) -> np.ndarray:
    """A cheap slice of its input (a getitem)."""
    record_run(directory, "y")
    return x[:n].copy()


def total(y: np.ndarray, *gates: Any) -> float:
    return float(y.sum())


def gate(delay: float) -> int:
    time.sleep(delay)
    return 0


#: y's length. A 4 MB slice takes tens of milliseconds to write and read back against
#: about one to copy, so the decision holds on a busy machine too (where a 10-element
#: slice, waiting for the GIL behind x's write, can take longer than a small write).
N = 500_000
SUM = N * (N - 1) / 2


def graph(marks: Path, n: int = N) -> tuple[Any, Any]:
    x = delayed(expensive)(str(marks), max(100_000, 2 * n), dask_key_name="x")
    y = delayed(head)(x, str(marks), n, dask_key_name="y")
    return x, y


# ------------------------------------------------------------------ the cost model


def test_costs() -> None:
    counters = StoreCounters()
    stored = {"a": 0.0, "b": 0.5}
    policy = StoragePolicy(counters, 1.0, stored.get)
    assert policy.recompute_cost(0.1, ["a", "b"]) == pytest.approx(0.6)
    assert policy.recompute_cost(0.1, ["a", "unknown"]) is None
    assert policy.skip(1e-5, 80, ["a"]) == pytest.approx(1e-5)  # a slice of a stored input
    assert policy.skip(1e-5, 80, ["unknown"]) is None  # not recomputable: stored
    assert policy.skip(0.2, 80, []) is None  # costs more than a small write
    assert policy.skip(0.9, 10**9, ["b"]) is None  # over the limit
    assert policy.skip(0.4, 10**9, ["b"]) == pytest.approx(0.9)


def test_throughput_is_measured() -> None:
    t = Throughput((1e-3, 100e6))
    before = t.seconds(100 * 2**20)
    t.update(objects=10, nbytes=100 * 2**20, seconds=0.01)  # a very fast store
    assert t.seconds(100 * 2**20) < before
    per_object = t.per_object
    t.update(objects=110, nbytes=100 * 2**20 + 100, seconds=1.01)  # small objects: 10 ms
    assert t.per_object > per_object


# ------------------------------------------------------------------ in-process clusters


def skipped(*workers: Any) -> int:
    return sum(
        w.plugins["storage-scheduler"].writer.stats.not_stored_by_reason["recomputable"]
        for w in workers
    )


@gen_cluster(client=True, config=POLICY)
async def test_cheap_slice_not_stored(c, s, a, b, tmp_path: Path) -> None:
    plugin = await enable_storage(s, str(tmp_path / "store"))
    marks = tmp_path / "runs"
    marks.mkdir()
    x, y = graph(marks)
    z = delayed(total)(y, dask_key_name="z")
    assert await c.compute(z) == SUM
    assert plugin.counters.stored == 2  # x (costly) and z (requested); not y
    assert skipped(a, b) == 1
    assert (a.metrics["storage"]() or {})["not_stored_by_reason"].get("recomputable", 0) + (
        b.metrics["storage"]() or {}
    )["not_stored_by_reason"].get("recomputable", 0) == 1
    # The pseudo-client that kept x for y lets go of it once y is released.
    await async_poll_until(lambda: not plugin.skipped.pins and not plugin.skipped.costs)
    assert not s.clients[PIN_CLIENT].wants_what
    await async_poll_until(lambda: "x" not in s.tasks or s.tasks["x"].state != "memory")


@gen_cluster(client=True, config={**POLICY, "storage-scheduler.gc": "never"})
async def test_requested_and_annotated_results_are_stored(c, s, a, b, tmp_path: Path) -> None:
    plugin = await enable_storage(s, str(tmp_path / "store"))
    marks = tmp_path / "runs"
    marks.mkdir()
    x, y = graph(marks)
    # Requested: stored, however cheap.
    assert np.array_equal(await c.compute(y), np.arange(N))
    assert plugin.catalog.versions("y")
    with dask.annotate(storage=True):
        kept = delayed(head)(x, str(marks), N, dask_key_name="kept")
    with dask.annotate(storage=False):
        unkept = delayed(expensive)(str(marks), dask_key_name="unkept")
    w = delayed(total)(kept, unkept, dask_key_name="w")
    assert await c.compute(w) == SUM
    assert plugin.catalog.versions("kept")  # annotated storage=True: stored
    assert not plugin.catalog.versions("unkept")  # storage=False: not, however costly
    stats = [wk.plugins["storage-scheduler"].writer.stats.not_stored_by_reason for wk in (a, b)]
    assert sum(st["recomputable"] for st in stats) == 0, stats


@gen_test(timeout=60)
async def test_reuse_walks_through_an_unstored_key(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    marks = tmp_path / "runs"
    marks.mkdir()
    with dask.config.set({**POLICY, "storage-scheduler.gc": "never"}):
        async with storage_cluster(url) as (c, _, plugin):
            x, y = graph(marks)
            assert await c.compute(delayed(total)(y, dask_key_name="z")) == SUM
            assert runs(marks) == {"x": 1, "y": 1}
            assert not plugin.catalog.versions("y")
        # A new cluster on the same store asks for another dependent of y.
        async with storage_cluster(url) as (c, _, plugin):
            x, y = graph(marks)
            w = delayed(total)(y, 1, dask_key_name="w")
            assert await c.compute(w) == SUM
            assert plugin.reuse.reused_total == 1  # x
    # x came from the store; y, which was not stored, was recomputed from it.
    assert runs(marks) == {"x": 1, "y": 2}


# ------------------------------------------------------------------ real processes


@pytest.mark.slow
@gen_test(timeout=180)
async def test_skipped_slice_recomputed_after_sigkill(tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'store'}"
    marks = tmp_path / "runs"
    marks.mkdir()
    n = N
    with dask.config.set(POLICY):
        async with process_cluster(url) as (cluster, c):
            s = cluster.scheduler
            a, b = sorted(s.workers)
            with dask.annotate(workers=[a], allow_other_workers=True):
                x, y = graph(marks, n)
            with dask.annotate(workers=[b], allow_other_workers=True):
                late = delayed(gate)(4.0, dask_key_name="gate")
                z = delayed(total)(y, late, dask_key_name="z")
            future = c.compute(z)
            await async_poll_until(lambda: "y" in s.tasks and s.tasks["y"].state == "memory")
            # y is held by worker a only: not stored. x, stored, is kept for it.
            who_has = {k: [ws.address for ws in s.tasks[k].who_has or ()] for k in ("x", "y")}
            assert lane_keys(who_has) == {"x"}, who_has
            pid = (await c.run(os.getpid, workers=[a]))[a]
            os.kill(pid, signal.SIGKILL)
            assert await asyncio.wait_for(future, 120) == n * (n - 1) / 2
            # y was computed again, from x as the store holds it: x ran once.
            assert runs(marks) == {"x": 1, "y": 2}
            store = Store.from_url(url)
            assert "y" not in await store.list()
            store.close()
