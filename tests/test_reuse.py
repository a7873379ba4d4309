"""Results that outlive the cluster: reuse, invalidation, lifecycle (in-process clusters)."""

from __future__ import annotations

import asyncio
import errno
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import dask
import dask.array as da
from dask import delayed
from distributed import wait
from distributed.utils_test import async_poll_for, gen_test

from storage_scheduler import Store
from storage_scheduler.store.catalog import Catalog
from tests.faulty_fs import FaultyFileSystem
from tests.utils import (
    async_poll_until,
    cataloged_keys,
    leased_keys,
    preloaded_cluster,
    storage_cluster,
    stored_headers,
    stored_token,
)

CALLS: list[Any] = []


def record(name: str, value: Any) -> Any:
    CALLS.append(name)
    return value


def inc(x: int) -> int:
    CALLS.append(("inc", x))
    return x + 1


def total(*xs: int) -> int:
    CALLS.append("total")
    return sum(xs)


def graph(n: int = 20) -> Any:
    """A small tree: n increments of n increments, summed."""
    leaves = [delayed(inc)(i, dask_key_name=f"leaf-{i}") for i in range(n)]
    mids = [delayed(inc)(x, dask_key_name=f"mid-{i}") for i, x in enumerate(leaves)]
    return delayed(total)(*mids, dask_key_name="total")


async def listing(url: str) -> set[Any]:
    store = Store.from_url(url)
    try:
        return set(await store.list())
    finally:
        store.close()


@gen_test(timeout=60)
async def test_rerun_on_new_cluster_executes_nothing(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    CALLS.clear()
    async with storage_cluster(url) as (c, s, plugin):
        assert await c.compute(graph()) == sum(range(2, 22))
    assert len(CALLS) == 41
    # Intermediates are gone (nobody asked for them); the result stays.
    assert await listing(url) == {"total"}

    CALLS.clear()
    async with storage_cluster(url) as (c, s, plugin):
        assert await c.compute(graph()) == sum(range(2, 22))
        assert plugin.reuse.reused_total == 1
    assert CALLS == []


@gen_test(timeout=60)
async def test_persist_survives_the_cluster(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    x = da.arange(100, chunks=10).map_blocks(lambda b: record("block", b * 2), dtype=int)
    CALLS.clear()
    async with storage_cluster(url) as (c, s, plugin):
        y = c.persist(x)
        await wait(y)
        assert int(await c.compute(y.sum())) == 2 * sum(range(100))
    assert CALLS == ["block"] * 10
    keys = {k for k in await listing(url) if isinstance(k, tuple)}
    assert len({k for k in keys if k[0] == x.name}) == 10  # every persisted block stayed

    CALLS.clear()
    async with storage_cluster(url) as (c, s, plugin):
        y = c.persist(x)
        await wait(y)
        np.testing.assert_array_equal(await c.compute(y), np.arange(100) * 2)
    assert CALLS == []


@gen_test(timeout=60)
async def test_resume_in_the_same_session(tmp_path: Path) -> None:
    """Stored intermediates of an interrupted computation are reused by the next one."""
    url = str(tmp_path / "store")
    CALLS.clear()
    async with storage_cluster(url) as (c, s, plugin):
        g = graph()
        mids = [
            delayed(inc)(delayed(inc)(i, dask_key_name=f"leaf-{i}"), dask_key_name=f"mid-{i}")
            for i in range(10)
        ]
        # The first half of the work, held as futures: "the computation so far".
        held = c.compute(mids)
        await wait(held)
        CALLS.clear()
        assert await c.compute(g) == sum(range(2, 22))
    assert sorted(c for c in CALLS if c != "total") == sorted(
        [("inc", i) for i in range(10, 20)] + [("inc", i + 1) for i in range(10, 20)]
    )


def version_a(x: int) -> int:
    CALLS.append("a")
    return x + 1


def version_b(x: int) -> int:
    CALLS.append("b")
    return x + 100


@gen_test(timeout=60)
async def test_edited_function_with_same_key_is_recomputed(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    CALLS.clear()
    async with storage_cluster(url) as (c, s, plugin):
        assert await c.compute(delayed(version_a)(1, dask_key_name="x")) == 2
    async with storage_cluster(url) as (c, s, plugin):  # unchanged: reused
        assert await c.compute(delayed(version_a)(1, dask_key_name="x")) == 2
    assert CALLS == ["a"]
    async with storage_cluster(url) as (c, s, plugin):  # "edited": same key, other code
        assert await c.compute(delayed(version_b)(1, dask_key_name="x")) == 101
    assert CALLS == ["a", "b"]
    async with storage_cluster(url) as (c, s, plugin):  # other arguments
        assert await c.compute(delayed(version_b)(2, dask_key_name="x")) == 102
    assert CALLS == ["a", "b", "b"]
    async with storage_cluster(url) as (c, s, plugin):
        assert await c.compute(delayed(version_b)(2, dask_key_name="x")) == 102
    assert CALLS == ["a", "b", "b"]


@gen_test(timeout=60)
async def test_version_salt(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    CALLS.clear()
    for salt in ["v1", "v1", "v2"]:
        async with storage_cluster(url) as (c, s, plugin):
            with dask.annotate(storage_version=salt):
                x = delayed(version_a)(1, dask_key_name="x")
            assert await c.compute(x) == 2
    assert CALLS == ["a", "a"]
    with dask.config.set({"storage-scheduler.version": "release-2"}):
        async with storage_cluster(url) as (c, s, plugin):
            with dask.annotate(storage_version="v2"):
                x = delayed(version_a)(1, dask_key_name="x")
            assert await c.compute(x) == 2
    assert CALLS == ["a", "a", "a"]


@pytest.mark.parametrize("damage", ["delete", "corrupt"])
@gen_test(timeout=60)
async def test_lost_or_damaged_result_is_recomputed(tmp_path: Path, damage: str) -> None:
    url = str(tmp_path / "store")
    CALLS.clear()
    async with storage_cluster(url) as (c, s, plugin):
        assert await c.compute(graph(5)) == sum(range(2, 7))
    store = Store.from_url(url)
    (header,) = await stored_headers(store, "total")
    if damage == "delete":
        await store.delete_versions([("total", header.token)])
    else:
        path = Path(store.path("total", header.token))
        data = bytearray(path.read_bytes())
        data[-3] ^= 0xFF
        path.write_bytes(bytes(data))
    CALLS.clear()
    async with storage_cluster(url) as (c, s, plugin):
        assert await asyncio.wait_for(c.compute(graph(5)), 30) == sum(range(2, 7))
        assert plugin.counters.unreadable == 1  # shown as recomputed (lost or corrupt)
    assert CALLS.count("total") == 1 and len(CALLS) == 11  # recomputed, once
    assert await store.get("total", header.token) == sum(range(2, 7))  # and stored again
    store.close()


@gen_test(timeout=60)
async def test_damaged_intermediate_is_recomputed(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    CALLS.clear()
    async with storage_cluster(url) as (c, s, plugin):
        mids = c.compute(
            [
                delayed(inc)(delayed(inc)(i, dask_key_name=f"leaf-{i}"), dask_key_name=f"mid-{i}")
                for i in range(5)
            ]
        )
        await wait(mids)
    store = Store.from_url(url)
    (header,) = await stored_headers(store, "mid-2")
    await store.delete_versions([("mid-2", header.token)])
    CALLS.clear()
    async with storage_cluster(url) as (c, s, plugin):
        assert await asyncio.wait_for(c.compute(graph(5)), 30) == sum(range(2, 7))
    # mid-2 = inc(leaf-2 = inc(2)); its leaf was an intermediate of the first run, deleted.
    assert sorted(CALLS, key=str) == sorted([("inc", 2), ("inc", 3), "total"], key=str)
    store.close()


@gen_test(timeout=60)
async def test_submit_and_keep_annotation(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    CALLS.clear()
    async with storage_cluster(url) as (c, s, plugin):
        f = c.submit(inc, 1, key="submitted")
        assert await f == 2
        with dask.annotate(storage_keep=True):
            kept = delayed(inc)(10, dask_key_name="kept-intermediate")
        dropped = delayed(inc)(20, dask_key_name="dropped-intermediate")
        assert await c.compute(delayed(total)(kept, dropped, dask_key_name="sum")) == 32
        del f
        # The client's release reaches the scheduler, which forgets the key while it runs.
        await async_poll_for(lambda: "submitted" not in s.tasks, timeout=10)
    assert await listing(url) == {"submitted", "kept-intermediate", "sum"}
    CALLS.clear()
    async with storage_cluster(url) as (c, s, plugin):
        assert await c.submit(inc, 1, key="submitted") == 2
    assert CALLS == []


@gen_test(timeout=60)
async def test_gc_never(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    with dask.config.set({"storage-scheduler.gc": "never"}):
        async with storage_cluster(url) as (c, s, plugin):
            assert await c.compute(graph(3)) == sum(range(2, 5))
    assert len(await listing(url)) == 7


@gen_test(timeout=60)
async def test_two_clusters_sharing_a_store(tmp_path: Path) -> None:
    """A cluster never deletes what another live cluster holds."""
    url = str(tmp_path / "store")
    store = Store.from_url(url)
    CALLS.clear()
    async with storage_cluster(url) as (c1, s1, p1):
        shared = c1.compute(delayed(inc)(1, dask_key_name="shared"))
        await wait(shared)

        async def published() -> bool:
            # Cluster 1's background round: catalog flushed, lease written.
            return "shared" in await cataloged_keys(store) and "shared" in await leased_keys(store)

        await async_poll_until(published, timeout=10, what="catalog flush and lease")
        async with storage_cluster(url) as (c2, s2, p2):
            # In cluster 2, "shared" is an intermediate: reused, then forgotten.
            out = delayed(inc)(delayed(inc)(1, dask_key_name="shared"), dask_key_name="out")
            assert await c2.compute(out) == 3

            assert p2.reuse.reused_total == 1
            # "shared" was asked for in cluster 1, so the catalog keeps it anyway; delete it
            # as cluster 2's policy would an intermediate: cluster 1's lease must stop it.
            token = await stored_token(store, "shared")
            entry = p2.catalog.get("shared", token)
            assert entry is not None
            p2.catalog.discard("shared", token)
            p2.retention.doomed["shared", token] = (0, entry)
            await p2.retention.delete_doomed(now=True)
            assert not p2.retention.doomed and p2.retention.deleted_total == 0
        assert "shared" in await listing(url)
        assert await shared == 2
    assert CALLS == [("inc", 1), ("inc", 2)]
    store.close()


@gen_test(timeout=60)
async def test_compute_of_a_collection_is_reused(tmp_path: Path) -> None:
    """Client.compute wraps a collection in a new finalize key at every call: what it
    wraps is the result that is kept and reused, and the wrapper is not stored."""
    url = str(tmp_path / "store")
    x = da.arange(60, chunks=10).map_blocks(lambda b: record("block", b + 1), dtype=int)
    CALLS.clear()
    for _ in range(2):
        async with storage_cluster(url) as (c, s, plugin):
            np.testing.assert_array_equal(await c.compute(x), np.arange(60) + 1)
    assert CALLS == ["block"] * 6
    keys = await listing(url)
    assert not any(str(k).startswith("finalize") for k in keys)
    assert sum(1 for k in keys if isinstance(k, tuple) and k[0] == x.name) == 6


def test_dask_compute_of_a_reduction_is_reused(tmp_path: Path) -> None:
    """``.compute()`` (``dask.compute``) fuses the finalize wrapper with a reduction's
    last task, under a new name at every call: that task's inputs are what is kept, so a
    new cluster runs only the fused last step again."""
    url = str(tmp_path / "store")
    x = da.arange(60, chunks=10).map_blocks(lambda b: record("block", b + 1), dtype=int)
    CALLS.clear()
    for _ in range(2):
        with preloaded_cluster(url):
            assert x.sum().compute() == sum(range(1, 61))
    assert CALLS == ["block"] * 6


class FileTarget:
    """An array target that writes every region it is given to a file of its own."""

    def __init__(self, directory: str):
        self.directory = directory

    def __setitem__(self, region: tuple[slice, ...], value: np.ndarray) -> None:
        Path(self.directory, f"{region[0].start}.npy").write_bytes(value.tobytes())


def save(value: int, path: str) -> str:
    Path(path).write_text(str(value))
    return path


def test_writers_run_again_on_a_new_cluster(tmp_path: Path) -> None:
    """Tasks that write (``da.store``, ``to_textfiles``, a function returning None) are not
    stored: on a new cluster they run again, even when everything upstream is reused, so
    outputs deleted meanwhile are written again."""
    import dask.bag as db

    url = str(tmp_path / "store")
    out = tmp_path / "out"
    x = da.arange(60, chunks=10).map_blocks(lambda b: record("block", b + 1), dtype=int)
    lines = db.from_sequence(["a", "b", "c"], npartitions=3)
    CALLS.clear()
    for _ in range(2):
        out.mkdir()
        with preloaded_cluster(url):
            kept = x.persist()
            da.store(kept, FileTarget(str(out)), lock=False)
            lines.to_textfiles(str(out / "*.txt"))
            dask.compute(delayed(Path.write_text)(out / "none.txt", "x"))
        expected = {*(f"{i}.npy" for i in range(0, 60, 10)), "0.txt", "1.txt", "2.txt", "none.txt"}
        assert {p.name for p in out.iterdir()} == expected
        shutil.rmtree(out)
    assert CALLS == ["block"] * 6  # the persisted input was reused


def upstream_a() -> int:
    CALLS.append("up-a")
    return 1


def upstream_b() -> int:
    CALLS.append("up-b")
    return 1000


def downstream(x: int) -> int:
    CALLS.append("down")
    return x + 1


@pytest.mark.parametrize("durability", ["write-through", "write-behind"])
@pytest.mark.parametrize("lineage", [False, True])
@gen_test(timeout=60)
async def test_lineage_option(tmp_path: Path, lineage: bool, durability: str) -> None:
    """An upstream task edited under the same key: only lineage tokens notice it. With
    write-behind, a write lands after its key was released: its lineage is recorded all
    the same."""
    url = str(tmp_path / "store")
    CALLS.clear()
    config = {"storage-scheduler.lineage": lineage, "storage-scheduler.durability": durability}
    with dask.config.set(config):
        for up, repeat in [(upstream_a, 0), (upstream_a, 1), (upstream_b, 2)]:
            async with storage_cluster(url) as (c, s, plugin):
                d = delayed(downstream)(delayed(up)(dask_key_name="up"), dask_key_name="down")
                result = await c.compute(d)
            if repeat == 1:
                assert CALLS == ["up-a", "down"]  # unchanged: reused in both modes
    if lineage:
        assert result == 1001 and CALLS == ["up-a", "down", "up-b", "down"]
    else:
        assert result == 2 and CALLS == ["up-a", "down"]  # the documented limit without it


@gen_test(timeout=120)
async def test_lineage_on_a_deep_chain(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    CALLS.clear()
    with dask.config.set({"storage-scheduler.lineage": True}):
        for _ in range(2):
            async with storage_cluster(url) as (c, s, plugin):
                x = delayed(inc)(0, dask_key_name="chain-0")
                for i in range(1, 1500):  # deeper than Python's recursion limit
                    x = delayed(inc)(x, dask_key_name=f"chain-{i}")
                assert await c.compute(x) == 1500
    assert len(CALLS) == 1500


@gen_test(timeout=90)
async def test_p2p_rechunk_stores_outputs_not_shuffle_steps(tmp_path: Path) -> None:
    """A P2P rechunk's outputs are stored and reused; its transfers and barrier never are.

    A stored transfer "reused" without the shuffle run it fed would leave the outputs
    incomplete; reusing the outputs makes the whole shuffle unnecessary instead.
    """
    url = str(tmp_path / "store")
    x = da.random.default_rng(0).random((60, 60), chunks=(60, 5))
    y = x.rechunk((5, 60), method="p2p")
    expected = x.compute(scheduler="sync")
    async with storage_cluster(url) as (c, s, plugin):
        z = c.persist(y)
        np.testing.assert_array_equal(await c.compute(z), expected)
        keys = await listing(url)
        names = {dask.utils.key_split(k) for k in keys}
        assert {k for k in keys if isinstance(k, tuple) and k[0] == y.name} == {
            (y.name, i, 0) for i in range(12)
        }
        assert not {n for n in names if "transfer" in n or "barrier" in n}, names

    async with storage_cluster(url) as (c, s, plugin):
        z = c.persist(y)
        np.testing.assert_array_equal(await c.compute(z), expected)
        ran = {dask.utils.key_split(t[0]) for t in s.transition_log if t[2] == "memory"}
        assert not {n for n in ran if "transfer" in n or "barrier" in n}, ran
        assert plugin.reuse.reused_total >= 12


@gen_test(timeout=60)
async def test_half_applied_reuse_is_undone(tmp_path: Path) -> None:
    """A plan that fails midway leaves the graph exactly as stock Dask built it."""
    from distributed.diagnostics.plugin import SchedulerPlugin

    from storage_scheduler.scheduler.reuse import ReusePlan

    outcome: dict[str, Any] = {}

    class ApplyBrokenPlan(SchedulerPlugin):
        def update_graph(self, scheduler: Any, *, keys: set[Any], **kwargs: Any) -> None:
            if "leaf-0" not in scheduler.tasks or "applied" in outcome:
                return
            storage = scheduler.plugins["storage-scheduler"]
            # leaf-0 would be put in memory; then a key the scheduler does not know fails.
            plan = ReusePlan(in_memory={"leaf-0": 8}, loaders=["total", "no-such-key"])
            outcome["applied"] = storage.reuse.apply(plan)
            ts = scheduler.tasks["leaf-0"]
            outcome["leaf-0"] = (ts.state, {ws.address for ws in ts.who_has or ()})
            outcome["total-deps"] = len(scheduler.tasks["total"].dependencies)
            outcome["loaders"] = dict(storage.reuse.loaders)

    CALLS.clear()
    url = str(tmp_path / "store")
    async with storage_cluster(url) as (c, s, plugin):
        await s.register_scheduler_plugin(ApplyBrokenPlan(), name="probe", idempotent=False)
        assert await c.compute(graph(3)) == sum(range(2, 5))
        assert plugin.reuse.reused_total == 0
    assert outcome == {
        "applied": False,
        "leaf-0": ("released", set()),
        "total-deps": 3,
        "loaders": {},
    }
    assert len(CALLS) == 7  # everything computed


def code_a() -> str:
    return "a"


def code_b() -> str:
    return "b"


@gen_test(timeout=90)
async def test_two_clusters_different_code_same_key(tmp_path: Path) -> None:
    """Each cluster gets its own result for a key, before and after the other writes;
    both results stay in the store, and a third cluster with either code reuses its own."""
    url = str(tmp_path / "store")
    store = Store.from_url(url)
    a, b = delayed(code_a)(dask_key_name="k"), delayed(code_b)(dask_key_name="k")

    async def versions() -> set[str]:
        return {h.token for h in await stored_headers(store, "k")}

    try:
        async with storage_cluster(url) as (c1, s1, p1):
            assert await c1.compute(a) == "a"
            async with storage_cluster(url) as (c2, s2, p2):
                assert await c2.compute(b) == "b"
                assert len(await versions()) == 2  # two objects: nothing overwritten
                # Each reads its own, after the other wrote.
                assert await c1.compute(a) == "a" and await c2.compute(b) == "b"
        for code, value in [(a, "a"), (b, "b"), (a, "a")]:
            async with storage_cluster(url) as (c3, s3, p3):
                assert await c3.compute(code) == value
                assert p3.reuse.reused_total == 1  # reused, not computed
        assert len(await versions()) == 2
        catalog = Catalog(store)
        await catalog.load()
        assert {e.token for e in catalog.versions("k")} == await versions()
    finally:
        store.close()


@gen_test(timeout=60)
async def test_loaded_result_whose_object_is_lost_is_computed(tmp_path: Path) -> None:
    """A requested key loaded from the store is its original task again afterwards: if
    its object goes, it is recomputed (it used to reschedule its loader forever)."""
    url = str(tmp_path / "store")
    CALLS.clear()
    async with storage_cluster(url) as (c, s, plugin):
        assert await c.compute(graph(3)) == sum(range(2, 5))
    CALLS.clear()
    async with storage_cluster(url) as (c, s, plugin):
        total = c.compute(graph(3))
        assert await total == sum(range(2, 5))
        assert CALLS == [] and plugin.reuse.reused_total == 1
        # Only the store holds "total" now, and its object is gone.
        holders = [ws.address for ws in s.tasks["total"].who_has if ws.address in s.workers]
        await c.retire_workers(holders)
        store = Store.from_url(url)
        await store.delete_versions([("total", plugin.lanes.tokens["total"])])
        store.close()
        after = c.submit(inc, total, key="after")
        assert await asyncio.wait_for(after, 30) == sum(range(2, 5)) + 1
    assert "total" in CALLS  # recomputed, from its original task and dependencies


@gen_test(timeout=60)
async def test_storing_again_cancels_a_pending_deletion(tmp_path: Path) -> None:
    """An intermediate doomed for deletion and then stored again keeps its new object."""
    url = str(tmp_path / "store")
    with dask.config.set({"storage-scheduler.flush-interval": "1h"}):  # deletions by hand
        async with storage_cluster(url) as (c, s, plugin):
            x = delayed(inc)(1, dask_key_name="x")
            assert await c.compute(delayed(inc)(x, dask_key_name="y")) == 3
            token = plugin.lanes.tokens["x"]
            assert ("x", token) in plugin.retention.doomed  # an intermediate nobody needs
            assert await c.compute(x) == 2  # asked for now: computed and stored again
            await plugin.retention.maintain()
            assert "x" in plugin.catalog
            assert "x" in await listing(url)


@gen_test(timeout=60)
async def test_objects_are_deleted_only_once_the_catalog_says_so(tmp_path: Path) -> None:
    """While catalog changes cannot be written, doomed objects stay: the store's catalog
    never lists a result whose object is gone (a later cluster would plan to read it)."""
    faults = FaultyFileSystem.faults
    url = f"faulty://{tmp_path}/store"
    with dask.config.set({"storage-scheduler.flush-interval": "1h"}):  # rounds by hand
        async with storage_cluster(url) as (c, s, plugin):
            x = delayed(inc)(1, dask_key_name="x")
            assert await c.compute(delayed(inc)(x, dask_key_name="y")) == 3
            assert ("x", plugin.lanes.tokens["x"]) in plugin.retention.doomed
            faults.fail_writes(errno.ENOSPC)
            try:
                for _ in range(3):  # the deletion is due after a round
                    with pytest.raises(OSError):
                        await plugin.retention.maintain()
                assert "x" in await listing(url)
            finally:
                faults.reset()
            await plugin.retention.maintain()
            await plugin.retention.maintain()
            assert "x" not in await listing(url)
            assert "x" not in await cataloged_keys(plugin.store)


@gen_test(timeout=60)
async def test_a_later_run_keeps_what_an_earlier_run_asked_for(tmp_path: Path) -> None:
    """Requested results are kept in the catalog: another run that reuses one as an
    intermediate does not delete it."""
    url = str(tmp_path / "store")
    y = delayed(inc)(1, dask_key_name="y")
    async with storage_cluster(url) as (c, s, plugin):
        assert await c.compute(y) == 2
    async with storage_cluster(url) as (c, s, plugin):
        z = delayed(inc)(y, dask_key_name="z")
        assert await c.compute(z) == 3
        assert plugin.reuse.reused_total == 1  # y, as an intermediate of z
        await async_poll_until(lambda: not plugin.retention.doomed, what="deletions done")
    assert {"y", "z"} <= await listing(url)
    store = Store.from_url(url)
    assert (await cataloged_keys(store)) >= {"y", "z"}
    store.close()


@gen_test(timeout=90)
async def test_two_in_process_clusters_read_their_own_versions(tmp_path: Path) -> None:
    """Two clusters in one process on one store (two LocalCluster(processes=False) on the
    default store): each one's lane reads find its own result of a shared key."""
    url = str(tmp_path / "store")
    a, b = delayed(code_a)(dask_key_name="k"), delayed(code_b)(dask_key_name="k")
    async with storage_cluster(url) as (c1, s1, p1), storage_cluster(url) as (c2, s2, p2):
        f1, f2 = c1.compute(a), c2.compute(b)
        assert await f1 == "a" and await f2 == "b"
        for c, s in [(c1, s1), (c2, s2)]:  # only the store holds k now
            await c.retire_workers(
                [ws.address for ws in s.tasks["k"].who_has if ws in s.workers.values()]
            )
        assert await c1.gather(f1) == "a" and await c2.gather(f2) == "b"
        assert p1.store_id != p2.store_id


@gen_test(timeout=90)
async def test_tokens_of_stored_keys_are_computed_off_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Planning on the event loop only compares tokens: the stored keys' tokens were
    computed in the thread that materialized the graph."""
    from storage_scheduler.scheduler import reuse

    url = str(tmp_path / "store")
    with dask.annotate(storage_version="v1"):
        salted = delayed(version_a)(1, dask_key_name="salted")
    async with storage_cluster(url) as (c, s, plugin):
        assert await c.compute(graph()) == sum(range(2, 22))
        assert await c.compute(salted) == 2

    loop_thread = threading.get_ident()
    on_loop: list[Any] = []

    def result_token(spec: Any, *args: Any) -> str:
        if threading.get_ident() == loop_thread:
            on_loop.append(spec.key)
        return original(spec, *args)

    original = reuse.result_token
    monkeypatch.setattr(reuse, "result_token", result_token)
    CALLS.clear()
    async with storage_cluster(url) as (c, s, plugin):
        assert await c.compute(graph()) == sum(range(2, 22))
        assert await c.compute(salted) == 2
        assert plugin.reuse.reused_total == 2
        assert not plugin.reuse.tokens._ahead  # nothing kept once planned
    assert on_loop == []
    assert CALLS == []
