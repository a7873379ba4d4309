"""Memory relief on the worker: stored results leave RAM without a write (in-process
clusters with a small memory limit, numpy payloads)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import dask
from distributed import wait
from distributed.utils_test import gen_cluster

from storage_scheduler.worker.spill import StoreSpillBuffer
from tests.utils import async_poll_until, enable_storage

MiB = 2**20
#: 10 MiB of float64.
N = 10 * MiB // 8

# A SpillBuffer (target: 60 MiB of a 100 MiB limit), stored results dropped above
# 50 MiB; no memory monitor: the workers share this test process, whose RSS says
# nothing about their limit.
TIGHT: dict[str, Any] = {
    "distributed.worker.memory.target": 0.6,
    "distributed.worker.memory.spill": False,
    "distributed.worker.memory.pause": False,
    "distributed.worker.memory.terminate": False,
    "storage-scheduler.relief-threshold": 0.5,
}
ONE_TIGHT_WORKER: dict[str, Any] = {
    "client": True,
    "nthreads": [("", 1)],
    "worker_kwargs": {"memory_limit": 100 * MiB},
    "config": TIGHT,
}


def full(i: int) -> np.ndarray:
    return np.full(N, i, dtype="f8")


def on_disk(data: Any) -> set[Any]:
    return set(data.slow)


@gen_cluster(**ONE_TIGHT_WORKER)
async def test_stored_results_are_dropped_not_spilled(c, s, a, tmp_path: Path) -> None:
    await enable_storage(s, str(tmp_path / "store"))
    keys = [f"x-{i}" for i in range(8)]
    xs = c.map(full, range(8), key=keys)
    await wait(xs)  # 80 MiB of results on a worker that spills past 60 MiB
    data = a.data
    assert not on_disk(data) and data.spilled_total.disk == 0  # nothing written locally
    assert isinstance(data, StoreSpillBuffer)
    dropped = set(data.dropped)
    assert 3 <= len(dropped) <= 4, dropped  # what it took to stay under 50 MiB
    assert data.fast.total_weight <= 50 * MiB
    assert set(keys) <= set(data)  # the worker still holds every key
    # Managed memory counts only what is in RAM; "spilled to disk" stays zero.
    assert (
        data.spilled_total.memory == data.dropped_bytes == sum(v[1] for v in data.dropped.values())
    )
    assert a.state.nbytes - data.spilled_total.memory == data.fast.total_weight
    # Needed again on the same worker: read back from the store.
    totals = await c.gather(c.map(np.sum, xs, key=[f"sum-{k}" for k in keys]))
    assert totals == [i * N for i in range(8)]
    assert data.stats.read_back >= len(dropped)
    assert not on_disk(data)
    np.testing.assert_array_equal(await c.gather(xs[0]), full(0))


@gen_cluster(**ONE_TIGHT_WORKER)
async def test_unstored_results_still_spill_to_disk(c, s, a, tmp_path: Path) -> None:
    await enable_storage(s, str(tmp_path / "store"))

    def unstored(name: str, i: int) -> Any:
        with dask.annotate(storage=False):
            return c.compute(dask.delayed(full)(i, dask_key_name=name))

    # Oldest first: 5 unstored, 5 stored, 2 more unstored (120 MiB).
    futures = []
    for i in range(5):
        futures.append(unstored(f"u-{i}", i))
        await wait(futures)
    for i in range(5):
        futures.append(c.submit(full, i, key=f"s-{i}"))
        await wait(futures)
    for i in range(5, 7):
        futures.append(unstored(f"u-{i}", i))
        await wait(futures)
    data = a.data
    # The unstored ones spill as in stock Dask, least recently used first ...
    assert on_disk(data) and on_disk(data) <= {f"u-{i}" for i in range(7)}
    # ... but only once every stored result has left RAM, without a write.
    assert isinstance(data, StoreSpillBuffer)
    assert set(data.dropped) == {f"s-{i}" for i in range(5)}
    assert data.spilled_total.disk > 0
    values = await c.gather(futures)
    for name, value in zip(
        [*(f"u-{i}" for i in range(5)), *(f"s-{i}" for i in range(5)), "u-5", "u-6"],
        values,
        strict=True,
    ):
        assert value[0] == int(name.split("-")[1])


@gen_cluster(**ONE_TIGHT_WORKER)
async def test_a_result_too_large_for_ram_is_not_written_twice(c, s, a, tmp_path: Path) -> None:
    await enable_storage(s, str(tmp_path / "store"))
    big = c.submit(np.full, 70 * MiB // 8, 1.0, key="big")  # more than the 60 MiB target
    await wait(big)
    data = a.data
    assert not on_disk(data)
    assert isinstance(data, StoreSpillBuffer) and "big" in data.dropped
    assert await c.submit(np.sum, big, key="sum-big") == 70 * MiB // 8


@gen_cluster(**ONE_TIGHT_WORKER)
async def test_dropped_result_lost_from_the_store_is_recomputed(c, s, a, tmp_path: Path) -> None:
    await enable_storage(s, str(tmp_path / "store"))
    keys = [f"x-{i}" for i in range(8)]
    xs = c.map(full, range(8), key=keys)
    await wait(xs)
    data = a.data
    assert isinstance(data, StoreSpillBuffer) and "x-0" in data.dropped
    shutil.rmtree(tmp_path / "store" / "objects")  # every stored object is gone
    total = c.submit(np.sum, xs[0], key="sum-x-0")
    assert await total == 0.0  # x-0 was recomputed, not read
    assert data.stats.lost >= 1
    np.testing.assert_array_equal(await c.gather(xs[0]), full(0))


@gen_cluster(
    client=True,
    nthreads=[("", 1), ("", 1)],
    worker_kwargs={"memory_limit": 100 * MiB},
    config={**TIGHT, "storage-scheduler.prefer": "peer"},
)
async def test_peer_reads_a_dropped_result_from_its_holder(c, s, a, b, tmp_path: Path) -> None:
    await enable_storage(s, str(tmp_path / "store"))
    keys = [f"x-{i}" for i in range(8)]
    xs = c.map(full, range(8), key=keys, workers=[a.address])
    await wait(xs)
    assert isinstance(a.data, StoreSpillBuffer) and "x-0" in a.data.dropped
    total = c.submit(np.sum, xs[0], key="sum-x-0", workers=[b.address])
    assert await total == 0.0
    assert any(e["who"] == a.address for e in b.transfer_incoming_log)
    await async_poll_until(lambda: a.data.stats.read_back >= 1)  # type: ignore[union-attr]


@gen_cluster(**ONE_TIGHT_WORKER)
async def test_evictions_and_spills_are_reported(c, s, a, tmp_path: Path) -> None:
    pytest.importorskip("prometheus_client")
    from distributed.utils_test import fetch_metrics

    from storage_scheduler._protocol import HEARTBEAT_KEY

    await enable_storage(s, str(tmp_path / "store"))
    with dask.annotate(storage=False):
        kept = c.compute(dask.delayed(full)(99, dask_key_name="unstored"))
    xs = c.map(full, range(8), key=[f"x-{i}" for i in range(8)])
    await wait([kept, *xs])
    data = a.data
    assert isinstance(data, StoreSpillBuffer)
    await a.heartbeat()
    beat = s.workers[a.address].metrics[HEARTBEAT_KEY]
    assert beat["evicted_bytes"] == data.stats.evicted_bytes >= 3 * 10 * MiB
    assert beat["dropped_bytes"] == data.dropped_bytes > 0
    assert beat["spilled_bytes"] == beat["spill_written_bytes"] == 0
    assert beat["not_stored_by_reason"] == {"annotation": 1}
    # The scheduler's managed memory is what is in RAM: not the dropped results.
    assert s.workers[a.address].memory.managed == data.fast.total_weight

    prefix = "dask_storage_scheduler"
    metrics = await fetch_metrics(a.http_server.port, prefix)

    def value(name: str, **labels: str) -> float:
        samples = metrics[f"{prefix}_{name}"].samples
        return sum(x.value for x in samples if labels.items() <= x.labels.items())

    assert value("worker_evicted_bytes", worker=a.address) == data.stats.evicted_bytes
    assert value("worker_dropped_bytes", worker=a.address) == data.dropped_bytes
    assert value("worker_spilled_bytes", worker=a.address) == 0
    assert value("worker_not_stored", worker=a.address, reason="annotation") == 1
    assert value("worker_memory_bytes", worker=a.address, type="results") == (
        data.fast.total_weight
    )
