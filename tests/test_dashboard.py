"""The storage views on clusters started every way (preload, LocalCluster + enable), under
load, and ``storage_scheduler.status``'s text and HTML."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from dask.utils import format_bytes
from distributed import Client, LocalCluster, wait
from distributed.utils_test import async_poll_for, gen_test

import storage_scheduler
from storage_scheduler import StorageReport, StorageSchedulerError
from storage_scheduler._protocol import StorageStatus, WorkerStatus, empty_heartbeat
from storage_scheduler.dashboard.report import format_html, format_status
from tests.cdp import Chromium
from tests.cluster_cli import CommandLineCluster
from tests.test_observability import STORAGE_PLOTS, heartbeats_carry_writes, needs_chromium
from tests.utils import storage_cluster

pytestmark = [pytest.mark.slow]


def block(i: int) -> np.ndarray:
    time.sleep(1)
    return np.random.default_rng(i).random(250_000)  # 2 MB


def total(*blocks: np.ndarray) -> float:
    time.sleep(0.5)
    return float(sum(b.sum() for b in blocks))


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:
        return str(r.read().decode())


@needs_chromium
def test_preload_cluster_under_load(tmp_path: Path) -> None:
    """``dask scheduler --preload storage_scheduler``: the views are on its dashboard, and
    render while a workload writes and reads. The screenshot is the README's
    (``STORAGE_SCHEDULER_SCREENSHOT=docs/dashboard-storage.png``)."""
    shot = Path(os.environ.get("STORAGE_SCHEDULER_SCREENSHOT", tmp_path / "storage.png"))
    with (
        CommandLineCluster(tmp_path / "cluster", str(tmp_path / "store"), nthreads=2) as cluster,
        Client(cluster.address) as c,
    ):
        port = json.loads(cluster.scheduler_file.read_text())["services"]["dashboard"]
        base = f"http://127.0.0.1:{port}"
        plots = json.loads(get(base + "/individual-plots.json"))
        assert set(STORAGE_PLOTS) <= set(plots.values())
        assert 'href="storage"' in get(base + "/status")
        # Waves of 2 MB blocks (about 25 s of work), each wave summed by a task that
        # reads some of them from the store.
        blocks = c.map(block, range(100))
        sums = [c.submit(total, *blocks[i : i + 10], pure=False) for i in range(0, 100, 10)]

        async def look() -> None:
            async with Chromium(tmp_path / "profile") as browser:
                await browser.open(base + "/storage", width=1200, height=760)
                await browser.wait_for_text("worker-0", "worker-1", "held by this cluster")
                await asyncio.sleep(8)  # some throughput history, the workload running
                await browser.wait_for_text("MiB")
                await browser.screenshot(shot)
                assert not browser.errors()

        asyncio.run(look())
        assert not all(f.done() for f in sums), "the workload ended before the screenshot"
        assert any(f.done() for f in sums), "nothing was read back before the screenshot"
        c.cancel(blocks + sums)
        assert shot.stat().st_size > 20_000


@needs_chromium
def test_local_cluster_enable_and_status(tmp_path: Path) -> None:
    """Storage enabled from a client on a running LocalCluster: the views join the
    running dashboard; ``status`` works with a synchronous client."""
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0"
        ) as cluster,
        Client(cluster) as c,
    ):
        base = cluster.dashboard_link.rsplit("/", 1)[0]
        assert "storage" not in json.dumps(json.loads(get(base + "/individual-plots.json")))
        with pytest.raises(StorageSchedulerError, match="not enabled"):
            storage_scheduler.status(c)
        storage_scheduler.enable(c, str(tmp_path / "store"))
        assert set(STORAGE_PLOTS) <= set(json.loads(get(base + "/individual-plots.json")).values())
        assert 'href="storage"' in get(base + "/status")
        x = c.submit(np.arange, 100_000, key="x")
        assert int(c.submit(np.sum, x, key="y").result()) == sum(range(100_000))

        report = storage_scheduler.status(c)
        assert isinstance(report, StorageReport)
        assert report.data["stored_total"] == 2
        assert str(report) == repr(report) == format_status(report.data)

        async def render() -> None:
            async with Chromium(tmp_path / "profile") as browser:
                await browser.open(base + "/storage")
                await browser.wait_for_text(*(w["name"] for w in report.data["workers"]))
                assert not browser.errors()

        asyncio.run(render())


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


@gen_test(timeout=90)
async def test_status_report_text_and_html(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    async with storage_cluster(url) as (c, s, plugin):
        xs = c.map(np.full, [50_000] * 4, range(4), key=[f"x-{i}" for i in range(4)])
        await wait(xs)
        await async_poll_for(lambda: heartbeats_carry_writes(s, plugin), timeout=15)
        report = await storage_scheduler.status(c)  # asynchronous client: awaitable

    text = str(report)
    assert text == repr(report)
    lines = text.splitlines()
    assert lines[0] == f"store: {url}  (writing)"
    assert lines[1].startswith("held by this cluster: 4 keys, ")
    assert lines[2].split() == [
        "worker", "RAM", "results", "RAM", "tasks", "written", "read", "failures", "fallbacks",
    ]  # fmt: skip
    workers = report.data["workers"]
    assert [line.split()[0] for line in lines[3:]] == [w["name"] for w in workers] + ["total"]
    assert format_bytes(sum(w["bytes_written"] for w in workers)) in lines[-1]

    page = report._repr_html_()
    parser = _Tags()
    parser.feed(page)
    shown = " ".join(parser.text)
    for w in workers:
        assert w["name"] in shown and format_bytes(w["bytes_written"]) in shown
    assert url in shown and "4 keys" in shown and "Reused instead of computed" in shown
    # Self-contained: no scripts, styles sheets, images or links to fetch.
    assert {t for t, _ in parser.tags} <= {"div", "h3", "table", "tr", "th", "td", "details",
                                           "summary", "strong", "span"}  # fmt: skip
    assert not any(k in ("src", "href") for _, attrs in parser.tags for k in attrs)
    assert len(page) < 20_000


def test_status_html_escapes_names() -> None:
    worker = WorkerStatus(
        **empty_heartbeat(), address="tcp://10.0.0.1:1", name="<script>w</script>",
        results_ram=2**20, tasks_ram=2**21, memory_limit=0,
    )  # fmt: skip
    status = StorageStatus(
        url="file:///tmp/a&b<c>", store_id="s", lanes=[], keys_in_lanes=0, bytes_in_lanes=0,
        stored_total=0, unreadable_total=0, reused_total=0, deleted_total=0, catalog_keys=0,
        catalog_bytes=0, stored_bytes_total=0, writing=False, results="all", prefer="store",
        workers=[worker], history=[],
    )  # fmt: skip
    page = format_html(status)
    assert "<script>" not in page and "&lt;script&gt;w&lt;/script&gt;" in page
    assert "file:///tmp/a&amp;b&lt;c&gt;" in page and "not writing" in page
    assert re.search(r"<td[^>]*>1\.00 MiB</td>", page)
    assert format_status(status).splitlines()[0] == (
        "store: file:///tmp/a&b<c>  (not writing new results)"
    )
