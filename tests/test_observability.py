"""Prometheus metrics, the storage views on the dashboard, and the storage status."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tornado.httpclient import AsyncHTTPClient

import dask
from dask import delayed
from dask.utils import format_bytes
from distributed import wait
from distributed.utils_test import async_poll_for, fetch_metrics, gen_test

from storage_scheduler import Store, _compat
from storage_scheduler.dashboard.plots import STORE_ROW
from storage_scheduler.metrics import METRICS
from storage_scheduler.scheduler.status import heartbeat_of
from tests.cdp import Chromium, chromium
from tests.cluster_cli import cluster_env
from tests.utils import async_poll_until, cataloged_keys, enable_storage, storage_cluster

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


needs_chromium = pytest.mark.skipif(
    chromium() is None and not os.environ.get("CI"),
    reason="needs Debian's chromium (ci/test.sh installs it)",
)

STORAGE_PLOTS = [
    "/individual-storage-memory",
    "/individual-storage-throughput",
    "/individual-storage-holdings",
    "/individual-storage-workers",
]


async def run_workload(c: Any, plugin: Any) -> list[Any]:
    """Store 6 results and read one back, after the history's first sample: the
    throughput chart then shows both. Returns the futures, which keep them stored."""
    await async_poll_for(lambda: len(plugin.history.samples) >= 1, timeout=10)
    x = c.submit(np.random.random, 200_000, key="x")
    sums = [c.submit(np.sum, x, key=f"sum-{i}") for i in range(5)]
    await wait(sums)
    return [x, *sums]


def page_has_data(s: Any, plugin: Any) -> bool:
    """Heartbeats carry the workers' store figures, and the throughput history's last
    sample (one a second at most) came after the writes and the reads."""
    samples = plugin.history.samples
    return (
        heartbeats_carry_writes(s, plugin)
        and len(samples) >= 2
        and samples[-1][1] == plugin.counters.stored_bytes
        and samples[-1][2] > 0
    )


async def fetch_json(url: str) -> Any:
    return json.loads((await AsyncHTTPClient().fetch(url)).body)


@needs_chromium
async def shows_stored_bytes(browser: Any, plugin: Any) -> None:
    """The memory plot shows each worker's bytes written and the store's bytes, as the
    plugin's status has them (polled: the page shows the heartbeats of its last refresh,
    every second)."""
    deadline = time.monotonic() + 15
    while True:
        memory = await browser.source_data("storage_memory")
        st = plugin.storage_status()
        want = [*(w["bytes_written"] for w in st["workers"]), st["bytes_in_lanes"]]
        if (memory is not None and memory["stored"] == want) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert memory is not None and memory["stored"] == want


@gen_test(timeout=180)
async def test_dashboard_in_chromium(tmp_path: Path) -> None:
    """The storage page is in Dask's menu, its plots in /individual-plots.json; each
    renders in Chromium, without console errors, with the cluster's figures."""
    url = str(tmp_path / "store")
    async with storage_cluster(url) as (c, s, plugin):
        base = f"http://127.0.0.1:{s.http_server.port}"
        plots = await fetch_json(base + "/individual-plots.json")
        assert set(STORAGE_PLOTS) <= set(plots.values())
        names = sorted(s.workers)  # in-process workers are named by address
        async with Chromium(tmp_path / "profile") as browser:
            await browser.open(base + "/status")
            menu = await browser.evaluate(
                "[...document.querySelectorAll('.navbar a')]"
                ".map(a => [a.getAttribute('href'), a.textContent.trim()])"
            )
            assert ["storage", "Storage"] in menu  # Dask's own menu, on Dask's page
            assert ["individual-storage-memory", "Storage Memory"] in menu  # "More..."
            assert not browser.errors()

            # Opened before the work: the page must refresh itself.
            await browser.open(base + "/storage")
            await browser.wait_for_text("held by this cluster", *names, url)
            futures = await run_workload(c, plugin)
            await async_poll_for(lambda: page_has_data(s, plugin), timeout=15)
            st = plugin.storage_status()
            written = [w["bytes_written"] for w in st["workers"]]
            assert all(written) and st["stored_total"] == 6 and st["keys_in_lanes"] == 6
            text = await browser.wait_for_text(
                *map(format_bytes, written), format_bytes(st["bytes_in_lanes"])
            )
            assert "Traceback" not in text
            memory = await browser.source_data("storage_memory")
            assert memory is not None
            assert memory["worker"] == [*names, STORE_ROW]
            await shows_stored_bytes(browser, plugin)
            assert not browser.errors()
            shot = Path(os.environ.get("STORAGE_SCHEDULER_SCREENSHOT", tmp_path / "storage.png"))
            await browser.screenshot(shot)
            assert shot.stat().st_size > 10_000

            for plot in STORAGE_PLOTS:
                await browser.open(base + plot)
                await browser.wait_for("window.Bokeh && Bokeh.documents.length > 0")
                if plot.endswith("memory"):
                    memory = await browser.source_data("storage_memory")
                    assert memory is not None and memory["worker"] == [*names, STORE_ROW]
                    await shows_stored_bytes(browser, plugin)
                elif plot.endswith("throughput"):
                    rates = await browser.source_data("storage_throughput")
                    assert rates is not None and rates["time"]
                    assert max(rates["written"]) > 0 and max(rates["read"]) > 0
                    # Points of the scheduler's history, in ms since the epoch.
                    history = {t * 1000 for t, _, _ in plugin.history.samples}
                    assert set(rates["time"]) <= history
                elif plot.endswith("holdings"):
                    await browser.wait_for_text(
                        "stored since start", format_bytes(st["stored_bytes_total"]), url
                    )
                else:
                    await browser.wait_for_text(*names, *map(format_bytes, written))
                assert not browser.errors(), plot
        del futures


@needs_chromium
@gen_test(timeout=120)
async def test_plain_page_without_the_bokeh_dashboard(tmp_path: Path) -> None:
    """A scheduler without Dask's Bokeh dashboard serves the plain /storage page."""
    from distributed import Client, Scheduler, Worker

    url = str(tmp_path / "store")
    async with Scheduler(dashboard=False, dashboard_address="127.0.0.1:0") as s:
        assert _compat.bokeh_server(s) is None
        plugin = await enable_storage(s, url)
        async with (
            Worker(s.address, nthreads=1),
            Worker(s.address, nthreads=1),
            Client(s.address, asynchronous=True) as c,
        ):
            await run_workload(c, plugin)
            await async_poll_for(lambda: page_has_data(s, plugin), timeout=15)
            async with Chromium(tmp_path / "profile") as browser:
                await browser.open(f"http://127.0.0.1:{s.http_server.port}/storage")
                text = await browser.evaluate("document.documentElement.outerHTML")
                assert not browser.errors()
            assert "<h1>Storage</h1>" in text and "Traceback" not in text
            for addr in s.workers:
                assert addr in text
            assert "results stored since start</dt><dd>6 (" in text
            assert "<polyline" in text  # the throughput chart has data


def test_plain_page_when_bokeh_is_missing(tmp_path: Path) -> None:
    """Without bokeh (an optional dependency of distributed), /storage is the plain page."""
    script = f"""
import sys, asyncio, urllib.request
sys.modules["bokeh"] = None  # not installed
from distributed import Scheduler
from tests.utils import enable_storage

async def main():
    async with Scheduler(dashboard_address="127.0.0.1:0") as s:
        await enable_storage(s, {str(tmp_path / "store")!r})
        page = f"http://127.0.0.1:{{s.http_server.port}}/storage"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(page).read().decode())
        print("bokeh" in sys.modules and sys.modules["bokeh"] is None, text)

asyncio.run(main())
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
        env=cluster_env(),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("True ") and "<h1>Storage</h1>" in out.stdout


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
