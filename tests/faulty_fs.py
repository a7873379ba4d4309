"""A fault-injecting fsspec filesystem: ``faulty://<path>`` is the local ``<path>``, with
the failures a real store has.

It is a real filesystem, not a mock: the store opens it from its URL like any other
(through fsspec's async wrapper, as for ``memory://``), so a cluster's scheduler and
workers use it through their normal configuration. Faults are set on
:attr:`FaultyFileSystem.faults`, shared by every instance of the process (``gen_cluster``
runs the scheduler and its workers in one process)::

    faults = FaultyFileSystem.faults
    faults.fail_nth(3, "read")              # the third read from now raises
    faults.outage(2.0)                      # reads fail for 2 s, then work again
    faults.fail_writes(errno.ENOSPC)        # writes fail until faults.reset()
    faults.latency = 0.05                   # every call takes 50 ms longer

Processes of their own (``LocalCluster(processes=True)``) take an outage through their
storage options instead, as wall-clock times every process agrees on:
``storage_options={"outage_between": [t0, t1]}``.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

__all__ = ["Faults", "FaultyFileSystem", "os_error"]


class Faults:
    """What goes wrong, and what was asked; thread-safe (calls run in worker threads)."""

    #: Calls per operation, since the last reset.
    calls: Counter[str]
    #: (operation, path) of every call, since the last reset.
    log: list[tuple[str, str]]
    #: Calls per operation that a fault made fail.
    failed: Counter[str]
    #: (operation, path) of every call a fault made fail.
    failures: list[tuple[str, str]]
    #: Seconds every call sleeps first (in the caller's thread: never on an event loop).
    latency: float

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """No faults, no counts."""
        with self._lock:
            self.calls = Counter()
            self.log = []
            self.failed = Counter()
            self.failures = []
            self.latency = 0.0
            self._nth: dict[str, dict[int, Callable[[], OSError]]] = {}
            self._outage: tuple[float, frozenset[str], Callable[[], OSError]] | None = None
            self._write_errno: int | None = None

    def fail_nth(
        self, n: int, op: str = "read", error: Callable[[], OSError] = ConnectionResetError
    ) -> None:
        """Make the ``n``-th call of ``op`` from now (1: the next) raise ``error()``."""
        with self._lock:
            self._nth.setdefault(op, {})[self.calls[op] + n] = error

    def outage(
        self,
        seconds: float,
        ops: Iterable[str] = ("read",),
        error: Callable[[], OSError] = ConnectionResetError,
    ) -> None:
        """Make every call of ``ops`` raise ``error()`` for ``seconds`` from now."""
        with self._lock:
            self._outage = (time.monotonic() + seconds, frozenset(ops), error)

    def fail_writes(self, code: int | None) -> None:
        """Make every write raise ``OSError(code)`` (``ENOSPC``, ``EROFS``); None: stop."""
        with self._lock:
            self._write_errno = code

    @property
    def in_outage(self) -> bool:
        return self._outage is not None and time.monotonic() < self._outage[0]

    def enter(self, op: str, path: str, window: tuple[float, float] | None) -> None:
        """Count a call of ``op`` on ``path``, wait the latency, raise its fault if any."""
        with self._lock:
            self.calls[op] += 1
            self.log.append((op, path))
            error = self._nth.get(op, {}).pop(self.calls[op], None)
            if error is None and self._outage is not None:
                until, ops, outage_error = self._outage
                if op in ops and time.monotonic() < until:
                    error = outage_error
            if error is None and window is not None and op == "read":
                if window[0] <= time.time() < window[1]:
                    error = ConnectionResetError
            exc: OSError | None = error() if error is not None else None
            if exc is None and op == "write" and self._write_errno is not None:
                exc = OSError(self._write_errno, os.strerror(self._write_errno), path)
            if exc is not None:
                self.failed[op] += 1
                self.failures.append((op, path))
            latency = self.latency
        if latency:
            time.sleep(latency)
        if exc is not None:
            raise exc


class FaultyFileSystem(AbstractFileSystem):
    """The local filesystem under the ``faulty://`` protocol, failing on demand.

    Parameters
    ----------
    outage_between
        Wall-clock (``time.time``) start and end of an outage of reads, for clusters
        whose processes do not share :attr:`faults`.
    latency
        Seconds every call of this instance sleeps first.
    """

    protocol = "faulty"
    root_marker = "/"
    #: The faults of every instance in this process.
    faults: ClassVar[Faults] = Faults()

    def __init__(
        self,
        outage_between: tuple[float, float] | list[float] | None = None,
        latency: float = 0.0,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self._local = LocalFileSystem()
        window = tuple(outage_between) if outage_between is not None else None
        self._window: tuple[float, float] | None = window  # type: ignore[assignment]
        self._latency = latency

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        path = str(path)
        if path.startswith("faulty://"):
            path = path[len("faulty://") :]
        return LocalFileSystem._strip_protocol(path)

    def _enter(self, op: str, path: str) -> None:
        if self._latency:
            time.sleep(self._latency)
        self.faults.enter(op, path, self._window)

    # Every method the store's backend calls (through fsspec's async wrapper), and what
    # the base class builds others from.

    def cat_file(
        self, path: str, start: int | None = None, end: int | None = None, **kw: Any
    ) -> bytes:
        path = self._strip_protocol(path)
        self._enter("read", path)
        return self._local.cat_file(path, start=start, end=end)  # type: ignore[no-any-return]

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kw: Any) -> None:
        path = self._strip_protocol(path)
        self._enter("write", path)
        # Published by rename, as object stores publish whole objects: a reader of a
        # local file being written would see it truncated.
        self._local.makedirs(self._local._parent(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(value)
        os.replace(tmp, path)

    def info(self, path: str, **kw: Any) -> dict[str, Any]:
        path = self._strip_protocol(path)
        self._enter("info", path)
        return self._local.info(path)  # type: ignore[no-any-return]

    def ls(self, path: str, detail: bool = True, **kw: Any) -> Any:
        path = self._strip_protocol(path)
        self._enter("list", path)
        return self._local.ls(path, detail=detail)

    def find(
        self, path: str, maxdepth: int | None = None, withdirs: bool = False, **kw: Any
    ) -> Any:
        path = self._strip_protocol(path)
        self._enter("list", path)
        return self._local.find(path, maxdepth=maxdepth, withdirs=withdirs, **kw)

    def rm_file(self, path: str) -> None:
        path = self._strip_protocol(path)
        self._enter("delete", path)
        self._local.rm_file(path)

    def _rm(self, path: str) -> None:
        self.rm_file(path)

    def mkdir(self, path: str, create_parents: bool = True, **kw: Any) -> None:
        self._local.mkdir(self._strip_protocol(path), create_parents=create_parents)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self._local.makedirs(self._strip_protocol(path), exist_ok=exist_ok)

    def _open(self, path: str, mode: str = "rb", **kw: Any) -> Any:
        path = self._strip_protocol(path)
        self._enter("write" if "w" in mode or "a" in mode else "read", path)
        return self._local._open(path, mode=mode, **kw)


def os_error(code: int) -> Callable[[], OSError]:
    """An error factory for :meth:`Faults.fail_nth` and :meth:`Faults.outage`."""
    return lambda: OSError(code, os.strerror(code))


fsspec.register_implementation("faulty", FaultyFileSystem, clobber=True)
