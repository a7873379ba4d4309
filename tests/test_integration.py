"""Real processes: LocalCluster(processes=True) with the preload, on a local directory and S3."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import dask
from distributed import Client, wait
from distributed.utils_test import gen_test

from storage_scheduler import Store
from tests.conftest import make_bucket, s3_options
from tests.s3server import MotoServer
from tests.utils import (
    async_poll_until,
    consume,
    lane_keys,
    process_cluster,
    produce,
    runs,
    stored_value,
)

pytestmark = [pytest.mark.slow]


async def lanes_hold(c: Client, futures: list[Any], timeout: float = 30) -> None:
    """Wait until the lanes hold ``futures`` (at once with write-through; once the
    writes land with write-behind)."""

    async def held() -> bool:
        return lane_keys(await c.who_has(futures)) == {f.key for f in futures}

    await async_poll_until(held, timeout=timeout, what="the lanes holding the results")


DURABILITY = pytest.mark.parametrize("durability", ["write-through", "write-behind"])


@DURABILITY
def test_sigkill_worker_mid_run(
    backend: tuple[str, dict[str, Any]], tmp_path: Path, durability: str
) -> None:
    with dask.config.set({"storage-scheduler.durability": durability}):
        _sigkill_worker_mid_run(backend, tmp_path)


@gen_test(timeout=180)
async def _sigkill_worker_mid_run(backend: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    url, options = backend
    marks = tmp_path / "runs"
    marks.mkdir()
    async with process_cluster(url, options) as (cluster, c):
        a, b = sorted(cluster.scheduler.workers)
        producers = [
            c.submit(
                produce, i, str(marks), key=f"produce-{i}", workers=[a], allow_other_workers=True
            )
            for i in range(8)
        ]
        consumers = [
            c.submit(consume, p, str(marks), i, 0.3, key=f"consume-{i}", workers=[b])
            for i, p in enumerate(producers)
        ]
        await wait(producers)
        # Every producer is done and stored; the consumers are still running on b.
        await lanes_hold(c, producers, timeout=2)
        pid = (await c.run(os.getpid, workers=[a]))[a]
        os.kill(pid, signal.SIGKILL)
        results = await asyncio.wait_for(c.gather(consumers), 120)
        assert results == [100_000.0 * i for i in range(8)]
        counts = runs(marks)
        assert all(counts[f"produce-{i}"] == 1 for i in range(8)), counts

        store = Store.from_url(url, **options)
        assert set(await store.list()) >= {p.key for p in producers}
        np.testing.assert_array_equal(await stored_value(store, "produce-3"), np.full(100_000, 3.0))
        store.close()


@DURABILITY
def test_store_stopped_mid_run(tmp_path: Path, durability: str) -> None:
    """Kill the S3 server mid-run: tasks go on peer-to-peer and the result is correct."""
    with dask.config.set({"storage-scheduler.durability": durability}):
        _store_stopped_mid_run(tmp_path)


@gen_test(timeout=240)
async def _store_stopped_mid_run(tmp_path: Path) -> None:
    marks = tmp_path / "runs"
    marks.mkdir()
    with MotoServer() as server:
        url = f"s3://{make_bucket(server.endpoint)}/results"
        # botocore's own retries (5 attempts, backing off) would only make the dead
        # server's refusals slower to come: the store's handling is what is tested.
        options = {**s3_options(server.endpoint), "config_kwargs": {"retries": {"max_attempts": 1}}}
        async with process_cluster(url, options) as (cluster, c):
            a, b = sorted(cluster.scheduler.workers)
            first = [
                c.submit(produce, i, str(marks), key=f"produce-{i}", workers=[a]) for i in range(4)
            ]
            await wait(first)
            await lanes_hold(c, first)
            server.stop()
            later = [
                c.submit(produce, i, str(marks), key=f"produce-{i}", workers=[a])
                for i in range(4, 8)
            ]
            consumers = [
                c.submit(consume, p, str(marks), i, key=f"consume-{i}", workers=[b])
                for i, p in enumerate(first + later)
            ]
            results = await asyncio.wait_for(c.gather(consumers), 180)
            assert results == [100_000.0 * i for i in range(8)]
            counts = runs(marks)
            assert all(counts[f"produce-{i}"] == 1 for i in range(8)), counts
            # The results produced after the store died stayed in worker memory only.
            assert lane_keys(await c.who_has(later)) == set()
