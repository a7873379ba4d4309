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
    catalog.discard("y")
    catalog.add(("x", 1), "tok-2", 200)  # overwritten
    await catalog.flush()
    again = await reload(store)
    assert set(again.entries) == {("x", 1), 2**70}
    assert again.get(("x", 1)).token == "tok-2" and again.nbytes == 201
    assert catalog.nbytes == again.nbytes


async def test_compaction_at_load(store: Store) -> None:
    catalog = Catalog(store)
    for i in range(COMPACT_AFTER + 3):
        catalog.add(("k", i), f"t{i}", i)
        if i % 5 == 0:
            catalog.discard(("k", i))
        await catalog.flush()
    again = await reload(store)
    assert len(await store.list_files("manifest")) == 1  # compacted into one snapshot
    assert set(again.entries) == {("k", i) for i in range(COMPACT_AFTER + 3) if i % 5}
    assert set((await reload(store)).entries) == set(again.entries)


async def test_two_writers(store: Store) -> None:
    a, b = Catalog(store, "a"), Catalog(store, "b")
    a.add("from-a", "t", 1)
    b.add("from-b", "t", 2)
    await a.flush()
    await b.flush()
    assert set((await reload(store)).entries) == {"from-a", "from-b"}


async def test_damaged_segment_is_skipped(store: Store) -> None:
    catalog = Catalog(store)
    catalog.add("good", "t", 1)
    await catalog.flush()
    await store.write_file("manifest/99999999999999999999-bad-000001.seg", b"\x00garbage")
    assert set((await reload(store)).entries) == {"good"}


async def test_rebuild_from_objects(store: Store) -> None:
    await store.put("a", 1, token="ta")
    await store.put(("b", 2), [1, 2], token="tb")
    await store.put("c" * 400, 3, token="tc")  # named by digest: read from its header
    catalog = Catalog(store)
    assert await catalog.rebuild() == 3
    again = await reload(store)
    assert {k: e.token for k, e in again.entries.items()} == {
        "a": "ta",
        ("b", 2): "tb",
        "c" * 400: "tc",
    }


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
