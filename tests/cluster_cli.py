"""Start the real ``dask scheduler`` and ``dask worker`` command lines for tests and the demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.s3server import _die_with_parent

ROOT = Path(__file__).resolve().parents[1]


def cluster_env(
    extra: dict[str, str] | None = None, path: list[str] | None = None
) -> dict[str, str]:
    """Environment of cluster processes: this checkout (and ``path``) importable."""
    env = {**os.environ, **(extra or {})}
    # Task functions defined in tests/ and ci/ must be importable by the workers.
    parts = [*(path or []), str(ROOT), env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, parts))
    return env


def dask_cmd() -> str:
    return os.path.join(os.path.dirname(sys.executable), "dask")


class CommandLineCluster:
    """A ``dask scheduler`` with ``--preload storage_scheduler`` and ``n`` ``dask worker`` processes."""

    def __init__(
        self,
        directory: Path,
        storage_url: str,
        storage_options: dict[str, Any] | None = None,
        n_workers: int = 2,
        nthreads: int = 1,
        memory_limit: str = "0",
        log: Path | None = None,
        env: dict[str, str] | None = None,
        path: list[str] | None = None,
    ):
        self.directory = directory
        self.scheduler_file = directory / "scheduler.json"
        self.storage_url = storage_url
        self.storage_options = storage_options or {}
        self.n_workers = n_workers
        self.nthreads = nthreads
        self.memory_limit = memory_limit
        self.log = log or directory / "cluster.log"
        self.env = cluster_env(env, path)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logfile: Any = None

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [dask_cmd(), *args],
            stdout=self._logfile,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.directory,
            preexec_fn=_die_with_parent,
        )
        self.procs[name] = proc
        return proc

    def start(self) -> CommandLineCluster:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._logfile = open(self.log, "ab")
        args = [
            "scheduler",
            "--host", "127.0.0.1",
            "--port", "0",
            "--dashboard-address", ":0",
            "--scheduler-file", str(self.scheduler_file),
            "--preload", "storage_scheduler",
            "--storage-url", self.storage_url,
        ]  # fmt: skip
        for k, v in self.storage_options.items():
            args += ["--storage-option", f"{k}={v}"]
        self._spawn("scheduler", args)
        self._wait_for_file()
        for i in range(self.n_workers):
            self.start_worker(f"worker-{i}")
        return self

    def start_worker(self, name: str) -> subprocess.Popen[bytes]:
        return self._spawn(
            name,
            [
                "worker",
                "--scheduler-file", str(self.scheduler_file),
                "--name", name,
                "--nthreads", str(self.nthreads),
                "--memory-limit", self.memory_limit,
                "--no-nanny",
                "--host", "127.0.0.1",
                "--dashboard-address", ":0",
                "--preload", "storage_scheduler",
            ],
        )  # fmt: skip

    def _wait_for_file(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.scheduler_file.exists():
            if self.procs["scheduler"].poll() is not None:
                raise RuntimeError(f"dask scheduler exited; see {self.log}")
            if time.monotonic() > deadline:
                raise TimeoutError("dask scheduler did not start")
            time.sleep(0.1)
        # The file may be written before the contents are flushed.
        while True:
            try:
                json.loads(self.scheduler_file.read_text())
                return
            except ValueError:
                time.sleep(0.05)

    @property
    def address(self) -> str:
        return str(json.loads(self.scheduler_file.read_text())["address"])

    def kill(self) -> None:
        """SIGKILL every process of the cluster, scheduler included: a crash."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            proc.wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._logfile is not None:
            self._logfile.close()

    def __enter__(self) -> CommandLineCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
