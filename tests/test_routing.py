"""Plugin logic on in-process clusters (gen_cluster, with distributed's validation on)."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import dask
from distributed import Scheduler, Worker, wait
from distributed.utils_test import async_poll_for, captured_logger, gen_cluster, inc

from storage_scheduler import Store, StoreUnavailableError
from storage_scheduler._protocol import is_lane
from storage_scheduler.scheduler.amm import LaneAwareReduceReplicas
from tests.utils import enable_storage, lane_keys, stored_token, stored_value

CALLS: list[Any] = []


def counted_inc(x: int) -> int:
    CALLS.append(x)
    return x + 1


def add(x: int, y: int) -> int:
    return x + y


@gen_cluster(client=True)
async def test_results_stored_with_lane_replica(c, s, a, b, tmp_path: Path) -> None:
    plugin = await enable_storage(s, str(tmp_path / "store"))
    x = c.submit(inc, 1, key="x", workers=[a.address])
    y = c.submit(inc, x, key="y", workers=[a.address])
    assert await y == 3
    who_has = await c.who_has()
    assert lane_keys(who_has) == {"x", "y"}
    store = Store.from_url(str(tmp_path / "store"))
    assert set(await store.list()) == {"x", "y"}
    assert await stored_value(store, "y") == 3
    store.close()
    assert plugin.storage_info()["keys_in_lanes"] == 2
    assert s.plugins["storage-scheduler"] is plugin


@gen_cluster(client=True, nthreads=[("", 1)])
async def test_thread_slot_is_free_while_a_result_is_written(c, s, a, tmp_path: Path) -> None:
    """The write runs with the task in ``long-running`` (Dask's secede): the slot is free,
    the task is reported finished, with its lane, only once stored."""
    plugin = await enable_storage(s, str(tmp_path / "store"))
    futures = c.map(lambda i: np.full(200_000, i), range(4), key=[f"r-{i}" for i in range(4)])
    await wait(futures)

    def when(key: str, start: str, finish: str) -> float:
        (t,) = [t[-1] for t in a.state.story(key) if t[1:3] == (start, finish)]
        return t

    detached = [
        f"r-{i}"
        for i in range(4)
        if any(t[1:3] == ("executing", "long-running") for t in a.state.story(f"r-{i}"))
    ]
    key = detached[0]
    # The next task started before this one's write ended and it was reported finished.
    following = sorted(
        when(f"r-{i}", "ready", "executing")
        for i in range(4)
        if when(f"r-{i}", "ready", "executing") > when(key, "executing", "long-running")
    )
    assert following and following[0] < when(key, "long-running", "memory")
    for i in range(4):
        # The scheduler hears "finished" once, with the lane already a holder.
        assert any(is_lane(ws.address) for ws in s.tasks[f"r-{i}"].who_has or ())
    worker_plugin = a.plugins["storage-scheduler"]
    assert (
        worker_plugin.writer.stats.writes_detached == 0 and worker_plugin.writer.stats.stored == 4
    )
    assert plugin.storage_info()["keys_in_lanes"] == 4


@gen_cluster(client=True, nthreads=[("", 1)])
async def test_quick_writes_keep_the_thread_slot(c, s, a, tmp_path: Path) -> None:
    """Small results bound for a local disk are written from the event loop, holding the
    slot: handing it over would cost more (a state transition and a message to the
    scheduler) than the write."""
    await enable_storage(s, str(tmp_path / "store"))
    futures = c.map(inc, range(40), key=[f"q-{i}" for i in range(40)])
    assert await c.gather(futures) == list(range(1, 41))
    store = a.plugins["storage-scheduler"].store
    assert store.local and store.inline_max_bytes > 0
    assert store.counters.objects_written == 40
    seceded = [
        f.key
        for f in futures
        if any(t[1:3] == ("executing", "long-running") for t in a.state.story(f.key))
    ]
    assert seceded == []
    # Dask sizes an arbitrary object by the instance alone: not trusted to be small.
    held = c.submit(Holder, 1 << 20, key="held")
    assert len((await held).data) == 1 << 20
    assert any(t[1:3] == ("executing", "long-running") for t in a.state.story("held"))


class Holder:
    """Holds bytes that ``sizeof`` does not see."""

    def __init__(self, n: int):
        self.data = bytes(n)


@gen_cluster(client=True)
async def test_lanes_are_not_workers(c, s, a, b, tmp_path: Path) -> None:
    plugin = await enable_storage(s, str(tmp_path / "store"), lanes=3)
    await c.submit(inc, 1, key="x")
    assert len(plugin.lanes.addresses) == 3
    assert set(s.workers) == {a.address, b.address}
    info = await c.scheduler.identity()
    assert set(info["workers"]) == {a.address, b.address}
    assert set(await c.run(lambda: 1)) == {a.address, b.address}
    assert not any(is_lane(ws.address) for ws in s.running)
    assert not any(is_lane(addr) for addr in s.idle)
    assert not any(is_lane(addr) for addr in s.stream_comms)


@gen_cluster(client=True)
async def test_dependents_read_from_store(c, s, a, b, tmp_path: Path) -> None:
    await enable_storage(s, str(tmp_path / "store"))
    xs = [c.submit(np.full, 1000, i, key=f"x-{i}", workers=[a.address]) for i in range(4)]
    total = c.submit(
        lambda *arrays: sum(int(x.sum()) for x in arrays), *xs, key="total", workers=[b.address]
    )
    assert await total == 1000 * sum(range(4))
    sources = {e["who"] for e in b.transfer_incoming_log}
    assert sources and all(is_lane(w) for w in sources), sources
    assert not a.transfer_outgoing_log  # not one byte left a's memory for b


@gen_cluster(client=True, config={"storage-scheduler.prefer": "peer"})
async def test_prefer_peer(c, s, a, b, tmp_path: Path) -> None:
    await enable_storage(s, str(tmp_path / "store"))
    x = c.submit(np.ones, 1000, key="x", workers=[a.address])
    y = c.submit(np.sum, x, key="y", workers=[b.address])
    assert await y == 1000
    assert {e["who"] for e in b.transfer_incoming_log} == {a.address}


@gen_cluster(client=True)
async def test_closed_worker_loses_nothing(c, s, a, b, tmp_path: Path) -> None:
    await enable_storage(s, str(tmp_path / "store"))
    CALLS.clear()
    xs = c.map(counted_inc, range(10), key=[f"x-{i}" for i in range(10)], workers=[a.address])
    await wait(xs)
    await a.close()
    total = c.submit(sum, xs, key="total", workers=[b.address])
    assert await total == sum(range(1, 11))
    assert sorted(CALLS) == list(range(10))  # nothing ran twice
    assert all(s.tasks[f"x-{i}"].state == "memory" for i in range(10))


@gen_cluster(client=True, nthreads=[("", 1)] * 3)
async def test_retire_worker_moves_no_data(c, s, a, b, w3, tmp_path: Path) -> None:
    await enable_storage(s, str(tmp_path / "store"))
    xs = c.map(np.ones, [100_000] * 5, key=[f"x-{i}" for i in range(5)], workers=[a.address])
    await wait(xs)
    await c.retire_workers([a.address])
    assert a.address not in s.workers
    assert not b.transfer_incoming_log and not w3.transfer_incoming_log
    for i in range(5):
        assert [ws.address for ws in s.tasks[f"x-{i}"].who_has] == [
            ws.address for ws in s.tasks[f"x-{i}"].who_has if is_lane(ws.address)
        ]
    assert [int(x.sum()) for x in await c.gather(xs)] == [100_000] * 5


@gen_cluster(client=True)
async def test_gather_paths(c, s, a, b, tmp_path: Path) -> None:
    await enable_storage(s, str(tmp_path / "store"))
    x = c.submit(np.arange, 10, key="x", workers=[a.address])
    await wait(x)
    await a.close()  # only the lane holds x now
    np.testing.assert_array_equal(await c.gather(x, direct=False), np.arange(10))
    np.testing.assert_array_equal(await c.gather(x, direct=True), np.arange(10))
    await c.replicate(x)  # Worker.gather from a lane
    assert b.address in {ws.address for ws in s.tasks["x"].who_has}


@gen_cluster(client=True)
async def test_deleted_object_is_recomputed(c, s, a, b, tmp_path: Path) -> None:
    await enable_storage(s, str(tmp_path / "store"))
    CALLS.clear()
    x = c.submit(counted_inc, 1, key="x", workers=[a.address], allow_other_workers=True)
    await wait(x)
    await a.close()  # the lane is the only holder
    store = Store.from_url(str(tmp_path / "store"))
    await store.delete_versions([("x", await stored_token(store, "x"))])
    with captured_logger("storage_scheduler", level=logging.WARNING) as log:
        y = c.submit(inc, x, key="y", workers=[b.address])
        assert await asyncio.wait_for(y, 30) == 3
    assert CALLS == [1, 1]  # recomputed once, not looped
    assert "(missing)" in log.getvalue()
    assert await stored_value(store, "x") == 2  # and stored again
    store.close()


@gen_cluster(client=True)
async def test_corrupt_object_is_recomputed(c, s, a, b, tmp_path: Path) -> None:
    plugin = await enable_storage(s, str(tmp_path / "store"))
    x = c.submit(np.arange, 1000, key="x", workers=[a.address], allow_other_workers=True)
    await wait(x)
    await a.close()
    store = Store.from_url(str(tmp_path / "store"))
    path = store.path("x", await stored_token(store, "x"))
    data = bytearray(Path(path).read_bytes())
    data[-8] ^= 0xFF
    Path(path).write_bytes(bytes(data))
    y = c.submit(np.sum, x, key="y", workers=[b.address])
    assert await asyncio.wait_for(y, 30) == sum(range(1000))
    assert plugin.counters.unreadable == 1
    np.testing.assert_array_equal(await stored_value(store, "x"), np.arange(1000))
    store.close()


@gen_cluster(client=True)
async def test_annotations_select_results(c, s, a, b, tmp_path: Path) -> None:
    await enable_storage(s, str(tmp_path / "store"))
    with dask.annotate(storage=False):
        skipped = dask.delayed(inc)(1, dask_key_name="skipped")
    kept = dask.delayed(inc)(skipped, dask_key_name="kept")
    assert await c.compute(kept) == 3
    store = Store.from_url(str(tmp_path / "store"))
    assert set(await store.list()) == {"kept"}
    store.close()


@gen_cluster(client=True, config={"storage-scheduler.results": "annotated"})
async def test_only_annotated_results(c, s, a, b, tmp_path: Path) -> None:
    await enable_storage(s, str(tmp_path / "store"))
    plain = dask.delayed(inc)(1, dask_key_name="plain")
    with dask.annotate(storage=True):
        chosen = dask.delayed(inc)(plain, dask_key_name="chosen")
    assert await c.compute(chosen) == 3
    store = Store.from_url(str(tmp_path / "store"))
    assert set(await store.list()) == {"chosen"}
    assert lane_keys(await c.who_has()) == set()  # chosen was released after compute
    store.close()


class Unpicklable:
    def __init__(self) -> None:
        self.lock = threading.Lock()


@gen_cluster(client=True)
async def test_odd_values(c, s, a, b, tmp_path: Path) -> None:
    await enable_storage(s, str(tmp_path / "store"))
    values = {
        "empty-frame": pd.DataFrame({"a": pd.Series([], dtype="f8")}),
        "empty-array": np.empty(0),
        "zero-d": np.array(5),
        "none": None,
        "empty-bytes": b"",
    }
    futures = {k: c.submit(lambda v: v, v, key=k, workers=[a.address]) for k, v in values.items()}
    with (
        captured_logger("storage_scheduler", level=logging.WARNING) as log,
        captured_logger("distributed.protocol.pickle", level=logging.WARNING) as pickling,
    ):
        futures["unpicklable"] = c.submit(Unpicklable, key="unpicklable", workers=[a.address])
        futures["unpicklable-2"] = c.submit(Unpicklable, key="unpicklable-2", workers=[a.address])
        await wait(list(futures.values()))
    assert log.getvalue().count("could not be stored") == 1  # once, not per task
    # Stock Dask pickles a result only to move it: no error with a traceback per result.
    assert pickling.getvalue() == ""
    results = await c.gather({k: f for k, f in futures.items() if not k.startswith("unpicklable")})
    pd.testing.assert_frame_equal(results["empty-frame"], values["empty-frame"])
    assert results["zero-d"] == 5 and results["none"] is None and results["empty-bytes"] == b""
    lanes = lane_keys(await c.who_has())
    assert lanes == set(values) - {"none"}  # None: a task run for its effect, not stored
    assert s.tasks["unpicklable"].state == "memory"
    stats = a.plugins["storage-scheduler"].writer.stats
    assert stats.write_failures == 2
    assert stats.not_stored_by_reason["side-effect"] == 1


@gen_cluster(client=True)
async def test_amm_policy_replaced(c, s, a, b, tmp_path: Path) -> None:
    await enable_storage(s, str(tmp_path / "store"))
    amm = s.extensions["amm"]
    assert any(isinstance(p, LaneAwareReduceReplicas) for p in amm.policies)
    x = c.submit(np.ones, 10, key="x", workers=[a.address])
    await wait(x)
    await c.replicate(x, n=2)
    assert len(s.tasks["x"].who_has) == 3
    amm.run_once()  # stock ReduceReplicas would raise KeyError on the lane
    while len(s.tasks["x"].who_has) > 2:
        await asyncio.sleep(0.01)
    assert sum(is_lane(ws.address) for ws in s.tasks["x"].who_has) == 1


@gen_cluster(client=True, nthreads=[])
async def test_new_worker_gets_worker_plugin(c, s, tmp_path: Path) -> None:
    await enable_storage(s, str(tmp_path / "store"))
    async with Worker(s.address, nthreads=1) as w:
        assert "storage-scheduler" in w.plugins
        assert await c.submit(inc, 1, key="x") == 2
        assert lane_keys(await c.who_has()) == {"x"}


@pytest.mark.asyncio
async def test_scheduler_does_not_start_on_unusable_store(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with dask.config.set({"storage-scheduler.url": f"file://{blocker}/store"}):
        with pytest.raises(RuntimeError, match="Scheduler failed to start") as info:
            async with Scheduler(dashboard_address=":0", preload=["storage_scheduler"]):
                pass
    assert isinstance(info.value.__cause__, StoreUnavailableError)
    assert str(blocker) in str(info.value.__cause__)


@gen_cluster(client=True)
async def test_worker_store_override(c, s, a, b, tmp_path: Path) -> None:
    """A worker given its own URL (another path to the same directory) uses it."""
    from storage_scheduler import StoreSettings
    from storage_scheduler.worker import WorkerStoreOverride

    (tmp_path / "store").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "store")
    a.extensions["storage-scheduler"] = WorkerStoreOverride(
        StoreSettings.from_config(str(tmp_path / "alias"))
    )
    await enable_storage(s, str(tmp_path / "store"))
    assert a.plugins["storage-scheduler"].store.url == str(tmp_path / "alias")
    assert b.plugins["storage-scheduler"].store.url == str(tmp_path / "store")
    x = c.submit(inc, 1, key="x", workers=[a.address])
    y = c.submit(inc, x, key="y", workers=[b.address])
    assert await y == 3
    assert {e["who"] for e in b.transfer_incoming_log} == {
        s.plugins["storage-scheduler"].lanes.lane_for("x").address
    }


@pytest.mark.parametrize(
    "key, value",
    [("results", "some"), ("prefer", "nearest"), ("lanes", 0), ("lanes", "many")],
)
def test_bad_routing_settings(key: str, value: object) -> None:
    from storage_scheduler import SchedulerSettings, StorageConfigError

    with dask.config.set({f"storage-scheduler.{key}": value}):
        with pytest.raises(StorageConfigError, match=f"storage-scheduler.{key}"):
            SchedulerSettings.from_config()


@gen_cluster(client=True, nthreads=[("", 1)] * 2)
async def test_worker_on_another_store_is_refused(c, s, a, b, tmp_path: Path) -> None:
    """A worker that opens another directory than the scheduler's store is refused."""
    from storage_scheduler import StorageSchedulerError, StoreSettings
    from storage_scheduler.worker import WorkerStoreOverride

    other = StoreSettings.from_config(str(tmp_path / "elsewhere"))
    a.extensions["storage-scheduler"] = WorkerStoreOverride(other)
    with pytest.raises(StorageSchedulerError) as info:
        await enable_storage(s, str(tmp_path / "store"))
    message = str(info.value)
    assert a.address in message and "does not see the scheduler's store" in message
    assert b.address not in message
    await async_poll_for(lambda: a.status.name in ("closing", "closed"), timeout=10)


@gen_cluster(client=True)
async def test_lane_read_checks_the_token(c, s, a, b, tmp_path: Path) -> None:
    """A lane read finds another result under the key (written by another cluster with
    other code): it is not used; the copy in worker memory is."""
    url = str(tmp_path / "store")
    plugin = await enable_storage(s, url)
    x = c.submit(inc, 1, key="x", workers=[a.address])
    await wait(x)
    # Another result, copied over the object of x's token (names are not a lock).
    other = Store.from_url(url)
    await other.put("x", 1000, token="someone-else's")
    forged = await other.read_path(other.path("x", "someone-else's"))
    await other._backend.write(other.path("x", plugin.lanes.tokens["x"]), [forged])
    other.close()
    with captured_logger("storage_scheduler", level=logging.WARNING) as log:
        y = c.submit(inc, x, key="y", workers=[b.address])
        assert await y == 3
    assert "produced by other code" in log.getvalue()


@gen_cluster(client=True)
async def test_worker_override_keeps_the_cluster_signing_key(c, s, a, b, tmp_path: Path) -> None:
    """A worker with its own store URL but no key of its own signs with the cluster's."""
    from storage_scheduler import StoreSettings
    from storage_scheduler.worker import WorkerStoreOverride

    (tmp_path / "store").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "store")
    own = StoreSettings.from_config(str(tmp_path / "alias"), signing_key=[])
    a.extensions["storage-scheduler"] = WorkerStoreOverride(own)
    await enable_storage(s, str(tmp_path / "store"), signing_key="cluster-key")
    assert a.plugins["storage-scheduler"].store.settings.signing_keys == (b"cluster-key",)
    x = c.submit(inc, 1, key="x", workers=[a.address])
    assert await c.submit(inc, x, key="y", workers=[b.address]) == 3
    signed = Store(StoreSettings.from_config(str(tmp_path / "store"), signing_key="cluster-key"))
    assert await stored_value(signed, "x") == 2  # written by a, signed with the cluster's key
    signed.close()
