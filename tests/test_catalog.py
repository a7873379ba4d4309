"""The catalog and its manifest, on every backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from storage_scheduler import Store
from storage_scheduler.store.catalog import COMPACT_AFTER, Catalog

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
