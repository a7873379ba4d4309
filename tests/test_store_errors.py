"""Bad input and broken stores give clear errors that name the URL or key."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
import pytest

from storage_scheduler import StorageConfigError, Store, StoreUnavailableError
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
                "s3://bucket/prefix", endpoint_url=f"http://127.0.0.1:{port}", key="k", secret=SECRET
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
