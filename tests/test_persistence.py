"""Results that outlive the cluster, with real processes: restart, resume, staleness."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import dask.array as da
from dask import delayed
from distributed import Client, LocalCluster, wait

from tests.cluster_cli import CommandLineCluster, cluster_env
from tests.utils import record_run, runs

pytestmark = [pytest.mark.slow]


def leaf(i: int, marks: str) -> int:
    record_run(marks, f"leaf-{i}")
    return i


def combine(*xs: int, marks: str, name: str, delay: float = 0.0) -> int:
    record_run(marks, name)
    time.sleep(delay)
    return sum(xs)


def tree(marks: str, n: int = 1024, delay: float = 0.0) -> Any:
    """n leaves reduced pairwise: 2n - 1 tasks (2,047 for n = 1,024)."""
    level = [delayed(leaf)(i, marks, dask_key_name=f"leaf-{i}") for i in range(n)]
    depth = 0
    while len(level) > 1:
        depth += 1
        level = [
            delayed(combine)(a, b, marks=marks, name=f"node-{depth}-{i}", delay=delay,
                             dask_key_name=f"node-{depth}-{i}")
            for i, (a, b) in enumerate(zip(level[::2], level[1::2], strict=True))
        ]  # fmt: skip
    return level[0]


def block(b: np.ndarray, marks: str, block_info: Any = None) -> np.ndarray:
    record_run(marks, "block-" + "-".join(map(str, block_info[0]["chunk-location"])))
    return b * 2


def test_full_restart_executes_nothing(backend: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    url, options = backend
    marks = tmp_path / "runs"
    marks.mkdir()
    # 2,047 tasks on a local directory (catalog flushes land mid-run); fewer on moto,
    # whose every write takes milliseconds.
    n = 1024 if url.startswith("file://") else 256
    x = da.arange(4000, chunks=100).map_blocks(block, str(marks), dtype=int)
    results = []
    for session in range(2):
        with (
            CommandLineCluster(tmp_path / f"s{session}", url, options) as cluster,
            Client(scheduler_file=str(cluster.scheduler_file)) as c,
        ):
            c.wait_for_workers(2, timeout=60)
            t = tree(str(marks), n)
            y = x.persist()
            wait(y)
            results.append((c.compute(t).result(), c.compute(y).result()))
            if session == 0:
                first = sum(runs(marks).values())
                assert first == 2 * n - 1 + 40
    assert sum(runs(marks).values()) == first  # the second cluster ran no task of ours
    assert results[0][0] == results[1][0] == sum(range(n))
    np.testing.assert_array_equal(results[0][1], results[1][1])
    np.testing.assert_array_equal(results[1][1], np.arange(4000) * 2)


def test_client_restart_reuses(tmp_path: Path) -> None:
    marks = tmp_path / "runs"
    marks.mkdir()
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            scheduler_kwargs={
                "preload": ["storage_scheduler"],
                "preload_argv": ["--storage-url", str(tmp_path / "store")],
            },
        ) as cluster,
        Client(cluster) as c,
    ):
        t = tree(str(marks), n=64)
        assert c.compute(t).result() == sum(range(64))
        before = sum(runs(marks).values())
        c.restart()
        assert c.compute(t).result() == sum(range(64))
        assert sum(runs(marks).values()) == before


def test_resume_after_crash(tmp_path: Path) -> None:
    """SIGKILL the scheduler and every worker halfway; a new cluster runs only the rest."""
    marks = tmp_path / "runs"
    marks.mkdir()
    url = f"file://{tmp_path}/store"
    env = {"DASK_STORAGE_SCHEDULER__FLUSH_INTERVAL": "20ms"}
    t = tree(str(marks), n=128, delay=0.05)  # 255 tasks, ~0.05 s each on 2 threads
    with CommandLineCluster(tmp_path / "s0", url, env=env) as cluster:
        with Client(scheduler_file=str(cluster.scheduler_file)) as c:
            c.wait_for_workers(2, timeout=60)
            future = c.compute(t)
            while sum(runs(marks).values()) < 128:
                time.sleep(0.02)
            cluster.kill()
            done_at_kill = sum(runs(marks).values())
            del future
    with (
        CommandLineCluster(tmp_path / "s1", url, env=env) as cluster,
        Client(scheduler_file=str(cluster.scheduler_file)) as c,
    ):
        c.wait_for_workers(2, timeout=60)
        assert c.compute(t).result() == sum(range(128))
    second = sum(runs(marks).values()) - done_at_kill
    # Only the unfinished tasks ran again, give or take those in flight at the kill
    # (two threads) and those whose catalog flush had not landed yet (a 20 ms interval,
    # plus the flush's own write on a loaded machine).
    assert 255 - done_at_kill <= second <= 255 - done_at_kill + 16, (done_at_kill, second)


SESSION = """
import sys
from dask import delayed
from distributed import Client
import userfunc
with Client(scheduler_file=sys.argv[1]) as c:
    print(c.compute(delayed(userfunc.f)(1, dask_key_name="x")).result())
"""


def test_edited_module_function_is_recomputed(tmp_path: Path) -> None:
    """A function edited between runs, with an unchanged explicit key, is recomputed."""
    code = tmp_path / "code"
    code.mkdir()
    marks = tmp_path / "runs"
    marks.mkdir()
    module = code / "userfunc.py"
    body = textwrap.dedent(
        """
        from tests.utils import record_run
        def f(x):
            record_run({marks!r}, "f")
            return x + {n}
        """
    )
    url = f"file://{tmp_path}/store"
    outputs = []
    for i, n in enumerate([1, 1, 100]):
        module.write_text(body.format(marks=str(marks), n=n))
        with CommandLineCluster(tmp_path / f"s{i}", url, path=[str(code)]) as cluster:
            out = subprocess.run(
                [sys.executable, "-c", SESSION, str(cluster.scheduler_file)],
                env=cluster_env(path=[str(code)]),
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert out.returncode == 0, out.stderr
            outputs.append(int(out.stdout.strip().splitlines()[-1]))
    assert outputs == [2, 2, 101]
    assert runs(marks) == {"f": 2}  # the unchanged second run reused the first result
