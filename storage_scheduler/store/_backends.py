"""How the store moves bytes: one async interface, two implementations, chosen once.

The :class:`~storage_scheduler.store.Store` decides *what* to read and write (object
names, framing, verification, retries, counters); a :class:`Backend` only moves bytes,
and never blocks the event loop that awaits it:

* :class:`LocalBackend`, for local directories, calls the OS directly in the store's
  bounded thread pool. It can do better than fsspec there: writes are staged beside the
  target and renamed into place (atomic, on the same filesystem), and large objects are
  read by mapping the page cache instead of copying it.
* :class:`FsspecBackend`, for every other filesystem, speaks fsspec's async API. Async
  filesystems (s3fs, gcsfs, ...) keep their sessions on fsspec's I/O loop, so their
  coroutines run there and are awaited from the caller's loop, which may be any of
  several in one process. Sync filesystems (``memory://``, ...) are wrapped in fsspec's
  own :class:`~fsspec.implementations.asyn_wrapper.AsyncFileSystemWrapper`, which runs
  each call with :func:`asyncio.to_thread`. Objects larger than one part are streamed to
  S3 from their frames (:mod:`~storage_scheduler.store._multipart`); elsewhere an object
  is written with one call, its frames joined.

Writes publish a whole object or nothing: a reader never sees a partial object.
"""

from __future__ import annotations

import abc
import asyncio
import functools
import io
import mmap
import os
import stat
import sys
import weakref
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import Any, TypeVar

import fsspec
import psutil
from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper
from fsspec.implementations.local import LocalFileSystem

from storage_scheduler.store import _multipart
from storage_scheduler.store.serialize import Buffer

__all__ = ["MAP_MIN_BYTES", "Backend", "FsspecBackend", "LocalBackend", "open_backend"]

T = TypeVar("T")

#: Local objects at least this large are read by mapping them (where that is safe).
MAP_MIN_BYTES = 2**20
#: Objects up to this size go to a local disk from the calling event loop: on a busy
#: worker, a trip to the thread pool (two hand-offs of the GIL, each of which can wait
#: for a computing thread's switch interval) costs more than writing a small file.
INLINE_MAX_BYTES = 64 << 10
#: Filesystems whose mapped files stay readable until unmapped, whatever other processes
#: do: local disks and memory. Not network filesystems, where a file deleted by another
#: host makes its mapped pages fail (SIGBUS) once the kernel evicts them.
_MAPPABLE_FILESYSTEMS = frozenset(
    {"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "zfs", "tmpfs", "ramfs", "overlay"}
)


class Backend(abc.ABC):
    """The byte-moving operations a store needs; every path is inside one filesystem.

    Missing objects raise ``FileNotFoundError`` (except where noted); other failures
    raise whatever the filesystem raises, for the store to retry and classify.
    """

    #: Whether the backend retries transient errors itself, so that the store must not
    #: repeat them (see ``Store._retrying``).
    retries_itself: bool = False
    #: Whether large objects are read by mapping them (see :func:`_maps_safely`).
    map_reads: bool = False
    #: Objects up to this size are written without leaving the calling loop (0: none).
    inline_max_bytes: int = 0

    @abc.abstractmethod
    async def write(self, path: str, frames: Sequence[Buffer]) -> None:
        """Publish ``frames``, concatenated, as the object at ``path``, replacing it."""

    @abc.abstractmethod
    async def read(self, path: str, end: int | None = None) -> Buffer:
        """The bytes of the object at ``path``, or its first ``end`` bytes."""

    @abc.abstractmethod
    async def size(self, path: str) -> int | None:
        """The size of the object at ``path``; ``None`` if there is none."""

    @abc.abstractmethod
    async def delete(self, paths: Sequence[str]) -> None:
        """Delete the objects at ``paths``; paths without an object are ignored."""

    @abc.abstractmethod
    async def find(self, base: str) -> dict[str, int]:
        """Every object below ``base`` (recursively) with its size; ``{}`` if none."""


def open_backend(
    fs: fsspec.AbstractFileSystem, root: str, executor: ThreadPoolExecutor, max_concurrency: int
) -> Backend:
    """The backend for ``fs``: :class:`LocalBackend` for local directories, else fsspec."""
    if isinstance(fs, LocalFileSystem):
        return LocalBackend(fs, root, executor)
    return FsspecBackend(fs, max_concurrency)


class LocalBackend(Backend):
    """A local directory, through the OS, in the store's bounded thread pool.

    Parameters
    ----------
    fs
        The local filesystem (used only to list directories).
    root
        The store's root directory: decides whether reads may map files.
    executor
        Where blocking calls run (the store's pool, bounded by ``max-concurrency``).
    """

    def __init__(self, fs: LocalFileSystem, root: str, executor: ThreadPoolExecutor):
        self._fs = fs
        self._executor = executor
        self.map_reads = _maps_safely(root)
        # Only on a local disk: a network filesystem that hangs would hang the loop.
        self.inline_max_bytes = INLINE_MAX_BYTES if self.map_reads else 0

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def write(self, path: str, frames: Sequence[Buffer]) -> None:
        if sum(memoryview(f).nbytes for f in frames) <= self.inline_max_bytes:
            _write_replacing(path, frames)
        else:
            await self._in_thread(_write_replacing, path, frames)

    async def read(self, path: str, end: int | None = None) -> Buffer:
        if not self.inline_max_bytes:
            return await self._in_thread(self._read, path, end)
        with open(path, "rb") as f:  # on a local disk, quicker than a trip to the pool
            size = os.fstat(f.fileno()).st_size
            if size <= self.inline_max_bytes:
                return self._read_open(f, size, end)
            return await self._in_thread(self._read_open, f, size, end)

    def _read(self, path: str, end: int | None) -> memoryview:
        with open(path, "rb") as f:
            return self._read_open(f, os.fstat(f.fileno()).st_size, end)

    def _read_open(self, f: io.BufferedReader, size: int, end: int | None) -> memoryview:
        if end is None and self.map_reads and size >= MAP_MIN_BYTES:
            # Map the page cache instead of copying it into fresh memory: several times
            # faster for large objects. A private (copy-on-write) mapping keeps arrays
            # built on it writeable; objects are replaced by rename and deleted by
            # unlink, never rewritten in place, so the mapped file cannot change.
            return memoryview(mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY))
        # readinto a writeable buffer: one copy from the page cache, and numpy arrays built
        # on it stay writeable (a bytes buffer would make distributed copy them again).
        buf = _empty_buffer(size if end is None else min(size, end))
        n = f.readinto(buf)
        return memoryview(buf)[:n]

    async def size(self, path: str) -> int | None:
        try:
            st = await self._in_thread(os.stat, path)
        except FileNotFoundError:
            return None
        return None if stat.S_ISDIR(st.st_mode) else st.st_size

    async def delete(self, paths: Sequence[str]) -> None:
        def remove_all() -> None:
            for p in paths:
                with suppress(FileNotFoundError):
                    os.unlink(p)

        await self._in_thread(remove_all)

    async def find(self, base: str) -> dict[str, int]:
        return _sizes(await self._in_thread(functools.partial(self._fs.find, base, detail=True)))


def _write_replacing(path: str, frames: Sequence[Buffer]) -> None:
    # Not fsspec's autocommit=False: it stages in the system temp dir, and a rename
    # across filesystems is a copy, not atomic. Stage beside the target instead. Plain
    # file descriptors: Python's buffered file objects cost as much as the system calls
    # for the small objects most results are.
    tmp = f"{path}.tmp-{os.urandom(6).hex()}"
    try:
        try:
            fd = os.open(tmp, _CREATE, 0o666)
        except FileNotFoundError:  # the first object of its directory: no stat per write
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(tmp, _CREATE, 0o666)
        try:
            _write_all(fd, frames)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


def _write_all(fd: int, frames: Sequence[Buffer]) -> None:
    """Write every byte of ``frames`` to ``fd``, resuming after short writes."""
    views: list[memoryview] = []
    for frame in frames:
        view = memoryview(frame)
        if view.nbytes:  # an empty view with a 0 in its shape cannot be cast
            views.append(view.cast("B"))
    while views:
        if hasattr(os, "writev"):
            written = os.writev(fd, views[:_IOV_MAX])
        else:  # pragma: no cover - Windows
            written = os.write(fd, views[0])
        if not written:
            raise OSError(f"no progress writing {sum(v.nbytes for v in views)} bytes")
        while written:
            if written >= views[0].nbytes:
                written -= views.pop(0).nbytes
            else:
                views[0], written = views[0][written:], 0


_IOV_MAX = 1024  # IOV_MAX on Linux and macOS


class FsspecBackend(Backend):
    """Any fsspec filesystem but a local one, through fsspec's async API.

    Parameters
    ----------
    fs
        The filesystem; sync ones are wrapped in ``AsyncFileSystemWrapper``.
    max_concurrency
        Calls in flight at once, per event loop.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, max_concurrency: int):
        self._fs = fs
        self._native = bool(fs.async_impl)
        # The wrapper's coroutines run each sync call with asyncio.to_thread, so they are
        # awaited on the caller's own loop (bounded by _limit below); ``asynchronous``:
        # its blocking mirrors, which would need fsspec's I/O loop, are never called.
        self._afs: Any = fs if self._native else AsyncFileSystemWrapper(fs, asynchronous=True)
        self._max_concurrency = max_concurrency
        # asyncio semaphores belong to one loop; the store may be used from several.
        self._limits: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore]
        self._limits = weakref.WeakKeyDictionary()
        # s3fs retries timeouts, dropped connections and throttling itself (its
        # ``retries``, 5 by default, with backoff, around every call), and botocore
        # retries under it: our retries on top would multiply theirs.
        self._s3 = _is_s3fs(fs)
        self.retries_itself = self._s3

    def _limit(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        sem = self._limits.get(loop)
        if sem is None:
            sem = self._limits[loop] = asyncio.Semaphore(self._max_concurrency)
        return sem

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Await ``afs.<method>(*args, **kwargs)`` on the loop it belongs to."""
        return await self._run(lambda: getattr(self._afs, method)(*args, **kwargs))

    async def _run(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Await the coroutine ``make()`` on the loop the filesystem belongs to."""
        async with self._limit():
            if not self._native:
                return await make()
            # The filesystem's session lives on fsspec's I/O loop; await it from ours.
            future = asyncio.run_coroutine_threadsafe(make(), self._fs.loop)
            return await asyncio.wrap_future(future)

    async def write(self, path: str, frames: Sequence[Buffer]) -> None:
        if self._s3 and sum(memoryview(f).nbytes for f in frames) > _multipart.STREAM_MIN_BYTES:
            # Streamed from the frames: no copy of the object (see _multipart).
            await self._run(lambda: _multipart.upload(self._fs, path, frames))
            return
        # One call, so object stores publish it atomically. Other filesystems' files are
        # not known to stay hidden until closed (memory:// shows them at once).
        await self._call("_pipe_file", path, b"".join(frames))

    async def read(self, path: str, end: int | None = None) -> Buffer:
        if self._s3:
            # One GET: s3fs otherwise asks for the size first (a HEAD, one more round
            # trip at an object store's latency) to split large objects into ranges.
            # Concurrency comes from reading many objects at once instead.
            data: Buffer = await self._call(
                "_cat_file", path, start=None, end=end, max_concurrency=1
            )
            return data
        data = await self._call("_cat_file", path, start=None, end=end)
        return data

    async def size(self, path: str) -> int | None:
        try:
            info = await self._call("_info", path)
        except FileNotFoundError:
            return None
        if info.get("type") == "directory":
            return None
        return int(info["size"])

    async def delete(self, paths: Sequence[str]) -> None:
        if self._native:
            # One batched call (DeleteObjects on S3), which ignores missing keys.
            await self._call("_rm", list(paths))
            return

        async def rm(path: str) -> None:
            with suppress(FileNotFoundError):
                await self._call("_rm_file", path)

        await asyncio.gather(*map(rm, paths))

    async def find(self, base: str) -> dict[str, int]:
        # Listings may be cached (s3fs): objects written by other processes must show.
        self._fs.invalidate_cache(base)
        return _sizes(await self._call("_find", base, detail=True))


def _is_s3fs(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is an s3fs filesystem (s3fs is imported if it is)."""
    s3fs = sys.modules.get("s3fs")
    return s3fs is not None and isinstance(fs, s3fs.S3FileSystem)


def _sizes(listing: dict[str, dict[str, Any]]) -> dict[str, int]:
    return {
        path: int(info["size"]) for path, info in listing.items() if info.get("type") != "directory"
    }


def _maps_safely(root: str) -> bool:
    """Whether objects under ``root`` can be read by mapping them (a local filesystem)."""
    path = os.path.realpath(root)
    best, fstype = "", ""
    for part in psutil.disk_partitions(all=True):
        point = part.mountpoint
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, part.fstype
    return fstype in _MAPPABLE_FILESYSTEMS


def _empty_buffer(size: int) -> Any:
    """A writeable buffer of ``size`` bytes whose contents will be overwritten.

    bytearray zero-fills, and an anonymous mmap page-faults every page in afresh; numpy's
    allocator (where installed) reuses and hugepage-backs large blocks, which reads a
    64 MiB object about twice as fast (benchmarks/store_roundtrip.py).
    """
    try:
        import numpy
    except ImportError:
        return mmap.mmap(-1, size) if size else bytearray()
    return numpy.empty(size, dtype="u1")
