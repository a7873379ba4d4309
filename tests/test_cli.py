"""The real command lines: dask scheduler --preload storage_scheduler, dask worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from distributed import Client, wait

from storage_scheduler import Store
from tests.cluster_cli import CommandLineCluster, dask_cmd
from tests.s3server import free_port
from tests.utils import consume, lane_keys, produce, runs, stored_value

pytestmark = [pytest.mark.slow]


def test_command_line_cluster(backend: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    url, options = backend
    marks = tmp_path / "runs"
    marks.mkdir()
    with (
        CommandLineCluster(tmp_path, url, options) as cluster,
        Client(scheduler_file=str(cluster.scheduler_file)) as c,
    ):
        c.wait_for_workers(2, timeout=60)
        workers = c.scheduler_info()["workers"]
        by_name = {w["name"]: addr for addr, w in workers.items()}
        a, b = by_name["worker-0"], by_name["worker-1"]
        store = Store.from_url(url, **options)

        # 1. Every result has a lane in who_has, and its object is in the store.
        producers = [
            c.submit(produce, i, str(marks), key=f"produce-{i}", workers=[a]) for i in range(6)
        ]
        wait(producers)
        who_has = c.who_has(producers)
        assert lane_keys(who_has) == {p.key for p in producers}
        assert set(c.sync(store.list)) >= {p.key for p in producers}

        # 2. Consumers pinned to the other worker read their inputs from the store.
        consumers = [
            c.submit(consume, p, str(marks), i, 0.2, key=f"consume-{i}", workers=[b])
            for i, p in enumerate(producers)
        ]
        wait(consumers[:2])
        incoming = c.run(lambda dask_worker: dask_worker.transfer_incoming_log, workers=[b])[b]
        assert incoming and all(e["who"].startswith("storage://") for e in incoming), incoming

        # 3. SIGKILL the producers' worker while consumers still run: nothing reruns.
        pid = c.run(os.getpid, workers=[a])[a]
        os.kill(pid, signal.SIGKILL)
        assert c.gather(consumers) == [100_000.0 * i for i in range(6)]
        counts = runs(marks)
        assert all(counts[f"produce-{i}"] == 1 for i in range(6)), counts
        outgoing = c.run(lambda dask_worker: list(dask_worker.transfer_outgoing_log), workers=[b])[
            b
        ]
        assert not [e for e in outgoing if e["who"] in (a, b)]  # not one byte went peer-to-peer

        # 4. Retiring a worker that holds stored results copies nothing to its peers.
        cluster.start_worker("worker-2")
        c.wait_for_workers(2, timeout=60)
        c_addr = next(
            addr for addr, w in c.scheduler_info()["workers"].items() if w["name"] == "worker-2"
        )
        held = [c.submit(produce, i, str(marks), key=f"held-{i}", workers=[b]) for i in range(4)]
        wait(held)
        c.retire_workers([b])
        incoming = c.run(
            lambda dask_worker: list(dask_worker.transfer_incoming_log), workers=[c_addr]
        )
        assert incoming[c_addr] == []
        assert lane_keys(c.who_has(held)) == {h.key for h in held}
        assert [float(x.sum()) for x in c.gather(held)] == [100_000.0 * i for i in range(4)]
        np.testing.assert_array_equal(c.sync(stored_value, store, "held-1"), np.full(100_000, 1.0))
        store.close()


@pytest.mark.parametrize(
    "url, options",
    [
        ("s4://bucket/prefix", []),
        (
            "s3://bucket/prefix",
            ["--storage-option", f"endpoint_url=http://127.0.0.1:{free_port()}"],
        ),
    ],
    ids=["misspelled-protocol", "unreachable-endpoint"],
)
def test_bad_store_url_stops_scheduler(url: str, options: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "DASK_STORAGE_SCHEDULER__CONNECT_TIMEOUT": "10s"}
    proc = subprocess.run(
        [
            dask_cmd(),
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--dashboard-address",
            ":0",
            "--preload",
            "storage_scheduler",
            "--storage-url",
            url,
            *options,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    assert url in proc.stderr
    assert "Traceback" in proc.stderr  # and the cause is shown


def test_worker_preload_alone(tmp_path: Path) -> None:
    """A worker started with --preload storage_scheduler joins a storage cluster normally."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import storage_scheduler; print(storage_scheduler.dask_setup.name)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "dask-setup"
