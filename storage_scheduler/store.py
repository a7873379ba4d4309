"""An async key/value store of Dask task results over any fsspec filesystem.

Every coroutine here may be awaited on an event loop without blocking it:

* CPU work (serializing, checksums, deserializing) and the I/O of synchronous
  filesystems (local directories, ``memory://``) run in the store's own bounded thread pool;
* asynchronous filesystems (``s3://`` via s3fs, ``gs://``, ...) are driven through their
  coroutine API on fsspec's I/O loop, with the number of calls in flight bounded.

Writes are atomic: a reader never sees a partial object. Local directories write a
temporary file beside the target and ``os.replace`` it; other filesystems receive the
object in one call (a single PUT on object stores). Two writers of one key each publish a
whole object; the last one wins.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import mmap
import os
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Collection, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, TypeVar

import fsspec
import psutil
from distributed.protocol.serialize import Serialized
from fsspec.implementations.local import LocalFileSystem

from storage_scheduler import serialize
from storage_scheduler._exceptions import (
    MissingObjectError,
    StorageConfigError,
    StoreError,
    StoreUnavailableError,
)
from storage_scheduler.config import StoreSettings

__all__ = ["Store", "StoreCounters"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Errors worth another try: the operation may succeed if repeated.
_TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.EINTR}

#: Bytes read to find the header of an object whose name does not spell its key.
_HEADER_PROBE = 4096


def _is_transient(e: BaseException) -> bool:
    if isinstance(e, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
        return True
    return isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS


#: Upper bounds (seconds) of the latency histogram buckets.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, float("inf"))


@dataclass
class LatencyHistogram:
    """Durations of store operations, in the buckets of :data:`LATENCY_BUCKETS`."""

    counts: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.total += seconds
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.counts[i] += 1
                return


@dataclass
class StoreCounters:
    """What one :class:`Store` instance has done since it was opened."""

    objects_written: int = 0
    bytes_written: int = 0
    objects_read: int = 0
    bytes_read: int = 0
    #: Writes (serialization included) and reads (deserialization included) under way.
    writes_in_flight: int = 0
    reads_in_flight: int = 0
    write_seconds: LatencyHistogram = field(default_factory=LatencyHistogram)
    read_seconds: LatencyHistogram = field(default_factory=LatencyHistogram)


class Store:
    """Task results stored under their Dask keys at an fsspec URL.

    Parameters
    ----------
    settings
        Where and how to store; see :meth:`StoreSettings.from_config`.

    Notes
    -----
    All public methods are coroutines that never block the calling event loop. A store
    may be used from several event loops of one process (a client and an in-process
    cluster, say). Errors are the stdlib ``OSError`` family, or the subclasses of
    :class:`~storage_scheduler.StoreError`; messages name the URL, never the storage
    options (which may hold credentials).

    Examples
    --------
    >>> import asyncio
    >>> store = Store.from_url("memory://doctest-store")
    >>> asyncio.run(store.put(("x", 0), [1, 2, 3]))  # doctest: +SKIP
    >>> asyncio.run(store.get(("x", 0)))  # doctest: +SKIP
    [1, 2, 3]
    """

    settings: StoreSettings
    #: The fsspec filesystem the URL resolves to.
    fs: fsspec.AbstractFileSystem
    #: The store's root path inside ``fs`` (the URL without its protocol).
    root: str
    _local: bool
    #: Whether large local objects are read by mapping them (see :func:`_maps_safely`).
    _map_reads: bool
    _executor: ThreadPoolExecutor
    _limits: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore]
    #: Objects and bytes written and read through this instance.
    counters: StoreCounters

    def __init__(self, settings: StoreSettings):
        self.settings = settings
        try:
            fs, root = fsspec.core.url_to_fs(settings.url, **settings.storage_options)
        except (ValueError, ImportError, TypeError) as e:
            raise StorageConfigError(f"cannot open store URL {settings.url!r}: {e}") from e
        self.fs = fs
        self.root = root.rstrip("/")
        self._local = isinstance(fs, LocalFileSystem)
        self._map_reads = self._local and _maps_safely(self.root)
        self._executor = ThreadPoolExecutor(
            settings.max_concurrency, thread_name_prefix="storage-scheduler-io"
        )
        self._limits = weakref.WeakKeyDictionary()
        self.counters = StoreCounters()

    @classmethod
    def from_url(cls, url: str | None = None, **storage_options: Any) -> Store:
        """A store for ``url`` (default: ``storage-scheduler.url``), other settings from config."""
        return cls(StoreSettings.from_config(url, storage_options))

    @property
    def url(self) -> str:
        return self.settings.url

    def __repr__(self) -> str:
        return f"<Store {self.url!r}>"

    def close(self) -> None:
        """Stop the thread pool; operations in flight finish first."""
        self._executor.shutdown(wait=False)

    def path(self, key: object) -> str:
        """Path of a key's object inside :attr:`fs`."""
        return f"{self.root}/{serialize.object_path(key)}"

    def _where(self, path: str) -> str:
        return str(self.fs.unstrip_protocol(path))

    # ------------------------------------------------------------------ plumbing

    def _limit(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        sem = self._limits.get(loop)
        if sem is None:
            sem = self._limits[loop] = asyncio.Semaphore(self.settings.max_concurrency)
        return sem

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _on_fs_loop(self, coro: Awaitable[T]) -> T:
        # The filesystem's session lives on fsspec's I/O loop; await it from ours.
        async with self._limit():
            return await asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(coro, self.fs.loop)  # type: ignore[arg-type]
            )

    async def _retrying(self, op: str, path: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn``, retrying transient errors with capped backoff; translate the rest."""
        delays = self.settings.retry.delays()
        for attempt in range(len(delays) + 1):
            try:
                return await fn()
            except Exception as e:
                if attempt < len(delays) and _is_transient(e):
                    logger.debug("%s %s failed (%r); retrying", op, self._where(path), e)
                    await asyncio.sleep(delays[attempt])
                    continue
                if isinstance(e, OSError):
                    raise
                raise StoreError(f"{op} {self._where(path)} failed: {e!r}") from e
        raise AssertionError("unreachable")  # pragma: no cover

    # ------------------------------------------------------------- raw objects

    def _write_local(self, path: str, frames: list[serialize.Buffer]) -> None:
        # Not fsspec's autocommit=False: it stages in the system temp dir, and a rename
        # across filesystems is a copy, not atomic. Stage beside the target instead.
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            try:
                f = open(tmp, "wb")
            except FileNotFoundError:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                f = open(tmp, "wb")
            with f:
                f.writelines(frames)
            os.replace(tmp, path)
        except BaseException:
            with suppress(OSError):
                os.unlink(tmp)
            raise

    def _read_local(self, path: str, end: int | None = None) -> memoryview:
        # readinto a writeable buffer: one copy from the page cache, and numpy arrays built
        # on it stay writeable (a bytes buffer would make distributed copy them again).
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if end is None and self._map_reads and size >= MAP_MIN_BYTES:
                # Map the page cache instead of copying it into fresh memory: several times
                # faster for large objects. A private (copy-on-write) mapping keeps arrays
                # built on it writeable; objects are replaced by rename and deleted by
                # unlink, never rewritten in place, so the mapped file cannot change.
                return memoryview(mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY))
            buf = _empty_buffer(size if end is None else min(size, end))
            n = f.readinto(buf)
        return memoryview(buf)[:n]

    async def _write(self, path: str, frames: list[serialize.Buffer]) -> None:
        if self._local:
            await self._in_thread(self._write_local, path, frames)
            return
        data = b"".join(frames)  # one call, so object stores publish it atomically
        if self.fs.async_impl:
            await self._on_fs_loop(self.fs._pipe_file(path, data))
        else:
            await self._in_thread(self.fs.pipe_file, path, data)

    async def _read(self, path: str, end: int | None = None) -> serialize.Buffer:
        if self._local:
            return await self._in_thread(self._read_local, path, end)
        if self.fs.async_impl:
            return await self._on_fs_loop(self.fs._cat_file(path, start=None, end=end))  # type: ignore[no-any-return]
        return await self._in_thread(self.fs.cat_file, path, None, end)  # type: ignore[no-any-return]

    async def _size(self, path: str) -> int | None:
        try:
            if self._local:
                return (await self._in_thread(os.stat, path)).st_size
            if self.fs.async_impl:
                info = await self._on_fs_loop(self.fs._info(path))
            else:
                info = await self._in_thread(self.fs.info, path)
        except FileNotFoundError:
            return None
        if info.get("type") == "directory":
            return None
        return int(info["size"])

    # ------------------------------------------------------------------ the API

    async def put(
        self, key: object, value: object, *, token: str | Callable[[], str] | None = None
    ) -> int:
        """Store ``value`` as the result of ``key``; return the object's size in bytes.

        ``token`` records what produced the value, so that later readers can tell
        whether it is still the result they want. A callable is called in the thread pool
        (computing a token is CPU work).
        """
        path = self.path(key)
        compression = self.settings.compression

        def encode() -> list[serialize.Buffer]:
            tok = token() if callable(token) else token
            return serialize.encode(key, value, token=tok, compression=compression)

        counters = self.counters
        counters.writes_in_flight += 1
        start = time.perf_counter()
        try:
            frames = await self._in_thread(encode)
            await self._retrying("write", path, lambda: self._write(path, frames))
        finally:
            counters.writes_in_flight -= 1
        counters.write_seconds.observe(time.perf_counter() - start)
        nbytes = sum(memoryview(f).nbytes for f in frames)
        counters.objects_written += 1
        counters.bytes_written += nbytes
        return nbytes

    async def read(self, key: object) -> tuple[serialize.ObjectHeader, memoryview]:
        """The verified header and payload of ``key``'s object.

        Raises
        ------
        MissingObjectError
            If the store holds no object for ``key``.
        IntegrityError
            If the object is truncated, corrupted or holds another key.
        """
        return await self._read_verified(key, lambda header, payload: (header, payload))

    async def get(self, key: object) -> Any:
        """The stored value of ``key`` (unpickles it: only where user data may be loaded)."""
        return await self._read_verified(key, lambda _, payload: serialize.decode_value(payload))

    async def get_serialized(self, key: object) -> Serialized:
        """The stored value of ``key`` as ``Serialized`` frames, without unpickling."""
        return await self._read_verified(
            key, lambda _, payload: serialize.decode_serialized(payload)
        )

    async def _read_verified(
        self, key: object, then: Callable[[serialize.ObjectHeader, memoryview], T]
    ) -> T:
        path = self.path(key)
        where = self._where(path)
        counters = self.counters
        counters.reads_in_flight += 1
        start = time.perf_counter()
        try:
            try:
                data = await self._retrying("read", path, lambda: self._read(path))
            except FileNotFoundError as e:
                raise MissingObjectError(
                    errno.ENOENT, f"no stored result for key {key!r}", where
                ) from e
            # Verify and decode in one trip to the thread pool: both are CPU work.
            out = await self._in_thread(lambda: then(*serialize.verify(data, key, where)))
        finally:
            counters.reads_in_flight -= 1
        counters.read_seconds.observe(time.perf_counter() - start)
        counters.objects_read += 1
        counters.bytes_read += len(data)
        return out

    async def head(self, key: object) -> serialize.ObjectHeader:
        """The header of ``key``'s object, reading only its first bytes."""
        path = self.path(key)
        return await self._read_header(path)

    async def _read_header(self, path: str) -> serialize.ObjectHeader:
        try:
            data = await self._retrying("read", path, lambda: self._read(path, _HEADER_PROBE))
            span = serialize.header_span(data, self._where(path))
            if span > len(data):  # a header longer than the probe: read exactly enough
                data = await self._retrying("read", path, lambda: self._read(path, span))
        except FileNotFoundError as e:
            raise MissingObjectError(errno.ENOENT, "no stored object", self._where(path)) from e
        return serialize.read_header(data, self._where(path))

    async def sizes(self, keys: Iterable[object]) -> dict[Any, int]:
        """Object sizes in bytes of those ``keys`` that the store holds."""
        keys = list(keys)

        async def one(key: object) -> int | None:
            path = self.path(key)
            return await self._retrying("stat", path, lambda: self._size(path))

        found = await asyncio.gather(*map(one, keys))
        return {k: n for k, n in zip(keys, found) if n is not None}

    async def exists(self, keys: Iterable[object]) -> set[Any]:
        """Those of ``keys`` that the store holds."""
        return set(await self.sizes(keys))

    async def delete(self, keys: Collection[object]) -> None:
        """Delete the objects of ``keys``; keys without an object are ignored."""
        await self._delete_paths([self.path(k) for k in keys])

    async def _delete_paths(self, paths: list[str]) -> None:
        if not paths:
            return
        if self.fs.async_impl:
            await self._retrying(
                "delete", paths[0], lambda: self._on_fs_loop(self.fs._rm(paths))
            )
            return

        def rm_all() -> None:
            for p in paths:
                with suppress(FileNotFoundError):
                    self.fs.rm_file(p)

        await self._retrying("delete", paths[0], lambda: self._in_thread(rm_all))

    async def list(self) -> dict[Any, int]:
        """Every stored key with its object size, by listing the store.

        Keys too long to be spelled in their object's name are read from the object's
        header. Unfinished writes (temporary files) are skipped.
        """
        base = f"{self.root}/objects"

        def find() -> dict[str, Any]:
            self.fs.invalidate_cache(base)
            return self.fs.find(base, detail=True)  # type: ignore[no-any-return]

        if self.fs.async_impl:
            self.fs.invalidate_cache(base)
            listing = await self._retrying(
                "list", base, lambda: self._on_fs_loop(self.fs._find(base, detail=True))
            )
        else:
            listing = await self._retrying("list", base, lambda: self._in_thread(find))
        out: dict[Any, int] = {}
        digest_named: list[tuple[str, int]] = []
        for path, info in listing.items():
            name = path.rsplit("/", 1)[-1]
            if "." in name or info.get("type") == "directory":
                continue
            key = serialize.key_from_object_name(name)
            if key is None:
                digest_named.append((path, int(info["size"])))
            else:
                out[key] = int(info["size"])
        headers = await asyncio.gather(*(self._read_header(p) for p, _ in digest_named))
        for (_, size), header in zip(digest_named, headers):
            out[header.key] = size
        return out

    # ------------------------------------------------ files beside the objects
    # Small files the store keeps for itself (the catalog's manifest, cluster leases),
    # named by paths relative to the root, outside ``objects/``.

    async def write_file(self, name: str, data: bytes) -> None:
        """Write (atomically, replacing) the file ``name`` under the store's root."""
        path = f"{self.root}/{name}"
        await self._retrying("write", path, lambda: self._write(path, [data]))

    async def read_file(self, name: str) -> bytes:
        path = f"{self.root}/{name}"
        return bytes(await self._retrying("read", path, lambda: self._read(path)))

    async def list_files(self, prefix: str) -> list[str]:
        """Names (relative to the root) of the finished files under ``prefix``."""
        base = f"{self.root}/{prefix.strip('/')}"

        def find() -> list[str]:
            self.fs.invalidate_cache(base)
            return self.fs.find(base)  # type: ignore[no-any-return]

        if self.fs.async_impl:
            self.fs.invalidate_cache(base)
            paths = await self._retrying("list", base, lambda: self._on_fs_loop(self.fs._find(base)))
        else:
            paths = await self._retrying("list", base, lambda: self._in_thread(find))
        names = [p[len(self.root) + 1 :] for p in paths]
        return sorted(n for n in names if ".tmp-" not in n)

    async def delete_files(self, names: Collection[str]) -> None:
        await self._delete_paths([f"{self.root}/{n}" for n in names])

    async def check(self) -> None:
        """Probe the store: write, read back and delete a small object.

        Raises
        ------
        StoreUnavailableError
            If any step fails or the store does not answer within
            ``storage-scheduler.connect-timeout``; the message names the URL and the cause.
        """
        key = ("storage-scheduler-probe", uuid.uuid4().hex)
        counted = self.counters
        self.counters = StoreCounters()  # the probe is not traffic worth reporting

        async def probe() -> None:
            await self.put(key, b"probe")
            if await self.get(key) != b"probe":
                raise StoreError("the probe object read back differs from what was written")
            await self.delete([key])

        try:
            await asyncio.wait_for(probe(), self.settings.connect_timeout)
        except asyncio.TimeoutError as e:
            raise StoreUnavailableError(
                f"store {self.url!r} did not answer within {self.settings.connect_timeout:g}s"
            ) from e
        except Exception as e:
            raise StoreUnavailableError(f"store {self.url!r} is not usable: {_describe(e)}") from e
        finally:
            self.counters = counted


#: Local objects at least this large are read by mapping them (where that is safe).
MAP_MIN_BYTES = 2**20
#: Filesystems whose mapped files stay readable until unmapped, whatever other processes
#: do: local disks and memory. Not network filesystems, where a file deleted by another
#: host makes its mapped pages fail (SIGBUS) once the kernel evicts them.
_MAPPABLE_FILESYSTEMS = frozenset(
    {"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "zfs", "tmpfs", "ramfs", "overlay"}
)


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


def _describe(e: BaseException) -> str:
    if isinstance(e, PermissionError):
        return f"permission denied ({e.filename or e})"
    if isinstance(e, FileNotFoundError):
        return f"not found ({e.filename or e}): does the bucket or directory exist?"
    return f"{type(e).__name__}: {e}"
