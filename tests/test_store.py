"""The store contract, run against memory://, a local directory and S3 (moto)."""

from __future__ import annotations

import asyncio
import mmap
import os
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pandas as pd
import pytest
import pytest_asyncio

from distributed.protocol import deserialize
from distributed.protocol.serialize import Serialized

from storage_scheduler import IntegrityError, MissingObjectError, Store

pytestmark = pytest.mark.asyncio

ODD_KEYS = [
    "x",
    ("x", 0),
    ("nested", ("tuple", 1, 2.5), -3),
    "a/b/c",
    "../../escape",
    "/abs/path",
    "nul\x00byte",
    b"bytes-key",
    2**70,
    1.5,
    "é" * 300,  # long: named by its digest
    ("long",) * 200,
]


@pytest_asyncio.fixture
async def store(store_url: tuple[str, dict[str, Any]]) -> AsyncIterator[Store]:
    url, options = store_url
    s = Store.from_url(url, **options)
    yield s
    s.close()


async def damage(store: Store, key: object, fn: Any) -> None:
    """Rewrite a key's object in place with ``fn(bytes) -> bytes`` behind the store's back."""
    path = store.path(key)
    data = store.fs.cat_file(path)
    store.fs.pipe_file(path, fn(data))


def assert_same(a: object, b: object) -> None:
    if isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype and a.shape == b.shape
    elif isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b)
    else:
        assert a == b


VALUES = [
    0,
    None,
    b"",
    "text",
    {"a": [1, 2, 3]},
    np.arange(1000, dtype="f8"),
    np.empty(0, dtype="i4"),
    np.array(3.5),  # 0-d
    np.zeros((3, 0)),
    pd.DataFrame({"a": [1, 2], "b": ["x", "y"]}),
    pd.DataFrame({"a": []}),
]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
async def test_put_get_round_trip(store: Store, value: object) -> None:
    nbytes = await store.put("k", value)
    assert nbytes > 0
    assert_same(await store.get("k"), value)
    assert await store.list() == {"k": nbytes}


async def test_numpy_read_back_writeable(store: Store) -> None:
    await store.put("arr", np.arange(100_000))
    out = await store.get("arr")
    out[0] = 7  # distributed code may update arrays in place
    assert out[0] == 7


async def test_odd_keys(store: Store) -> None:
    for i, key in enumerate(ODD_KEYS):
        await store.put(key, i)
    for i, key in enumerate(ODD_KEYS):
        assert await store.get(key) == i
        assert store.path(key).startswith(store.root + "/objects/")
    listing = await store.list()
    assert set(listing) == set(ODD_KEYS)
    assert len(listing) == len(ODD_KEYS)


async def test_exists_sizes_many(store: Store) -> None:
    keys = [("k", i) for i in range(50)]
    await asyncio.gather(*(store.put(k, i) for i, k in enumerate(keys[::2])))
    sizes = await store.list()
    assert set(sizes) == set(keys[::2]) and all(n > 0 for n in sizes.values())


async def test_delete(store: Store) -> None:
    await store.put("a", 1)
    await store.put("b", 2)
    await store.delete(["a", "never-written"])
    assert set(await store.list()) == {"b"}
    await store.delete([])


async def test_missing_key(store: Store) -> None:
    with pytest.raises(MissingObjectError, match="no stored result for key 'nope'") as info:
        await store.get("nope")
    assert isinstance(info.value, FileNotFoundError)
    assert store.url.split("://")[-1].lstrip("/") in str(info.value)


async def test_overwrite_same_version(store: Store) -> None:
    await store.put("k", "old", token="t")
    await store.put("k", "new", token="t")
    assert await store.get("k", "t") == "new"
    assert (await store.head("k", "t")).token == "t"


async def test_versions_are_separate_objects(store: Store) -> None:
    """Results of one key with different tokens (other code) never share an object."""
    await store.put("k", "unversioned")
    await store.put("k", "from code a", token="a")
    await store.put("k", "from code b", token="b")
    assert await store.get("k", "a") == "from code a"
    assert await store.get("k", "b") == "from code b"
    assert await store.get("k") == "unversioned"
    assert len({store.path("k"), store.path("k", "a"), store.path("k", "b")}) == 3
    with pytest.raises(MissingObjectError):
        await store.get("k", "c")
    await store.delete_versions([("k", "a")])
    assert await store.get("k", "b") == "from code b"
    with pytest.raises(MissingObjectError):
        await store.get("k", "a")
    sizes = await store.find("objects")
    assert await store.list() == {"k": sizes[store.path("k")] + sizes[store.path("k", "b")]}
    assert set(sizes) == {store.path("k"), store.path("k", "b")}


async def test_head(store: Store) -> None:
    await store.put(("x", 1), np.ones(10), token="abc")
    head = await store.head(("x", 1), "abc")
    assert head.key == ("x", 1)
    assert head.token == "abc"
    assert head.type == "ndarray"
    assert head.nbytes >= 80


async def test_get_serialized_does_not_unpickle(store: Store) -> None:
    value = {"a": np.arange(10)}
    await store.put("k", value)
    ser = await store.get_serialized("k")
    assert isinstance(ser, Serialized)
    assert all(c is None for c in ser.header.get("compression", ()))
    out = deserialize(ser.header, ser.frames)
    np.testing.assert_array_equal(out["a"], value["a"])


async def test_compressible_data_round_trips(store: Store) -> None:
    value = np.zeros(1_000_000)  # compresses, if a compressor is installed
    await store.put("z", value)
    np.testing.assert_array_equal(await store.get("z"), value)
    ser = await store.get_serialized("z")
    np.testing.assert_array_equal(deserialize(ser.header, ser.frames), value)


# The second size is read by mapping the file on a local filesystem (MAP_MIN_BYTES).
SIZES = pytest.mark.parametrize("n", [1000, 2**18], ids=["small", "mapped"])


@SIZES
async def test_corrupted_object(store: Store, n: int) -> None:
    await store.put("k", np.arange(n))

    def flip(data: bytes) -> bytes:
        b = bytearray(data)
        b[-100] ^= 0xFF
        return bytes(b)

    await damage(store, "k", flip)
    with pytest.raises(IntegrityError, match=r"corrupted object .*checksum"):
        await store.get("k")
    with pytest.raises(IntegrityError):
        await store.get_serialized("k")


@SIZES
async def test_truncated_object(store: Store, n: int) -> None:
    await store.put("k", np.arange(n))
    await damage(store, "k", lambda d: d[: len(d) // 2])
    with pytest.raises(IntegrityError, match="truncated object"):
        await store.get("k")
    await damage(store, "k", lambda d: d[:5])
    with pytest.raises(IntegrityError, match="truncated object"):
        await store.get("k")


async def test_foreign_object(store: Store) -> None:
    await store.put("k", 1)
    await damage(store, "k", lambda d: b"not ours at all" * 10)
    with pytest.raises(IntegrityError, match="not a storage_scheduler object"):
        await store.get("k")


async def test_misplaced_object(store: Store) -> None:
    await store.put("a", 1)
    store.fs.makedirs(store.path("b").rsplit("/", 1)[0], exist_ok=True)
    store.fs.pipe_file(store.path("b"), store.fs.cat_file(store.path("a")))
    with pytest.raises(IntegrityError, match="holds key 'a', not 'b'"):
        await store.get("b")


async def test_concurrent_writers_same_key(store: Store) -> None:
    values = [np.full(50_000, i) for i in range(16)]
    await asyncio.gather(*(store.put("k", v) for v in values))
    out = await store.get("k")
    assert any(np.array_equal(out, v) for v in values)


async def test_readers_never_see_partial_objects(store: Store) -> None:
    """Readers racing with writers get a whole value or nothing, never a torn one."""
    values = [np.full(500_000, i, dtype="i8") for i in range(8)]
    seen: list[int] = []

    async def reader() -> None:
        for _ in range(20):
            try:
                out = await store.get("k")
            except MissingObjectError:
                continue
            assert out[0] == out[-1]  # one writer's whole array
            seen.append(int(out[0]))

    await asyncio.gather(*(store.put("k", v) for v in values), reader(), reader())
    assert int((await store.get("k"))[0]) in range(8)


async def test_check_and_listing_ignore_probe(store: Store) -> None:
    await store.check()
    assert await store.list() == {}


async def test_list_skips_unfinished_writes(store: Store) -> None:
    await store.put("k", 1)
    store.fs.pipe_file(store.path("k") + ".tmp-deadbeef", b"partial")
    assert set(await store.list()) == {"k"}


async def test_unpicklable_value_raises_and_stores_nothing(store: Store) -> None:
    import threading

    with pytest.raises(Exception, match="lock"):
        await store.put("k", threading.Lock())
    assert await store.list() == {}


async def test_large_local_objects_are_mapped(tmp_path: Any) -> None:
    """Large objects on a local disk are read by mapping the file: no copy, writeable, and
    unaffected by the object being overwritten or deleted afterwards."""
    store = Store.from_url(str(tmp_path))
    try:
        assert store._backend.map_reads  # /tmp is a local filesystem on the machines we test on
        x = np.arange(2**18)
        await store.put("k", x)
        got = await store.get("k")
        assert any(isinstance(b, mmap.mmap) for b in _bases(got))
        await store.put("k", x + 1)  # replaced by rename: the mapped file is unchanged
        await store.delete(["k"])  # unlinked: still mapped, still readable
        np.testing.assert_array_equal(got, x)
        got[0] = -1  # private mapping: writeable, and the write stays in this process
        assert got[0] == -1
        await store.put("s", np.arange(10))
        small = await store.get("s")
        assert not any(isinstance(b, mmap.mmap) for b in _bases(small))
    finally:
        store.close()


async def test_small_local_objects_stay_on_the_loop(tmp_path: Any) -> None:
    """Small objects on a local disk are written and read without the thread pool (it
    starts no thread); a large one, or one whose size is not given, goes through it."""
    store = Store.from_url(str(tmp_path))
    try:
        assert store.inline_max_bytes == 64 << 10
        small = np.arange(1000)
        await store.put("s", small, token="t", nbytes=small.nbytes)
        np.testing.assert_array_equal(await store.get("s", "t"), small)
        assert (await store.get_serialized("s", "t")).header
        assert store._executor._threads == set()
        await store.put("u", 1)  # no size: encoded in a thread
        assert len(store._executor._threads) == 1
        large = np.arange(2**14)  # 128 KiB
        await store.put("l", large, nbytes=large.nbytes)
        np.testing.assert_array_equal(await store.get("l"), large)
    finally:
        store.close()


def _bases(a: Any) -> list[Any]:
    """The chain of objects a numpy array's memory comes from."""
    out = []
    b = getattr(a, "base", None)
    while b is not None and len(out) < 10:
        out.append(b)
        b = b.obj if isinstance(b, memoryview) else getattr(b, "base", None)
    return out


async def test_local_layout_stays_inside_root(tmp_path: Any) -> None:
    root = tmp_path / "root"
    store = Store.from_url(str(root))
    for i, key in enumerate(ODD_KEYS):
        await store.put(key, i)
    for dirpath, _, files in os.walk(tmp_path):
        for f in files:
            assert os.path.commonpath([root, os.path.join(dirpath, f)]) == str(root)
    assert set(os.listdir(tmp_path)) == {"root"}
    store.close()


async def test_objects_written_elsewhere_after_a_listing_are_read(
    store_url: tuple[str, dict[str, Any]],
) -> None:
    """A listing must not hide objects that another process writes afterwards (s3fs caches
    listings by default: a read of such an object failed as if it were missing)."""
    url, options = store_url
    reader = Store.from_url(url, **options)
    writer = Store.from_url(url, **options, skip_instance_cache=True)  # another "process"
    try:
        await writer.put("k", 1, token="a")
        assert set(await reader.list()) == {"k"}  # lists objects/<shard of k>/
        await writer.put("k", 2, token="b")  # a new object in the listed directory
        assert await reader.get("k", "b") == 2
    finally:
        reader.close()
        writer.close()


@pytest.mark.parametrize("nbytes", [0, 3_000, 5_000_000])
async def test_local_writes_are_whole_and_leave_no_partial_file(tmp_path: Any, nbytes: int) -> None:
    """Objects on a local disk are written through file descriptors, every frame whole
    (arrays of any shape, empty ones skipped), into a file renamed into place; a write
    failing half-way leaves nothing behind."""
    store = Store.from_url(str(tmp_path / "store"))
    try:
        values = [
            np.arange(nbytes // 8, dtype="f8").reshape(-1, 1) if nbytes else np.empty(0),
            {"frames": [b"", bytearray(b"x" * nbytes), memoryview(b"y" * 7)[2:]]},
        ]
        for i, value in enumerate(values):
            await store.put(("v", i), value, token="t")
        got = await store.get(("v", 0), "t")
        np.testing.assert_array_equal(got, values[0])
        assert await store.get(("v", 1), "t") == {
            "frames": [b"", bytearray(b"x" * nbytes), b"yyyyy"]
        }

        target = tmp_path / "store" / "objects" / "failed"
        with pytest.raises(TypeError):  # fails after the file was created
            await store._backend.write(str(target), [b"abc", object()])  # type: ignore[list-item]
        assert not target.exists()
        names = [p.name for p in (tmp_path / "store").rglob("*")]
        assert not [n for n in names if ".tmp-" in n]
    finally:
        store.close()
