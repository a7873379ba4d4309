"""The catalog and its manifest, on every backend."""

from __future__ import annotations

import asyncio
import gc
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import numpy as np
import pytest
import pytest_asyncio

from storage_scheduler import Store
from storage_scheduler.store._segments import decode_segment, encode_segment, encode_snapshot
from storage_scheduler.store.catalog import COMPACT_AFTER, Catalog, Entry
from storage_scheduler.store.serialize import key_to_msgpack

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def store(store_url: tuple[str, dict[str, Any]]) -> AsyncIterator[Store]:
    url, options = store_url
    s = Store.from_url(url, **options)
    yield s
    s.close()


async def reload(store: Store) -> Catalog:
    catalog = Catalog(store)
    await catalog.load()
    return catalog


async def test_round_trip(store: Store) -> None:
    catalog = Catalog(store, "writer-a")
    catalog.add(("x", 1), "tok-1", 100)
    catalog.add("y", None, 5)
    catalog.add(2**70, "big", 1)
    assert await catalog.flush() == 3
    assert await catalog.flush() == 0  # nothing pending
    catalog.discard("y", None)
    catalog.add(("x", 1), "tok-1", 200)  # stored again
    await catalog.flush()
    again = await reload(store)
    assert set(again.entries) == {("x", 1), 2**70}
    assert again.get(("x", 1), "tok-1").nbytes == 200 and again.nbytes == 201
    assert catalog.nbytes == again.nbytes and len(again) == 2


async def test_two_writers_and_versions_of_one_key(store: Store) -> None:
    a, b = Catalog(store, "a"), Catalog(store, "b")
    a.add("k", "code-a", 10)
    b.add("k", "code-b", 20)
    await a.flush()
    await b.flush()
    again = await reload(store)
    assert {e.token for e in again.versions("k")} == {"code-a", "code-b"}
    assert again.get("k", "code-a").nbytes == 10 and again.get("k", "code-b").nbytes == 20
    assert again.get("k", "code-c") is None and len(again) == 2 and again.nbytes == 30
    # Forgetting one version leaves the other, through a flush and a reload.
    b.discard("k", "code-b")
    await b.flush()
    again = await reload(store)
    assert [e.token for e in again.versions("k")] == ["code-a"] and again.nbytes == 10
    # And a compaction keeps every version.
    a.add("k", "code-b", 5)
    await a.compact()
    again = await reload(store)
    assert {(e.token, e.nbytes) for e in again.versions("k")} == {("code-a", 10), ("code-b", 5)}


async def test_compaction_at_load(store: Store) -> None:
    catalog = Catalog(store)
    for i in range(COMPACT_AFTER + 3):
        catalog.add(("k", i), f"t{i}", i)
        if i % 5 == 0:
            catalog.discard(("k", i), f"t{i}")
        await catalog.flush()
    again = await reload(store)
    assert len(await store.list_files("manifest")) == 1  # compacted into one snapshot
    assert set(again.entries) == {("k", i) for i in range(COMPACT_AFTER + 3) if i % 5}
    assert set((await reload(store)).entries) == set(again.entries)


async def test_damaged_segment_is_quarantined_not_deleted(store: Store) -> None:
    catalog = Catalog(store)
    catalog.add("good", "t", 1)
    await catalog.flush()
    bad = "manifest/99999999999999999999-bad-000001.seg"
    await store.write_file(bad, b"\x00garbage")
    reader = Catalog(store)
    await reader.load(compact=False)  # a reader: leaves it where it is
    assert set(reader.entries) == {"good"} and bad in await store.list_files("manifest")
    assert set((await reload(store)).entries) == {"good"}
    # A writer moved it aside: out of the manifest, kept for inspection and rebuild.
    assert bad not in await store.list_files("manifest")
    assert await store.read_file(f"quarantine/{bad}") == b"\x00garbage"
    # Compactions never delete it.
    for i in range(COMPACT_AFTER + 1):
        catalog.add(("k", i), "t", 1)
        await catalog.flush()
    await reload(store)
    assert await store.list_files("quarantine") == [f"quarantine/{bad}"]


async def test_rebuild_from_objects(store: Store) -> None:
    await store.put("a", 1, token="ta")
    await store.put(("b", 2), [1, 2], token="tb")
    await store.put("c" * 400, 3, token="tc")  # named by digest: read from its header
    await store.put("a", 2, token="ta2")  # a second version of "a"
    catalog = Catalog(store)
    assert await catalog.rebuild() == []
    again = await reload(store)
    assert sorted((str(k), e.token) for k, e in again.items()) == sorted(
        [("a", "ta"), ("a", "ta2"), (str(("b", 2)), "tb"), ("c" * 400, "tc")]
    )


async def test_rebuild_carries_on_past_bad_files(store: Store) -> None:
    await store.put("a", 1, token="ta")
    await store.put("b", 1, token="tb")
    # A stray file, an empty object and an object copied to another version's name.
    stray = f"{store.root}/objects/zz/not-an-object.txt"
    empty = store.path("e", "te")
    moved = store.path("b", "other")
    for path, data in [(stray, b"hello"), (empty, b"")]:
        await store._backend.write(path, [data])
    await store._backend.write(moved, [await store.read_path(store.path("b", "tb"))])
    catalog = Catalog(store)
    problems = dict(await catalog.rebuild())
    assert set(problems) == {stray, empty, moved}
    assert {(k, e.token) for k, e in catalog.items()} == {("a", "ta"), ("b", "tb")}


async def test_a_deletion_deletes_only_the_write_it_saw(store: Store) -> None:
    """Cluster b stored a result again after cluster a did; a deleting its own write
    leaves b's entry (and b's object) in the catalog every cluster loads."""
    a, b = Catalog(store, "a"), Catalog(store, "b")
    a.add("k", "t", 1, created=100.0)
    await a.flush()
    b.add("k", "t", 1, created=200.0)  # written again: a newer object
    await b.flush()
    a.discard("k", "t")
    await a.flush()
    assert (await reload(store)).get("k", "t") == Entry("t", 1, 200.0)
    await a.refresh()
    assert a.get("k", "t") == Entry("t", 1, 200.0)
    b.discard("k", "t")  # its own write: gone for everyone
    await b.flush()
    assert "k" not in (await reload(store)).entries
    await a.refresh()
    assert a.get("k", "t") is None


async def test_failed_flush_keeps_changes(store: Store) -> None:
    class Broken(Store):
        fail = True

        async def write_file(self, name: str, data: bytes) -> None:
            if self.fail:
                raise ConnectionRefusedError("store down")
            await super().write_file(name, data)

    broken = Broken(store.settings)
    catalog = Catalog(broken)
    catalog.add("x", "t", 1)
    with pytest.raises(ConnectionRefusedError):
        await catalog.flush()
    catalog.add("y", "t", 1)
    broken.fail = False
    assert await catalog.flush() == 2
    assert set((await reload(store)).entries) == {"x", "y"}
    broken.close()


async def test_flush_cancelled_at_any_step_keeps_changes(store: Store) -> None:
    """A closing scheduler cancels its maintenance task wherever it is: the changes of a
    flush cut short are written by the next one (else a result a client asked for is
    missing from the catalog and the objects of deleted results stay listed)."""
    for steps in range(8):  # cancel after 0, 1, 2, ... passes of the event loop
        catalog = Catalog(store, f"writer-{steps}")
        catalog.add(("k", steps), "t", 1)
        flush = asyncio.create_task(catalog.flush())
        for _ in range(steps):
            await asyncio.sleep(0)
        flush.cancel()
        await asyncio.gather(flush, return_exceptions=True)
        await catalog.flush()
        assert ("k", steps) in (await reload(store)).entries, steps


@pytest.mark.parametrize("n", [0, 15, 16, 10_000, 70_000])
async def test_segments_encoded_in_slices_are_the_bytes_of_one_call(n: int) -> None:
    """A segment is encoded a slice at a time, into the bytes msgpack makes of the whole
    map in one call (array headers change size at 16 and 65,536 items): segments written
    before and after read the same."""
    added = [
        (
            (("x", i, 2**70 + i), ("y", np.int64(i), (i / 2, b"b")), f"k{i}")[i % 3],
            Entry(None if i % 5 == 0 else f"{i:032x}", i, i / 7, i % 2 == 0, f"l{i}" or None),
        )
        for i in range(n)
    ]
    deleted = [
        (("d", i), None if i % 2 else f"t{i}", i / 3 if i % 3 else None) for i in range(n // 3)
    ]
    one_call = msgpack.packb(
        {
            "version": 2,
            "keys": [key_to_msgpack(k) for k, _ in added],
            "tokens": [e.token for _, e in added],
            "nbytes": [e.nbytes for _, e in added],
            "created": [e.created for _, e in added],
            "kept": [e.kept for _, e in added],
            "lineage": [e.lineage for _, e in added],
            "deleted": [key_to_msgpack(k) for k, _, _ in deleted],
            "deleted_tokens": [t for _, t, _ in deleted],
            "deleted_created": [c for _, _, c in deleted],
        },
        use_bin_type=True,
    )
    assert encode_segment(added, deleted) == one_call
    assert decode_segment(one_call) == (added, deleted)
    assert encode_snapshot(dict(added)) == encode_segment(added, [])


async def test_compacting_a_big_catalog_lets_the_loop_run(tmp_path: Any) -> None:
    """Compacting a catalog of 400,000 entries (snapshot, encoding, writing) never holds
    the event loop: a loop step of 20 system calls stays quick meanwhile."""
    store = Store.from_url(str(tmp_path / "store"))
    try:
        catalog = Catalog(store)
        for i in range(400_000):
            catalog.add(("array-abc", i, i % 7), f"{i:032x}", 8)
        await catalog.flush()  # as the flush interval does, in smaller batches
        gc.collect()
        gc.disable()  # a full collection of the process is another stall
        longest = 0.0
        compacting = asyncio.create_task(catalog.compact())
        while not compacting.done():
            start, cpu = time.perf_counter(), time.process_time()
            await asyncio.sleep(0.005)
            for _ in range(20):
                os.stat(tmp_path)  # lets go of the GIL, then needs it back
            late = min(time.perf_counter() - start, time.process_time() - cpu) - 0.005
            longest = max(longest, late)
        await compacting
        assert longest < 0.08, f"the event loop was held {longest * 1000:.0f} ms"
        assert len(await reload(store)) == 400_000
    finally:
        gc.enable()
        store.close()
