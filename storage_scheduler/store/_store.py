"""An async key/value store of Dask task results over any fsspec filesystem.

Every coroutine here may be awaited on an event loop without blocking it: CPU work
(serializing, checksums, deserializing) runs in the store's own bounded thread pool
(except for objects of up to 64 KiB on a local disk, quicker done than handed over), and
I/O goes through a :class:`~storage_scheduler.store._backends.Backend` chosen once, when
the store is opened. The :class:`Store` itself holds what does not depend on where the
bytes live: object names and framing, verification, retries, error translation and
counters. So each concern is written once, and a new kind of filesystem needs only a
backend.

Writes are atomic: a reader never sees a partial object. Two writers of one key each
publish a whole object; the last one wins.
"""

from __future__ import annotations

import asyncio
import builtins
import errno
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import fsspec

from distributed.protocol.serialize import Serialized

from storage_scheduler._exceptions import (
    MissingObjectError,
    StorageConfigError,
    UntrustedObjectError,
)
from storage_scheduler.config import StoreSettings, redact, redact_url
from storage_scheduler.store import serialize, signing
from storage_scheduler.store._backends import (
    INLINE_MAX_BYTES,
    MAP_MIN_BYTES,
    Backend,
    LocalBackend,
    open_backend,
)
from storage_scheduler.store._counters import LATENCY_BUCKETS, LatencyHistogram, StoreCounters
from storage_scheduler.store._retry import Retrier

__all__ = [
    "LATENCY_BUCKETS",
    "MAP_MIN_BYTES",
    "THREAD_PREFIX",
    "LatencyHistogram",
    "Store",
    "StoreCounters",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Protocols whose URLs must name a bucket (or container) to be a store.
_OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "oss"})

#: Names of the threads that encode, decode and (local directories) write objects.
THREAD_PREFIX = "storage-scheduler-io"

#: Bytes read to find the header of an object whose name does not spell its key.
_HEADER_PROBE = 4096


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
    """

    settings: StoreSettings
    #: The fsspec filesystem the URL resolves to.
    fs: fsspec.AbstractFileSystem
    #: The store's root path inside ``fs`` (the URL without its protocol).
    root: str
    #: Moves the bytes: a local directory, or any other fsspec filesystem.
    _backend: Backend
    #: CPU work, and the I/O of local directories.
    _executor: ThreadPoolExecutor
    #: Objects and bytes written and read through this instance.
    counters: StoreCounters
    #: Retries, and the state of an outage.
    _retrier: Retrier
    #: Objects up to this size are written and read without leaving the calling loop.
    inline_max_bytes: int

    def __init__(self, settings: StoreSettings):
        self.settings = settings
        try:
            # No listings cache (s3fs keeps one): a cached listing hides objects written
            # since, and a read of one of them would fail as if it were missing.
            options = {"use_listings_cache": False, **settings.storage_options}
            options = _with_connection_pool(settings.url, options, settings.max_concurrency)
            fs, root = fsspec.core.url_to_fs(settings.url, **options)
        except (ValueError, ImportError, TypeError) as e:
            message = f"cannot open store URL {redact_url(settings.url)!r}: {e}"
            raise StorageConfigError(redact(message, settings.url)) from e
        _check_bucket(settings.url, root)
        self.fs = fs
        self.root = root.rstrip("/")
        self._executor = ThreadPoolExecutor(
            settings.max_concurrency, thread_name_prefix=THREAD_PREFIX
        )
        self._backend = open_backend(fs, self.root, self._executor, settings.max_concurrency)
        self.inline_max_bytes = self._backend.inline_max_bytes
        self.counters = StoreCounters()
        # One retry layer: s3fs retries itself (and botocore under it), so only the
        # outage window applies on top of it.
        self._retrier = Retrier(settings, self.url, retries_itself=self._backend.retries_itself)

    @classmethod
    def from_url(cls, url: str | None = None, **storage_options: Any) -> Store:
        """A store for ``url`` (default: ``storage-scheduler.url``), other settings from config."""
        return cls(StoreSettings.from_config(url, storage_options))

    @property
    def local(self) -> bool:
        """Whether the store is a directory of this machine's filesystem."""
        return isinstance(self._backend, LocalBackend)

    @property
    def url(self) -> str:
        """The store's URL for messages: without user info or query string."""
        return redact_url(self.settings.url)

    def __repr__(self) -> str:
        return f"<Store {self.url!r}>"

    def close(self) -> None:
        """Stop the thread pool; operations in flight finish first."""
        self._executor.shutdown(wait=False)

    def path(self, key: object, token: str | None = None) -> str:
        """Path inside :attr:`fs` of the object of ``key``'s result produced with ``token``."""
        return f"{self.root}/{serialize.object_path(key, token)}"

    def where(self, path: str) -> str:
        """``path`` as a URL for messages (without credentials)."""
        return redact(str(self.fs.unstrip_protocol(path)), self.settings.url)

    # ------------------------------------------------------------------ plumbing

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _retrying(
        self, op: str, path: str, fn: Callable[[], Awaitable[T]], *, outage: bool = False
    ) -> T:
        """Run ``fn``, retrying transient errors; with ``outage``, for up to
        ``retry.outage-window`` (see :class:`~storage_scheduler.store._retry.Retrier`)."""
        return await self._retrier.run(op, lambda: self.where(path), fn, outage=outage)

    # One attempt each, for _retrying to repeat (and for tests to make flaky).
    async def _write(self, path: str, frames: list[serialize.Buffer]) -> None:
        await self._backend.write(path, frames)

    async def _read(self, path: str, end: int | None = None) -> serialize.Buffer:
        return await self._backend.read(path, end)

    # ------------------------------------------------------------------ the API

    async def put(
        self,
        key: object,
        value: object,
        *,
        token: str | Callable[[], str] | None = None,
        created: float | None = None,
        nbytes: int | None = None,
    ) -> int:
        """Store ``value`` as the result of ``key``; return the object's size in bytes.

        ``token`` records what produced the value, so that later readers can tell
        whether it is still the result they want; results with different tokens are
        different objects. A callable is called where the value is encoded. ``created``
        (default: now) tells this write apart from any other. ``nbytes``, a bound on the
        value's size, lets a small value be written without leaving the loop.
        """
        counters = self.counters
        counters.writes_in_flight += 1
        start = time.perf_counter()
        try:
            args = (key, value, token, self.settings, created)
            if nbytes is not None and nbytes <= self.inline_max_bytes:
                known, frames = _encode(*args)
            else:
                known, frames = await self._in_thread(_encode, *args)
            path = self.path(key, known)
            await self._retrying("write", path, lambda: self._write(path, frames))
        finally:
            counters.writes_in_flight -= 1
        counters.write_seconds.observe(time.perf_counter() - start)
        nbytes = sum(memoryview(f).nbytes for f in frames)
        counters.objects_written += 1
        counters.bytes_written += nbytes
        return nbytes

    async def read(
        self, key: object, token: str | None = None
    ) -> tuple[serialize.ObjectHeader, memoryview]:
        """The verified header and payload of ``key``'s object.

        ``token`` is the token of the result the reader wants (None: the object stored
        without one). It names the object, and the object must carry it.

        Raises
        ------
        MissingObjectError
            If the store holds no object for ``key``; :class:`StaleObjectError` if it
            holds one with another token.
        IntegrityError
            If the object is truncated, corrupted or holds another key;
            :class:`UntrustedObjectError` if it is not signed with the signing key.
        """
        return await self._read_verified(key, token, lambda header, payload: (header, payload))

    async def get(self, key: object, token: str | None = None, *, patient: bool = True) -> Any:
        """The stored value of ``key`` (unpickles it: only where user data may be loaded);
        see :meth:`read`. ``patient``: wait out a store outage for ``retry.outage-window``
        (else give up after the short retries, when the caller has somewhere else to go)."""
        return await self._read_verified(
            key, token, lambda _, payload: serialize.decode_value(payload), patient
        )

    async def get_serialized(
        self, key: object, token: str | None = None, *, patient: bool = True
    ) -> Serialized:
        """The stored value of ``key`` as ``Serialized`` frames, without unpickling."""
        return await self._read_verified(
            key, token, lambda _, payload: serialize.decode_serialized(payload), patient
        )

    async def _read_verified(
        self,
        key: object,
        token: str | None,
        then: Callable[[serialize.ObjectHeader, memoryview], T],
        patient: bool = True,
    ) -> T:
        path = self.path(key, token)
        where = self.where(path)
        counters = self.counters
        counters.reads_in_flight += 1
        start = time.perf_counter()
        try:
            try:
                data = await self._retrying("read", path, lambda: self._read(path), outage=patient)
            except FileNotFoundError as e:
                raise MissingObjectError(
                    errno.ENOENT, f"no stored result for key {key!r}", where
                ) from e
            # Verify and decode in one trip to the thread pool: both are CPU work, except
            # for an object small enough to have been read without leaving the loop.
            keys = self.settings.signing_keys
            args = (data, key, where, keys, token)
            try:
                if len(data) <= self.inline_max_bytes:
                    out = then(*serialize.verify(*args))
                else:
                    out = await self._in_thread(lambda: then(*serialize.verify(*args)))
            except UntrustedObjectError:
                counters.objects_untrusted += 1
                raise
        finally:
            counters.reads_in_flight -= 1
        counters.read_seconds.observe(time.perf_counter() - start)
        counters.objects_read += 1
        counters.bytes_read += len(data)
        return out

    async def head(self, key: object, token: str | None = None) -> serialize.ObjectHeader:
        """The header of ``key``'s object, reading only its first bytes (not verified)."""
        return await self.read_header(self.path(key, token))

    async def read_header(self, path: str) -> serialize.ObjectHeader:
        """The header of the object at ``path`` (inside :attr:`fs`), reading only its first
        bytes (not verified)."""
        try:
            data = await self._retrying("read", path, lambda: self._read(path, _HEADER_PROBE))
            span = serialize.header_span(data, self.where(path))
            if span > len(data):  # a header longer than the probe: read exactly enough
                data = await self._retrying("read", path, lambda: self._read(path, span))
        except FileNotFoundError as e:
            raise MissingObjectError(errno.ENOENT, "no stored object", self.where(path)) from e
        return serialize.read_header(data, self.where(path))

    async def delete(self, keys: Collection[object]) -> None:
        """Delete the objects stored without a token of ``keys``; missing ones are ignored."""
        await self.delete_paths([self.path(k) for k in keys])

    async def delete_versions(self, versions: Collection[tuple[object, str | None]]) -> None:
        """Delete the objects of these (key, token) results; missing ones are ignored."""
        await self.delete_paths([self.path(k, t) for k, t in versions])

    async def delete_paths(self, paths: list[str]) -> None:
        """Delete files by their paths inside :attr:`fs`; missing ones are ignored."""
        if paths:
            await self._retrying("delete", paths[0], lambda: self._backend.delete(paths))

    async def list(self) -> dict[Any, int]:
        """Every stored key with the size of its objects (all versions), by listing the
        store (see :func:`storage_scheduler.store.inventory.stored_keys`)."""
        from storage_scheduler.store.inventory import stored_keys

        return await stored_keys(self)

    async def find(self, prefix: str) -> dict[str, int]:
        """Paths and sizes of every file under ``prefix`` (relative to the root)."""
        base = f"{self.root}/{prefix.strip('/')}"
        return await self._retrying("list", base, lambda: self._backend.find(base))

    async def read_path(self, path: str) -> serialize.Buffer:
        """The bytes of the file at ``path`` (inside :attr:`fs`), unverified."""
        return await self._retrying("read", path, lambda: self._read(path))

    # ------------------------------------------------ files beside the objects
    # Small files the store keeps for itself (the catalog's manifest, cluster leases),
    # named by paths relative to the root, outside ``objects/``.

    async def write_file(self, name: str, data: bytes) -> None:
        """Write (atomically, replacing) the file ``name`` under the store's root; signed
        when a signing key is configured."""
        path = f"{self.root}/{name}"
        sealed = await _off_loop(signing.seal, data, self.settings.signing_key)
        await self._retrying("write", path, lambda: self._write(path, [sealed]))

    async def read_file(self, name: str) -> bytes:
        """The data of the file ``name``.

        Raises
        ------
        UntrustedObjectError
            If a signing key is configured and the file is not signed with it.
        """
        path = f"{self.root}/{name}"
        data = await self._retrying("read", path, lambda: self._read(path))
        return await _off_loop(_unseal, data, self.settings.signing_keys, self.where(path))

    async def list_files(self, prefix: str) -> builtins.list[str]:
        """Names (relative to the root) of the finished files under ``prefix``."""
        base = f"{self.root}/{prefix.strip('/')}"
        paths = await self._retrying("list", base, lambda: self._backend.find(base))
        names = [p[len(self.root) + 1 :] for p in paths]
        return sorted(n for n in names if ".tmp-" not in n)

    async def delete_files(self, names: Collection[str]) -> None:
        await self.delete_paths([f"{self.root}/{n}" for n in names])

    async def check(self) -> None:
        """Probe the store (see :func:`storage_scheduler.store.probe.check`)."""
        from storage_scheduler.store.probe import check

        await check(self)


def _check_bucket(url: str, root: str) -> None:
    """An object store's URL must name a bucket: ``s3://`` alone would fail later, at
    the first write, with an error about something else (credentials, say)."""
    if not root.strip("/") and url.partition("://")[0] in _OBJECT_STORES:
        raise StorageConfigError(f"store URL {redact_url(url)!r} names no bucket or container")


def _unseal(data: serialize.Buffer, keys: Sequence[bytes], where: str) -> bytes:
    return signing.unseal(bytes(data), keys, where)


async def _off_loop(fn: Callable[..., T], data: serialize.Buffer, *args: Any) -> T:
    """``fn(data, *args)``: a MAC over big files (catalog segments, lease parts: up to tens
    of megabytes) in a thread, not on the loop. Not in the store's pool, whose threads a
    slow store can keep busy: lease renewals must never wait for one."""
    if memoryview(data).nbytes <= INLINE_MAX_BYTES:
        return fn(data, *args)
    return await asyncio.to_thread(fn, data, *args)


def _encode(
    key: object,
    value: object,
    token: str | Callable[[], str] | None,
    settings: StoreSettings,
    created: float | None,
) -> tuple[str | None, list[serialize.Buffer]]:
    """The token and the frames of ``value``'s object (in the store's thread pool: tokens
    are CPU work)."""
    token = token() if callable(token) else token
    frames = serialize.encode(
        key,
        value,
        token=token,
        compression=settings.compression,
        signing_key=settings.signing_key,
        created=created,
    )
    return token, frames


def _with_connection_pool(url: str, options: dict[str, Any], size: int) -> dict[str, Any]:
    """``options`` with an S3 connection pool of ``size`` (unless they set one).

    aiobotocore keeps 10 connections per client by default: more requests than that
    wait for a connection, and at an object store's latency each wait is a round trip.
    """
    if url.partition("://")[0] not in ("s3", "s3a"):
        return options
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("max_pool_connections", size)
    return {**options, "config_kwargs": config}
