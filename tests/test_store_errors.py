"""Bad input and broken stores give clear errors that name the URL or key."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

import dask

from storage_scheduler import (
    IntegrityError,
    MissingObjectError,
    StorageConfigError,
    Store,
    StoreUnavailableError,
)
from storage_scheduler.store import classify
from storage_scheduler.store._backends import FsspecBackend, LocalBackend
from tests.conftest import s3_options
from tests.s3server import free_port

pytestmark = pytest.mark.asyncio

SECRET = "do-not-print-this-secret"


async def test_unknown_protocol() -> None:
    with pytest.raises(StorageConfigError, match="'nosuchfs://bucket/x'"):
        Store.from_url("nosuchfs://bucket/x")


async def test_misspelled_protocol() -> None:
    with pytest.raises(StorageConfigError, match="s4://bucket"):
        Store.from_url("s4://bucket/prefix")


@pytest.mark.parametrize("url", ["s3://", "s3:///"])
async def test_object_store_url_without_a_bucket(url: str) -> None:
    with pytest.raises(StorageConfigError, match="names no bucket"):
        Store.from_url(url)


async def test_unreachable_s3_endpoint() -> None:
    port = free_port()  # nothing listens here
    with dask.config.set({"storage-scheduler.connect-timeout": "20s"}):
        store = Store.from_url(
            "s3://bucket/prefix",
            endpoint_url=f"http://127.0.0.1:{port}",
            key="k",
            secret=SECRET,
            config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 1},
        )
    start = time.monotonic()
    with pytest.raises(StoreUnavailableError, match="'s3://bucket/prefix'") as info:
        await store.check()
    assert time.monotonic() - start < 20
    assert SECRET not in str(info.value) and SECRET not in repr(store)
    store.close()


async def test_check_times_out() -> None:
    """A store that accepts connections but never answers is reported after connect-timeout."""
    import socket

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(16)  # accept nothing: requests hang
        port = srv.getsockname()[1]
        with dask.config.set({"storage-scheduler.connect-timeout": "2s"}):
            store = Store.from_url(
                "s3://bucket/prefix",
                endpoint_url=f"http://127.0.0.1:{port}",
                key="k",
                secret=SECRET,
            )
        with pytest.raises(StoreUnavailableError, match="did not answer within 2s"):
            await store.check()
        store.close()


async def test_missing_bucket(s3_endpoint: str) -> None:
    store = Store.from_url("s3://no-such-bucket-here/prefix", **s3_options(s3_endpoint))
    with pytest.raises(StoreUnavailableError, match="no-such-bucket-here") as info:
        await store.check()
    assert "does the bucket or directory exist" in str(info.value)
    store.close()


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory this process cannot write to, even as root (``chattr +i``)."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(d)], check=True)
    else:
        d.chmod(0o555)
    try:
        with pytest.raises(PermissionError):
            (d / "probe").write_bytes(b"")
        yield d
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(d)], check=True)
        d.chmod(0o755)
        shutil.rmtree(d)


async def test_read_only_directory(read_only_dir: Path) -> None:
    store = Store.from_url(f"file://{read_only_dir}")
    with pytest.raises(StoreUnavailableError, match="permission denied") as info:
        await store.check()
    assert str(read_only_dir) in str(info.value)
    with pytest.raises(PermissionError, match=str(read_only_dir)):
        await store.put("k", 1)
    store.close()


async def test_bad_settings() -> None:
    for key, value in [
        ("max-concurrency", 0),
        ("retry.attempts", 0),
        ("connect-timeout", "soon"),
        ("url", 5),
    ]:
        with dask.config.set({f"storage-scheduler.{key}": value}):
            with pytest.raises(StorageConfigError, match="storage-scheduler"):
                Store.from_url()


async def test_transient_errors_are_retried(tmp_path: Path) -> None:
    """A store whose first writes fail with a connection error still stores the value."""

    class FlakyStore(Store):
        failures = 2

        async def _write(self, path: str, frames: list[Any]) -> None:
            if self.failures:
                self.failures -= 1
                raise ConnectionResetError("connection reset by peer")
            await super()._write(path, frames)

    with dask.config.set({"storage-scheduler.retry.delay-min": "1ms"}):
        store = FlakyStore(Store.from_url(str(tmp_path)).settings)
    await store.put("k", 42)
    assert store.failures == 0
    assert await store.get("k") == 42

    store.failures = 10  # more than the attempts allow
    with pytest.raises(ConnectionResetError):
        await store.put("k2", 1)
    store.close()


async def test_permanent_errors_are_not_retried(tmp_path: Path) -> None:
    calls = []

    class DeniedStore(Store):
        async def _write(self, path: str, frames: list[Any]) -> None:
            calls.append(path)
            raise PermissionError(13, "Permission denied", path)

    store = DeniedStore(Store.from_url(str(tmp_path)).settings)
    with pytest.raises(PermissionError):
        await store.put("k", 1)
    assert len(calls) == 1
    store.close()


# ------------------------------------------------ classify, backends, retry layers


async def test_classify_missing(store_url: tuple[str, dict[str, Any]]) -> None:
    url, options = store_url
    store = Store.from_url(url, **options)
    with pytest.raises(MissingObjectError) as info:
        await store.get("never-written")
    assert classify(info.value) == "missing"
    with pytest.raises(FileNotFoundError) as info:
        await store.read_file("never-written")
    assert classify(info.value) == "missing"
    store.close()


async def test_classify_damaged(tmp_path: Path) -> None:
    store = Store.from_url(str(tmp_path))
    await store.put("k", b"x" * 10_000)
    obj = Path(store.path("k"))
    data = bytearray(obj.read_bytes())
    data[-100] ^= 0xFF
    obj.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="checksum") as info:
        await store.get("k")
    assert classify(info.value) == "damaged"
    obj.write_bytes(bytes(data[:10]))
    with pytest.raises(IntegrityError, match="truncated") as info:
        await store.head("k")
    assert classify(info.value) == "damaged"
    store.close()


async def test_classify_unavailable_directory(read_only_dir: Path) -> None:
    store = Store.from_url(f"file://{read_only_dir}")
    with pytest.raises(PermissionError) as info:
        await store.put("k", 1)
    assert classify(info.value) == "unavailable"
    with pytest.raises(StoreUnavailableError) as info:
        await store.check()
    assert classify(info.value) == "unavailable"
    store.close()


async def test_classify_unavailable_s3() -> None:
    port = free_port()  # nothing listens here
    no_retries = {"storage-scheduler.retry.attempts": 1, "storage-scheduler.retry.outage-window": 0}
    with dask.config.set(no_retries):
        store = Store.from_url(
            "s3://bucket/prefix",
            endpoint_url=f"http://127.0.0.1:{port}",
            key="k",
            secret=SECRET,
            config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 1},
        )
    operations = [
        lambda: store.get("k"),
        lambda: store.put("k", 1),
        lambda: store.find("objects"),
        lambda: store.list(),
    ]
    for op in operations:
        with pytest.raises(OSError, match="s3://bucket/prefix") as info:
            await op()
        assert classify(info.value) == "unavailable"
        assert SECRET not in str(info.value)
    store.close()


async def test_backend_is_chosen_by_filesystem(store_url: tuple[str, dict[str, Any]]) -> None:
    url, options = store_url
    store = Store.from_url(url, **options)
    backend = store._backend
    if url.startswith("file://"):
        assert type(backend) is LocalBackend
    elif url.startswith("memory://"):
        # A sync filesystem, driven through fsspec's own async wrapper.
        assert type(backend) is FsspecBackend
        assert isinstance(backend._afs, AsyncFileSystemWrapper)
        assert backend._afs.sync_fs is store.fs
    else:
        assert type(backend) is FsspecBackend
        assert backend._afs is store.fs and store.fs.async_impl
    assert backend.retries_itself == url.startswith("s3://")
    await store.put("k", [1, 2])
    assert await store.get("k") == [1, 2]
    assert await store.list() == {"k": (await store.find("objects"))[store.path("k")]}
    store.close()


async def test_one_retry_layer(store_url: tuple[str, dict[str, Any]]) -> None:
    """Our retries apply only where the backend does not retry itself (s3fs does)."""
    url, options = store_url
    calls = []

    class FlakyReads(Store):
        async def _read(self, path: str, end: int | None = None) -> Any:
            calls.append(path)
            raise ConnectionResetError("connection reset by peer")

    retry = {
        "storage-scheduler.retry.attempts": 3,
        "storage-scheduler.retry.delay-min": "1ms",
        "storage-scheduler.retry.outage-window": 0,  # the short retries only
    }
    with dask.config.set(retry):
        store = FlakyReads(Store.from_url(url, **options).settings)
    with pytest.raises(ConnectionResetError):
        await store.get("k")
    assert len(calls) == (1 if url.startswith("s3://") else 3)
    store.close()
