"""Large results are streamed to S3 from their frames, and failed uploads leave nothing.

Against moto S3. Faults are injected by a real s3fs filesystem subclass, registered under
its own protocol, that fails chosen S3 calls.
"""

from __future__ import annotations

import asyncio
import errno
import time
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import fsspec
import numpy as np
import pytest
import pytest_asyncio
from s3fs import S3FileSystem

import dask

from storage_scheduler import Store
from storage_scheduler.store._multipart import PART_BYTES

pytestmark = pytest.mark.asyncio

MiB = 2**20


class FaultyS3FileSystem(S3FileSystem):
    """s3fs, but the call ``fail`` raises, ``shorten`` sends part 2 without its first
    MiB (as a retry after a partial send would), and ``hang`` never sends part 2."""

    protocol = ("s3faulty",)
    fail: str | None = None
    shorten = False
    hang = False

    async def _call_s3(self, method: str, *args: Any, **kwargs: Any) -> Any:
        second_part = kwargs.get("PartNumber") == 2
        if method == self.fail and (method != "upload_part" or second_part):
            raise PermissionError(errno.EACCES, f"injected failure of {method}")
        if self.shorten and method == "upload_part" and second_part:
            kwargs["Body"].read(MiB)
        if self.hang and method == "upload_part" and second_part:
            await asyncio.sleep(3600)
        return await super()._call_s3(method, *args, **kwargs)


fsspec.register_implementation("s3faulty", FaultyS3FileSystem, clobber=True)


def random_bytes(n: int, seed: int = 0) -> np.ndarray:
    # Incompressible, so the stored frame is the array's own buffer.
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


@pytest_asyncio.fixture
async def store(s3_store_url: tuple[str, dict[str, Any]]) -> AsyncIterator[Store]:
    url, options = s3_store_url
    with dask.config.set({"storage-scheduler.compression": False}):
        s = Store.from_url(url, **options)
    yield s
    s.close()


def faulty_store(url: str, options: dict[str, Any]) -> Store:
    return Store.from_url(url.replace("s3://", "s3faulty://"), skip_instance_cache=True, **options)


def incomplete_uploads(options: dict[str, Any], bucket: str) -> list[Any]:
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
    out = fs.call_s3("list_multipart_uploads", Bucket=bucket)
    return list(out.get("Uploads", []))


async def test_large_write_streams_from_the_frames(store: Store) -> None:
    value = random_bytes(64 * MiB)
    await store.put("warm-up", b"x")  # the S3 session and connections, outside the count
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        await store.put("big", value)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    # Joining the frames alone would take 64 MiB.
    assert peak <= PART_BYTES, f"{peak / MiB:.1f} MiB allocated to write 64 MiB"
    info = store.fs.info(store.path("big"))
    parts = -(-info["size"] // PART_BYTES)
    assert info["ETag"].strip('"').endswith(f"-{parts}")  # a multipart upload's ETag
    print(f"peak {peak / MiB:.2f} MiB")
    np.testing.assert_array_equal(await store.get("big"), value)


async def test_parts_span_frames(store: Store) -> None:
    # Frames that end inside parts and parts that end inside frames.
    value = {
        "a": random_bytes(PART_BYTES - 3, 1),
        "b": random_bytes(7, 2),
        "c": random_bytes(2 * PART_BYTES + 5, 3),
        "d": random_bytes(1, 4),
    }
    await store.put("many", value)
    out = await store.get("many")
    assert out.keys() == value.keys()
    for name, array in value.items():
        np.testing.assert_array_equal(out[name], array)


@pytest.mark.parametrize(
    "fault",
    [
        {"fail": "upload_part"},
        {"fail": "list_parts"},
        {"fail": "complete_multipart_upload"},
        {"shorten": True},
    ],
    ids=["upload_part", "list_parts", "complete", "short-part"],
)
async def test_failed_upload_leaves_nothing(
    s3_store_url: tuple[str, dict[str, Any]], fault: dict[str, Any]
) -> None:
    url, options = s3_store_url
    bucket = url.split("://")[1].split("/")[0]
    store = faulty_store(url, options)
    try:
        await store.put("x", "before")
        for name, setting in fault.items():
            setattr(store.fs, name, setting)
        with pytest.raises(OSError) as info:
            await store.put("x", random_bytes(3 * PART_BYTES))
        if fault.get("shorten"):
            assert info.value.errno == errno.EIO
        assert await store.get("x") == "before"  # the old object, whole
        assert incomplete_uploads(options, bucket) == []
    finally:
        store.close()


async def test_cancelled_upload_is_aborted(s3_store_url: tuple[str, dict[str, Any]]) -> None:
    url, options = s3_store_url
    bucket = url.split("://")[1].split("/")[0]
    store = faulty_store(url, options)
    try:
        store.fs.hang = True
        write = asyncio.ensure_future(store.put("x", random_bytes(3 * PART_BYTES)))
        deadline = time.monotonic() + 30
        while not incomplete_uploads(options, bucket):  # the upload has begun
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        write.cancel()
        with pytest.raises(asyncio.CancelledError):
            await write
        # The abort runs on s3fs's loop, after the cancelled caller has moved on.
        while incomplete_uploads(options, bucket):
            assert time.monotonic() < deadline, "the cancelled upload was not aborted"
            await asyncio.sleep(0.05)
        assert await store.list() == {}
    finally:
        store.close()
