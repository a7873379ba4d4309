"""Every deployment snippet and runnable example of the README runs as written.

Only the store URL (and, for S3, the bucket and endpoint) is pointed at test resources.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from distributed import Client

from storage_scheduler import Store
from tests.cluster_cli import cluster_env

README = Path(__file__).resolve().parents[1] / "README.md"
README_URL = "file:///tmp/dask-results"

pytestmark = [pytest.mark.slow]


def snippet(name: str) -> str:
    match = re.search(rf"<!-- readme-test: {name} -->\n```\w+\n(.*?)```", README.read_text(), re.S)
    assert match, f"no snippet {name!r} in the README"
    return match.group(1)


def python_block(marker: str) -> str:
    for block in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S):
        if marker in block:
            return block
    raise AssertionError(f"no python block with {marker!r} in the README")


def stored(url: str, **options: Any) -> dict[Any, int]:
    async def go() -> dict[Any, int]:
        store = Store.from_url(url, **options)
        try:
            return await store.list()
        finally:
            store.close()

    return asyncio.run(go())


def run_python(code: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    # python -c: processes spawned by LocalCluster do not re-run the snippet.
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=cluster_env(env),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def run_shell_cluster(code: str, cwd: Path, env: dict[str, str] | None = None) -> None:
    """Run a snippet that starts a scheduler and a worker in the background; use them."""
    proc = subprocess.Popen(
        ["bash", "-c", code + "\nwait"],
        cwd=cwd,
        env={**cluster_env(env), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                json.loads((cwd / "scheduler.json").read_text())
                break
            except (OSError, ValueError):
                assert time.monotonic() < deadline and proc.poll() is None, "no scheduler"
                time.sleep(0.1)
        with Client(scheduler_file=str(cwd / "scheduler.json"), timeout=60) as c:
            c.wait_for_workers(1, timeout=60)
            future = c.submit(sum, [1, 2, 3], key="readme-sum")
            assert future.result() == 6
            assert any(h.startswith("storage://") for h in c.who_has([future])["readme-sum"])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_command_lines(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/store"
    run_shell_cluster(snippet("command-lines").replace(README_URL, url), tmp_path)
    assert "readme-sum" in stored(url)


def test_environment_variables(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/store"
    run_shell_cluster(snippet("env").replace(README_URL, url), tmp_path)
    assert "readme-sum" in stored(url)


def test_yaml_config(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/store"
    config = tmp_path / "config"
    config.mkdir()
    (config / "storage.yaml").write_text(snippet("yaml").replace(README_URL, url))
    code = (
        "from distributed import Client, LocalCluster\n"
        "with LocalCluster(n_workers=1, dashboard_address=':0') as cluster, Client(cluster) as c:\n"
        "    print(c.submit(sum, [1, 2, 3], key='readme-sum').result())\n"
    )
    assert run_python(code, tmp_path, {"DASK_CONFIG": str(config)}).strip() == "6"
    assert "readme-sum" in stored(url)


@pytest.mark.parametrize("name", ["local-cluster", "enable"])
def test_python_snippets(name: str, tmp_path: Path) -> None:
    url = f"file://{tmp_path}/store"
    out = run_python(snippet(name).replace(README_URL, url), tmp_path)
    assert out.strip().splitlines()[-1] == "6"
    assert len(stored(url)) == 1  # the sum's result


def test_credentials(s3_store_url: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    url, options = s3_store_url
    code = (
        snippet("credentials")
        .replace("s3://my-bucket/dask-results", url)
        .replace("https://s3.example.com", options["endpoint_url"])
    ) + "print(client.submit(sum, [1, 2, 3]).result())\n"
    assert run_python(code, tmp_path).strip().splitlines()[-1] == "6"
    assert len(stored(url, **options)) == 1


def test_persist_example_runs_twice(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/store"
    code = python_block("persist_demo.py").replace(README_URL, url)
    script = tmp_path / "persist_demo.py"
    script.write_text(code)
    outputs = []
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path
        )
        assert out.returncode == 0, out.stderr
        outputs.append(float(out.stdout.strip().splitlines()[-1]))
    assert outputs[0] == outputs[1]
    assert len(stored(url)) >= 16  # the persisted blocks of y stayed
