"""Prometheus metrics, the /storage dashboard page, and dask storage status."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import dask
from dask import delayed
from distributed import wait
from distributed.utils_test import async_poll_for, fetch_metrics, gen_test

from storage_scheduler import Store
from storage_scheduler.metrics import METRICS
from storage_scheduler.scheduler.status import heartbeat_of
from tests.utils import async_poll_until, cataloged_keys, storage_cluster

pytestmark = [pytest.mark.slow]

PREFIX = "dask_storage_scheduler"


def inc(x: int) -> int:
    return x + 1


def heartbeats_carry_writes(s: Any, plugin: Any) -> bool:
    """The workers' last heartbeats report every object the scheduler saw stored."""
    beats = [heartbeat_of(ws) for ws in s.workers.values()]
    return (
        plugin.counters.stored > 0
        and sum(b["objects_written"] for b in beats) == plugin.counters.stored
        and sum(b["bytes_written"] for b in beats) == plugin.counters.stored_bytes
    )


def values(families: dict[str, Any], name: str) -> dict[tuple[str, ...], float]:
    family = families[f"{PREFIX}_{name}".removesuffix("_total")]
    return {
        tuple(s.labels.values()): s.value
        for s in family.samples
        if s.name.endswith(("_total", name)) or s.name == family.name
    }


@gen_test(timeout=90)
async def test_metrics_move_with_a_computation(tmp_path: Path) -> None:
    pytest.importorskip("prometheus_client")
    url = str(tmp_path / "store")
    with dask.config.set({"storage-scheduler.gc": "never"}):
        async with storage_cluster(url) as (c, s, plugin):
            xs = c.map(np.full, [10_000] * 6, range(6), key=[f"x-{i}" for i in range(6)])
            total = c.submit(lambda *a: float(sum(x.sum() for x in a)), *xs, key="total")
            assert await total == 10_000 * sum(range(6))
            store = Store.from_url(url)
            keys = [f"x-{i}" for i in range(6)] + ["total"]

            async def flushed() -> bool:
                return set(keys) <= await cataloged_keys(store)

            await async_poll_until(flushed, timeout=10, what="catalog flush")

            sched = await fetch_metrics(s.http_server.port, PREFIX)
            assert set(sched) >= {
                f"{PREFIX}_{n.removesuffix('_total')}"
                for n in METRICS
                if not n.startswith("worker_")
            }
            assert values(sched, "results_stored_total")[()] == 7
            sizes = await store.list()
            assert values(sched, "catalog_bytes")[()] == sum(sizes[k] for k in keys)

            worker = next(iter(s.workers))
            workers = await c.run(lambda dask_worker: dask_worker.http_server.port)
            wm = await fetch_metrics(workers[worker], PREFIX)
            written = values(wm, "worker_written_bytes_total")
            # Every worker of the (in-process) cluster is reported, labelled.
            assert set(written) == {(addr,) for addr in s.workers}
            assert sum(written.values()) == sum(sizes.values())
            assert sum(values(wm, "worker_read_bytes_total").values()) > 0
            memory = wm[f"{PREFIX}_worker_memory_bytes"]
            assert {smp.labels["type"] for smp in memory.samples} == {"results", "tasks"}
            hist = wm[f"{PREFIX}_worker_write_seconds"]
            counts = [smp.value for smp in hist.samples if smp.name.endswith("_count")]
            assert sum(counts) == 7
            for family in list(sched.values()) + list(wm.values()):
                assert family.documentation  # help text everywhere
            store.close()

        async with storage_cluster(url) as (c, s, plugin):
            xs = c.map(np.full, [10_000] * 6, range(6), key=[f"x-{i}" for i in range(6)])
            await wait(xs)
            sched = await fetch_metrics(s.http_server.port, PREFIX)
            assert values(sched, "keys_reused_total")[()] == 6


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.mark.skipif(
    chromium() is None and not os.environ.get("CI"),
    reason="needs Debian's chromium (ci/test.sh installs it)",
)
@gen_test(timeout=120)
async def test_dashboard_page_in_chromium(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    async with storage_cluster(url) as (c, s, plugin):
        x = c.submit(np.random.random, 200_000, key="x")
        futures = [c.submit(np.sum, x, key=f"sum-{i}") for i in range(5)]
        await wait(futures)

        def page_has_data() -> bool:
            # Heartbeats carry the workers' store figures, and the throughput chart has
            # two history samples (one a second at most), the last after the writes.
            samples = plugin.history.samples
            return (
                heartbeats_carry_writes(s, plugin)
                and len(samples) >= 2
                and samples[-1][1] == plugin.counters.stored_bytes
            )

        await async_poll_for(page_has_data, timeout=15)
        page = f"http://127.0.0.1:{s.http_server.port}/storage"
        exe = chromium()
        assert exe, "chromium is not installed"
        args = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
        proc = await asyncio.create_subprocess_exec(
            *args,
            "--dump-dom",
            page,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        dom, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0
        text = dom.decode()
        assert "<h1>Storage</h1>" in text and "Traceback" not in text
        for addr in s.workers:
            assert addr in text
        assert "results stored since start</dt><dd>6 (" in text
        assert "<polyline" in text  # the throughput chart has data
        shot = Path(os.environ.get("STORAGE_SCHEDULER_SCREENSHOT", tmp_path / "storage.png"))
        proc = await asyncio.create_subprocess_exec(
            *args, f"--screenshot={shot}", "--window-size=1100,800", page,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        await asyncio.wait_for(proc.wait(), 60)
        assert shot.stat().st_size > 10_000


@gen_test(timeout=90)
async def test_status_command(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    async with storage_cluster(url) as (c, s, plugin):
        assert (
            await c.compute(delayed(inc)(delayed(inc)(1, dask_key_name="a"), dask_key_name="b"))
            == 3
        )
        await async_poll_for(lambda: heartbeats_carry_writes(s, plugin), timeout=15)
        exe = os.path.join(os.path.dirname(sys.executable), "dask")
        proc = await asyncio.create_subprocess_exec(
            exe,
            "storage",
            "status",
            s.address,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        text = out.decode()
        assert url in text and "RAM results" in text and "RAM tasks" in text
        lines = text.splitlines()
        assert (
            sum(
                1
                for line in lines
                if line.split() and line.split()[0] in {str(ws.name) for ws in s.workers.values()}
            )
            == 2
        )
        assert lines[-1].startswith("total")


def test_status_command_errors() -> None:
    exe = os.path.join(os.path.dirname(sys.executable), "dask")
    out = subprocess.run(
        [exe, "storage", "status", "tcp://127.0.0.1:1", "--timeout", "2s"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and "tcp://127.0.0.1:1" in out.stderr


@gen_test(timeout=60)
async def test_fine_performance_metrics(tmp_path: Path) -> None:
    """Store writes and reads show in Dask's fine performance metrics, like spilling."""
    async with storage_cluster(str(tmp_path / "store")) as (c, s, plugin):
        a, b = sorted(s.workers)
        x = c.submit(np.ones, 100_000, key="x", workers=[a])
        y = c.submit(np.sum, x, key="y", workers=[b])
        assert await y == 100_000
        digests = await c.run(lambda dask_worker: list(dask_worker.digests_total))
        writes = [k for k in digests[a] if isinstance(k, tuple) and "store-write" in k]
        assert {k[-1] for k in writes} >= {"seconds", "count", "bytes"}
        assert any(k[0] == "execute" and k[2] == "x" for k in writes)
        reads = [k for k in digests[b] if isinstance(k, tuple) and "store-read" in k]
        assert any(k[0] == "gather-dep" for k in reads)
