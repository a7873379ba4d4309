"""Crashes: real SIGKILLs of workers and schedulers mid-write, mid-flush, mid-compaction.

After each crash the store must be consistent (``dask storage verify`` finds nothing bad,
the catalog names only objects that exist, reused results read back whole) and, once no
cluster runs, ``dask storage gc --all`` must leave nothing behind: no object, no partial
write, no unfinished multipart upload.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from distributed import Client, wait

from storage_scheduler import Store
from storage_scheduler.store.catalog import MANIFEST, Catalog
from storage_scheduler.store.inventory import Inventory, take_inventory
from storage_scheduler.store.leases import (
    LEASE_KEYS,
    LEASES,
    _decode_manifest,
    _encode_manifest,
    keys_leased_by_others,
)
from tests.cluster_cli import CommandLineCluster, cluster_env, dask_cmd
from tests.utils import record_run, runs

pytestmark = [pytest.mark.slow]

T = TypeVar("T")

#: Size of the results written while a worker is killed: several parts of a multipart
#: upload on S3, tens of milliseconds of writing on a local disk.
BIG = 48 * 2**20


# ------------------------------------------------------------------ task functions


def big(i: int, nbytes: int) -> Any:
    """A result that cannot be compressed: its write takes a while."""
    return np.random.default_rng(i).random(nbytes // 8)


def checksum(x: Any) -> float:
    return float(x.sum())


def tiny(i: int, directory: str) -> int:
    record_run(directory, f"tiny-{i}")
    time.sleep(0.05)  # 240 of them outlast 20 catalog flushes, even on a loaded machine
    return i * 2


def total(*xs: int) -> int:
    return sum(xs)


def slow(i: int, delay: float) -> int:
    time.sleep(delay)
    return i


# ------------------------------------------------------------------ helpers


def in_store(url: str, options: dict[str, Any], work: Callable[[Store], Awaitable[T]]) -> T:
    async def main() -> T:
        store = Store.from_url(url, **options)
        try:
            return await work(store)
        finally:
            store.close()

    return asyncio.run(main())


def storage_cli(
    command: str, url: str, options: dict[str, Any], *args: str
) -> subprocess.CompletedProcess[str]:
    argv = [dask_cmd(), "storage", command, url, *args]
    for k, v in options.items():
        argv += ["--storage-option", f"{k}={v}"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=cluster_env())


def verify_clean(url: str, options: dict[str, Any]) -> str:
    """``dask storage verify``: nothing bad, nothing stray (partial writes are allowed)."""
    out = storage_cli("verify", url, options)
    assert out.returncode == 0, out.stdout + out.stderr
    assert " 0 bad, 0 other files, " in out.stdout, out.stdout
    return out.stdout


async def catalog_and_inventory(store: Store) -> tuple[dict[str, Any], Inventory]:
    """The catalog's results by object path, and what a listing finds."""
    catalog = Catalog(store)
    await catalog.load(compact=False)
    by_path = {store.path(k, e.token): (k, e) for k, e in catalog.items()}
    return by_path, await take_inventory(store)


def multipart_uploads(store: Store) -> list[dict[str, Any]]:
    """Unfinished multipart uploads in the store's bucket (S3 only)."""
    bucket = store.root.lstrip("/").split("/", 1)[0]
    uploads: list[dict[str, Any]] = store.fs.call_s3("list_multipart_uploads", Bucket=bucket).get(
        "Uploads", []
    )
    return uploads


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def local_root(url: str) -> Path:
    return Path(url.removeprefix("file://"))


def writes_in_flight(url: str, store: Store) -> bool:
    """Whether a result is being written right now: a ``.tmp-`` file (local directory) or
    an unfinished multipart upload (S3)."""
    if is_s3(url):
        return bool(multipart_uploads(store))
    for _, _, files in os.walk(local_root(url) / "objects"):
        if any(".tmp-" in f for f in files):
            return True
    return False


def gc_all_leaves_nothing(url: str, options: dict[str, Any]) -> None:
    out = storage_cli("gc", url, options, "--all")
    assert out.returncode == 0, out.stdout + out.stderr

    async def left(store: Store) -> tuple[dict[str, int], list[str], list[str]]:
        return (
            await store.find("objects"),
            await store.list_files(LEASES),
            await store.list_files(LEASE_KEYS),
        )

    objects, leases, parts = in_store(url, options, left)
    assert objects == {}, (out.stdout, sorted(objects))
    assert leases == parts == [], (leases, parts)
    if is_s3(url):
        store = Store.from_url(url, **options)
        try:
            assert multipart_uploads(store) == []
        finally:
            store.close()


async def expire_leases(store: Store) -> list[str]:
    """Make every lease lapse, as it would TTL + skew margin after its scheduler died."""
    names = await store.list_files(LEASES)
    for name in names:
        m = _decode_manifest(await store.read_file(name))
        await store.write_file(name, _encode_manifest(0.0, 60.0, list(m.parts)))
    return names


def plugin_started(c: Client) -> None:
    """Wait for the storage plugin to have started (the scheduler file is written, and
    workers may join, while it still loads the catalog)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            c.sync(c.scheduler.storage_info)
            return
        except Exception:
            assert time.monotonic() < deadline, "the storage plugin did not start"
            time.sleep(0.05)


def log_clean(cluster: CommandLineCluster, peer_reads: bool = False) -> None:
    """Nothing went wrong in the cluster's processes (checked before they are stopped:
    stock distributed logs closed comms when all stop at once). ``peer_reads``: workers
    read from peers too (write-behind), and stock distributed logs a traceback when a peer
    it reads from is killed; only those are allowed."""
    text = cluster.log.read_text(errors="replace")
    if peer_reads:
        text = "\n".join(
            part
            for part in text.split("\n20")  # log records start with the year
            if "Worker stream died during communication" not in part
        )
    assert "Traceback" not in text, text[-5000:]


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("durability", ["write-through", "write-behind"])
def test_sigkill_worker_mid_write(
    backend: tuple[str, dict[str, Any]], tmp_path: Path, durability: str
) -> None:
    """A worker killed while its results are being written leaves partial writes (and
    unfinished uploads on S3), never a visible partial object; ``gc --all`` removes them."""
    url, options = backend
    env = {
        "DASK_STORAGE_SCHEDULER__DURABILITY": durability,
        "DASK_STORAGE_SCHEDULER__FLUSH_INTERVAL": "100ms",
        # Nothing may move to the other worker before the kill.
        "DASK_DISTRIBUTED__SCHEDULER__WORK_STEALING": "False",
    }
    n = 4
    store = Store.from_url(url, **options)
    with (
        CommandLineCluster(tmp_path / "cluster", url, options, env=env) as cluster,
        Client(scheduler_file=str(cluster.scheduler_file)) as c,
    ):
        c.wait_for_workers(2, timeout=60)
        plugin_started(c)
        by_name = {w["name"]: addr for addr, w in c.scheduler_info()["workers"].items()}
        a, b = by_name["worker-0"], by_name["worker-1"]
        bigs = [
            c.submit(big, i, BIG, key=f"big-{i}", workers=[a], allow_other_workers=True)
            for i in range(n)
        ]
        sums = [c.submit(checksum, f, key=f"sum-{i}", workers=[b]) for i, f in enumerate(bigs)]

        deadline = time.monotonic() + 30
        while not writes_in_flight(url, store):
            assert time.monotonic() < deadline, "no write was seen in flight"
            time.sleep(0.002)
        cluster.procs["worker-0"].kill()
        cluster.procs["worker-0"].wait()

        # The dead writer's leftovers are there: what this test is about.
        if is_s3(url):
            assert multipart_uploads(store)
        else:
            assert in_store(url, options, take_inventory).partial

        expected = [float(big(i, BIG).sum()) for i in range(n)]
        assert c.gather(sums) == expected
        assert c.gather(c.submit(checksum, bigs[0], key="sum-again", workers=[b])) == expected[0]

        verify_clean(url, options)

        # Once flushed, the catalog names exactly the objects in the store.
        def catalog_complete() -> bool:
            by_path, _ = in_store(url, options, catalog_and_inventory)
            return {k for k, _ in by_path.values()} >= {f.key for f in bigs}

        deadline = time.monotonic() + 20
        while not catalog_complete():
            assert time.monotonic() < deadline, "the catalog never listed every result"
            time.sleep(0.1)
        by_path, inventory = in_store(url, options, catalog_and_inventory)
        assert {o.path for o in inventory.objects} == set(by_path)
        assert not [o for o in inventory.objects if ".tmp-" in o.path]
        log_clean(cluster, peer_reads=durability == "write-behind")
    store.close()
    gc_all_leaves_nothing(url, options)


def test_sigkill_scheduler_mid_flush(backend: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    """A scheduler killed while it flushes its catalog every 50 ms: the next cluster on the
    store starts, reuses what was cataloged (every object reads back) and computes the
    rest; once the dead cluster's lease lapses, ``gc --all`` leaves nothing."""
    url, options = backend
    marks = tmp_path / "runs"
    marks.mkdir()
    env = {"DASK_STORAGE_SCHEDULER__FLUSH_INTERVAL": "50ms"}
    n, batch = 240, 10

    def submit(c: Client) -> Any:
        xs = [c.submit(tiny, i, str(marks), key=f"tiny-{i}") for i in range(n)]
        parts = [
            c.submit(total, *xs[j : j + batch], key=f"part-{j // batch}")
            for j in range(0, n, batch)
        ]
        return c.submit(total, *parts, key="total")

    async def manifest(store: Store) -> list[str]:
        return await store.list_files(MANIFEST)

    with CommandLineCluster(tmp_path / "first", url, options, env=env) as first:
        with Client(scheduler_file=str(first.scheduler_file)) as c:
            c.wait_for_workers(2, timeout=60)
            plugin_started(c)
            fut = submit(c)
            deadline = time.monotonic() + 30
            while len(in_store(url, options, manifest)) < 20:
                assert time.monotonic() < deadline, "the catalog was never flushed"
                assert not fut.done(), "finished before the crash"
                time.sleep(0.02)
            log_clean(first)
            first.procs["scheduler"].kill()
            first.kill()
    assert first.procs["scheduler"].returncode == -9

    before = runs(marks)
    assert 0 < sum(before.values()) < n

    with CommandLineCluster(tmp_path / "second", url, options, env=env) as second:
        with Client(scheduler_file=str(second.scheduler_file)) as c:
            c.wait_for_workers(2, timeout=60)
            plugin_started(c)
            assert c.gather(submit(c)) == sum(2 * i for i in range(n))
            info = c.sync(c.scheduler.storage_info)
            # What was cataloged before the crash was reused, and read back whole.
            assert info["reused_total"] > 0, info
            assert info["unreadable_total"] == 0, info
            after = runs(marks)
            assert sum(after.values()) - sum(before.values()) < n
            verify_clean(url, options)
            log_clean(second)

    # The dead scheduler's lease still protects what it held: gc --all keeps exactly that.
    leased = in_store(url, options, lambda store: keys_leased_by_others(store, None))
    stored = set(in_store(url, options, Store.list))
    out = storage_cli("gc", url, options, "--all")
    assert out.returncode == 0, out.stderr
    assert set(in_store(url, options, Store.list)) == stored & leased, out.stdout

    # Its lease lapses: now nothing is left.
    assert len(in_store(url, options, expire_leases)) == 1
    gc_all_leaves_nothing(url, options)


def test_gc_all_after_scheduler_crash(backend: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    """Results stored in the last flush interval before the scheduler is killed never reach
    the catalog: ``gc --all`` finds them by listing the store."""
    url, options = backend

    # The catalog is not flushed before the crash (the lease, empty, was written at start).
    env = {"DASK_STORAGE_SCHEDULER__FLUSH_INTERVAL": "30s"}
    with CommandLineCluster(tmp_path / "cluster", url, options, env=env) as cluster:
        with Client(scheduler_file=str(cluster.scheduler_file)) as c:
            c.wait_for_workers(2, timeout=60)
            plugin_started(c)
            futs = [c.submit(slow, i, 0.1, key=f"slow-{i}") for i in range(4)]
            wait(futs)
            cluster.kill()
    by_path, inventory = in_store(url, options, catalog_and_inventory)
    assert len(inventory.objects) == 4
    assert not by_path
    assert len(in_store(url, options, expire_leases)) == 1
    gc_all_leaves_nothing(url, options)


SEGMENTS = 400


async def many_segments(store: Store) -> set[tuple[Any, str | None, int]]:
    """A manifest of SEGMENTS segments (a scheduler starting on it compacts it): each adds
    keys and deletes one the previous one added; some results have objects. Returns the
    results it lists."""
    catalog = Catalog(store)
    for s in range(SEGMENTS):
        for j in range(5):
            key, token = f"seg{s}-{j}", f"token-{s}-{j}"
            nbytes = await store.put(key, s * j, token=token) if s % 40 == 0 else 100
            catalog.add(key, token, nbytes)
        if s:
            catalog.discard(f"seg{s - 1}-0", f"token-{s - 1}-0")
        await catalog.flush()
    return {(k, e.token, e.nbytes) for k, e in catalog.items()}


async def cataloged(store: Store) -> set[tuple[Any, str | None, int]]:
    catalog = Catalog(store)
    await catalog.load(compact=False)
    return {(k, e.token, e.nbytes) for k, e in catalog.items()}


def start_scheduler(url: str, log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [
                dask_cmd(), "scheduler",
                "--host", "127.0.0.1", "--port", "0", "--dashboard-address", ":0",
                "--preload", "storage_scheduler", "--storage-url", url,
            ],
            stdout=out, stderr=subprocess.STDOUT, env=cluster_env(), cwd=cwd,
        )  # fmt: skip


@pytest.mark.parametrize("moment", ["writing-snapshot", "deleting-segments"])
def test_sigkill_scheduler_mid_compaction(moment: str, tmp_path: Path) -> None:
    """A scheduler killed while it compacts the manifest at start (writing the snapshot,
    or deleting the segments it replaces): the next one loads every entry, no deleted
    entry comes back, and it compacts what was left."""
    url, options = f"file://{tmp_path}/store", {}
    manifest = local_root(url) / MANIFEST
    expected = in_store(url, options, many_segments)
    assert len(os.listdir(manifest)) == SEGMENTS

    original = set(os.listdir(manifest))

    def reached() -> bool:
        names = os.listdir(manifest)
        if moment == "writing-snapshot":
            return not original.issuperset(names)
        return len(names) < SEGMENTS

    proc = start_scheduler(url, tmp_path / "killed.log", tmp_path)
    try:
        deadline = time.monotonic() + 30
        while not reached():
            assert proc.poll() is None, "the scheduler exited"
            assert time.monotonic() < deadline, "no compaction seen"
    finally:
        proc.kill()
        proc.wait()
    left = len([n for n in os.listdir(manifest) if ".tmp-" not in n])
    # Killed mid-compaction: (some of) the segments it replaces are still there, beside the
    # snapshot or its partial write. Their 400 unlinks take a few milliseconds: on a busy
    # machine the kill can land after the last one (then only the snapshot is left).
    assert 1 <= left <= SEGMENTS + 1, left
    assert in_store(url, options, cataloged) == expected

    # A scheduler that is not killed starts normally on what it left, and compacts it.
    with (
        CommandLineCluster(tmp_path / "next", url, options, n_workers=0) as last,
        Client(scheduler_file=str(last.scheduler_file)) as c,
    ):
        plugin_started(c)
        log_clean(last)
    assert in_store(url, options, cataloged) == expected
    assert len([n for n in os.listdir(manifest) if ".tmp-" not in n]) == 1
    verify_clean(url, options)
    gc_all_leaves_nothing(url, options)
