"""The ``dask storage`` command line, on a store filled by a real cluster."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dask import delayed
from distributed.utils_test import gen_test

from storage_scheduler import Store
from storage_scheduler.store.catalog import Catalog
from storage_scheduler.store.leases import write_lease
from tests.utils import storage_cluster

pytestmark = [pytest.mark.slow]


def dask_storage(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "dask")
    out = subprocess.run([exe, "storage", *args], capture_output=True, text=True, timeout=120)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def inc(x: int) -> int:
    return x + 1


async def fill(url: str, **options: Any) -> None:
    """Results of a real computation: 'a-0'..'a-9' kept, plus a stored 'total'."""
    async with storage_cluster(url, storage_options=options or None) as (c, s, plugin):
        futures = c.map(inc, range(10), key=[f"a-{i}" for i in range(10)])
        await c.gather(futures)
        assert await c.compute(delayed(sum)(futures, dask_key_name="total")) == 55


@gen_test(timeout=60)
async def test_ls_du_gc(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    await fill(url)
    out = dask_storage("ls", url).stdout
    assert "'a-3'" in out and "'total'" in out and out.strip().endswith("B") and "11 keys" in out
    out = dask_storage("du", url).stdout
    assert "10" in out and " a\n" in out and "total" in out
    out = dask_storage("du", url, "--by", "age").stdout
    assert "< 1 hour" in out

    out = dask_storage("gc", url, "--all", "--dry-run").stdout
    assert "Would delete 11 stored results" in out
    store = Store.from_url(url)
    assert len(await store.list()) == 11

    assert "Deleted 0 stored results" in dask_storage("gc", url, "--older-than", "1h").stdout

    # A running cluster's lease protects what it holds.
    await write_lease(store, "other-cluster", ["a-1", "a-2"])
    out = dask_storage("gc", url, "--all").stdout
    assert "Deleted 9 stored results" in out and "Kept 2" in out
    assert set(await store.list()) == {"a-1", "a-2"}
    catalog = Catalog(store)
    await catalog.load()
    assert set(catalog.entries) == {"a-1", "a-2"}
    store.close()


@gen_test(timeout=60)
async def test_gc_max_size(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    await fill(url)
    store = Store.from_url(url)
    limit = sum((await store.list()).values()) // 2
    dask_storage("gc", url, "--max-size", str(limit))
    left = await store.list()
    assert 0 < sum(left.values()) <= limit
    store.close()


@gen_test(timeout=60)
async def test_verify_and_rebuild(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    await fill(url)
    store = Store.from_url(url)
    assert "11 objects checked, 0 bad" in dask_storage("verify", url).stdout

    (path,) = [Path(p) for p in await store.find("objects") if p.startswith(store.path("a-4"))]
    data = bytearray(path.read_bytes())
    data[-2] ^= 0xFF
    path.write_bytes(bytes(data))
    out = dask_storage("verify", url, check=False)
    assert out.returncode == 1 and "BAD 'a-4'" in out.stdout and "corrupted" in out.stdout
    out = dask_storage("verify", url, "--delete")
    assert "1 bad (deleted)" in out.stdout
    assert "a-4" not in await store.list()
    catalog = Catalog(store)
    await catalog.load()
    assert "a-4" not in catalog and len(catalog) == 10

    # A stray file and an empty object: reported, and the others still checked.
    stray, empty = path.parent / "README.txt", Path(store.path("a-4", "0" * 32))
    stray.write_text("not an object")
    empty.write_bytes(b"")
    for args in [(), ("--delete",)]:
        out = dask_storage("verify", url, *args, check=False)
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert f"NOT AN OBJECT {stray}" in out.stdout and "BAD 'a-4'" in out.stdout
        assert "11 objects checked" in out.stdout or "10 objects checked" in out.stdout
    assert not empty.exists() and stray.exists()  # --delete: only objects that fail

    # Lose the manifest: rebuild it from the objects and their headers.
    for name in await store.list_files("manifest"):
        os.unlink(f"{store.root}/{name}")
    out = dask_storage("rebuild-catalog", url, check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr  # the stray file
    assert "Catalog rebuilt: 10 stored results" in out.stdout and f"LEFT OUT {stray}" in out.stdout
    catalog = Catalog(store)
    await catalog.load()
    assert len(catalog) == 10 and all(e.token for _, e in catalog.items())
    store.close()


def test_s3_and_errors(s3_store_url: tuple[str, dict[str, Any]]) -> None:
    url, options = s3_store_url
    asyncio.run(fill(url, **options))
    opts = [f"--storage-option={k}={v}" for k, v in options.items()]
    assert "11 keys" in dask_storage("ls", url, *opts).stdout
    out = dask_storage("ls", "nosuchfs://x", check=False)
    assert out.returncode != 0 and "nosuchfs://x" in out.stderr
    out = dask_storage("gc", url, *opts, check=False)
    assert out.returncode != 0 and "--older-than" in out.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["gc", "{url}", "--older-than", "7"], "give a unit"),
        (["gc", "{url}", "--max-size", "-5"], "must be positive"),
        (["ls", "{url}-mistyped"], "no store at"),
        (["status", "notanaddress", "--timeout", "2s"], "cannot reach the scheduler"),
    ],
    ids=["duration-without-unit", "negative-size", "missing-store", "bad-address"],
)
def test_bad_input_is_one_clear_line(tmp_path: Path, args: list[str], message: str) -> None:
    url = str(tmp_path / "store")
    (tmp_path / "store").mkdir()
    out = dask_storage(*(a.format(url=url) for a in args), check=False)
    assert out.returncode != 0
    assert message in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.asyncio
async def test_reading_commands_do_not_write(tmp_path: Path) -> None:
    """ls and du never compact the manifest (they work on a read-only store too)."""
    url = str(tmp_path / "store")
    store = Store.from_url(url)
    catalog = Catalog(store)
    for i in range(20):  # more segments than a loading scheduler would leave
        catalog.add(f"k-{i}", "t", 1)
        await catalog.flush()
    before = await store.list_files("manifest")
    assert "20 keys" in dask_storage("ls", url).stdout
    dask_storage("du", url)
    assert await store.list_files("manifest") == before
    store.close()


def test_gc_removes_partial_writes(backend: tuple[str, dict[str, Any]]) -> None:
    """Writers killed mid-write leave temporary files and unfinished multipart uploads:
    gc removes those older than an hour, gc --all every one (no cluster is running)."""
    url, options = backend
    asyncio.run(fill(url, **options))
    opts = [f"--storage-option={k}={v}" for k, v in options.items()]
    store = Store.from_url(url, **options)
    tmp = store.path("a-1", "t") + ".tmp-0123456789ab"
    store.fs.pipe_file(tmp, b"partial")
    uploads = None
    if store.root.startswith("test-"):  # S3 (moto): an upload that never completes
        bucket, prefix = store.root.split("/", 1)
        s3 = store.fs

        def upload_ids() -> list[str]:
            out = s3.call_s3("list_multipart_uploads", Bucket=bucket)
            return [u["UploadId"] for u in out.get("Uploads", [])]

        s3.call_s3("create_multipart_upload", Bucket=bucket, Key=f"{prefix}/objects/00/kx-1")
        uploads = upload_ids
        assert len(uploads()) == 1

    # Younger than an hour: left alone (it may be a write in progress). (moto dates every
    # upload 2010: only the temporary file's age can be checked there.)
    dask_storage("gc", url, *opts, "--older-than", "30d")
    assert store.fs.exists(tmp)
    out = dask_storage("verify", url, *opts).stdout
    assert "1 partial writes" in out
    # --all with no live cluster: everything goes, partial writes included.
    out = dask_storage("gc", url, *opts, "--all").stdout
    assert "Deleted 11 stored results" in out and "partial writes" in out
    assert not store.fs.exists(tmp) and (uploads is None or uploads() == [])
    assert [p for p in store.fs.find(store.root) if "/objects/" in p] == []
    store.close()
