"""storage_scheduler.enable/disable on stock clusters, and secrets kept out of sight."""

from __future__ import annotations

import asyncio
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import dask
from distributed import Client, LocalCluster, wait
from distributed.utils_test import poll_for

import storage_scheduler
from storage_scheduler import StorageSchedulerError, Store, StoreUnavailableError
from tests.cluster_cli import cluster_env, dask_cmd
from tests.s3server import free_port
from tests.utils import cataloged_keys, lane_keys

pytestmark = [pytest.mark.slow]

SECRET = "wJalrXUtnFEMI-K7MDENG-do-not-print"


def stock_cluster(n_workers: int = 2) -> LocalCluster:
    return LocalCluster(
        n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0"
    )


def test_enable_on_a_running_stock_cluster(backend: tuple[str, dict[str, Any]]) -> None:
    url, options = backend
    with stock_cluster() as cluster, Client(cluster) as c:
        info = storage_scheduler.enable(c, url, **options)
        assert info["url"] == url and len(info["lanes"]) == 8
        a, b = sorted(c.scheduler_info()["workers"])
        x = c.submit(np.arange, 1000, key="x", workers=[a])
        y = c.submit(np.sum, x, key="y", workers=[b])
        assert y.result() == sum(range(1000))
        assert lane_keys(c.who_has([x, y])) == {"x", "y"}
        log = c.run(lambda dask_worker: list(dask_worker.transfer_incoming_log), workers=[b])[b]
        assert log and all(e["who"].startswith("storage://") for e in log)

        # Idempotent; another URL is refused.
        assert storage_scheduler.enable(c, url, **options)["url"] == url
        with pytest.raises(StorageSchedulerError, match="already enabled"):
            storage_scheduler.enable(c, "memory://elsewhere")

        # A worker added later stores its results too.
        cluster.scale(3)
        c.wait_for_workers(3, timeout=60)
        (new,) = set(c.scheduler_info()["workers"]) - {a, b}
        z = c.submit(np.ones, 10, key="z", workers=[new])
        wait(z)
        assert lane_keys(c.who_has([z])) == {"z"}

        # disable: new results stay in worker memory; stored ones stay readable.
        assert storage_scheduler.disable(c)["writing"] is False
        w = c.submit(np.ones, 5, key="w", workers=[a])
        wait(w)
        assert lane_keys(c.who_has([w])) == set()
        np.testing.assert_array_equal(c.gather(x), np.arange(1000))
        assert storage_scheduler.enable(c)["writing"] is True
        v = c.submit(np.ones, 5, key="v", workers=[a])
        wait(v)
        assert lane_keys(c.who_has([v])) == {"v"}

    store = Store.from_url(url, **options)
    assert set(asyncio.run(store.list())) & {"x", "y", "z", "w", "v"} == {"x", "y", "z", "v"}
    store.close()


def test_enable_with_unreachable_store_fails_cleanly() -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    # LocalCluster runs its scheduler in this process: this config reaches it.
    with (
        dask.config.set({"storage-scheduler.connect-timeout": "5s"}),
        stock_cluster(1) as cluster,
        Client(cluster) as c,
    ):
        with pytest.raises(StoreUnavailableError, match="s3://bucket/prefix") as info:
            storage_scheduler.enable(
                c, "s3://bucket/prefix", endpoint_url=endpoint, key="k", secret=SECRET
            )
        assert SECRET not in str(info.value)
        # Nothing half-installed: the cluster runs as before, and enable works afterwards.
        assert c.submit(sum, [1, 2]).result() == 3
        with pytest.raises(StorageSchedulerError, match="not enabled"):
            storage_scheduler.disable(c)


def test_enable_names_a_worker_without_the_package(tmp_path: Path) -> None:
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "storage_scheduler.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'storage_scheduler'\")\n"
    )
    with stock_cluster(1) as cluster, Client(cluster) as c:
        proc = subprocess.Popen(
            [dask_cmd(), "worker", cluster.scheduler_address, "--name", "bare", "--nthreads", "1",
             "--no-nanny", "--dashboard-address", ":0", "--host", "127.0.0.1"],
            env=cluster_env(path=[str(shadow)]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            c.wait_for_workers(2, timeout=60)
            bare = next(a for a, w in c.scheduler_info()["workers"].items() if w["name"] == "bare")
            with pytest.raises(StorageSchedulerError, match=f"{bare}.*storage_scheduler"):
                storage_scheduler.enable(c, f"file://{tmp_path}/store")
        finally:
            proc.terminate()
            proc.wait(30)


def test_secrets_stay_out_of_logs_pages_and_errors(
    s3_store_url: tuple[str, dict[str, Any]], capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    url, options = s3_store_url
    options = {**options, "secret": SECRET}  # moto accepts any secret
    seen: list[str] = []
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0",
        silence_logs=False,
    ) as cluster, Client(cluster) as c:  # fmt: skip
        storage_scheduler.enable(c, url, **options)
        x = c.submit(np.arange, 10, key="x")
        assert int(c.submit(np.sum, x, key="y").result()) == 45
        # Errors produced by the project: a damaged object, a bad enable.
        with pytest.raises(StorageSchedulerError) as info:
            storage_scheduler.enable(c, "s3://other/prefix", secret=SECRET)
        seen.append(str(info.value))
        seen.append(
            repr(
                c.run_on_scheduler(
                    lambda dask_scheduler: (
                        dask_scheduler.plugins["storage-scheduler"].store_settings
                    )
                )
            )
        )
        # Every dashboard page a user would open.
        base = cluster.dashboard_link.rsplit("/", 1)[0]
        for page in ["/status", "/workers", "/info/main/workers.html", "/info/main/scheduler.html",
                     "/individual-plugins", "/metrics", "/sitemap.json"]:  # fmt: skip
            try:
                seen.append(
                    urllib.request.urlopen(base + page, timeout=30).read().decode(errors="replace")
                )
            except OSError:
                pass
        assert len(seen) >= 5
        # The scheduler's background round has run with the storage options (catalog
        # written, lease renewed): anything it logs is in the output checked below.
        store = Store.from_url(url, **options)
        try:
            poll_for(lambda: {"x", "y"} <= asyncio.run(cataloged_keys(store)), timeout=30)
        finally:
            store.close()
    out, err = capfd.readouterr()
    seen += [out, err]
    assert "storage-scheduler" in err or "storage_scheduler" in err  # the logs were captured
    for text in seen:
        assert SECRET not in text
