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
    sizes = await store.sizes([f"a-{i}" for i in range(10)] + ["total"])
    limit = sum(sizes.values()) // 2
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

    path = Path(store.path("a-4"))
    data = bytearray(path.read_bytes())
    data[-2] ^= 0xFF
    path.write_bytes(bytes(data))
    out = dask_storage("verify", url, check=False)
    assert out.returncode == 1 and "BAD 'a-4'" in out.stdout and "corrupted" in out.stdout
    out = dask_storage("verify", url, "--delete")
    assert "1 bad (deleted)" in out.stdout
    assert "a-4" not in await store.list()

    # Lose the manifest: rebuild it from the objects and their headers.
    for name in await store.list_files("manifest"):
        os.unlink(f"{store.root}/{name}")
    assert "Catalog rebuilt: 10 stored results" in dask_storage("rebuild-catalog", url).stdout
    catalog = Catalog(store)
    await catalog.load()
    assert len(catalog) == 10 and all(e.token for e in catalog.entries.values())
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
