"""Leases: what live clusters hold, so that no other cluster or tool deletes it.

A running scheduler publishes the keys its lanes hold, and whoever deletes stored results
(another cluster's lifecycle policy, ``dask storage gc``) first reads the live leases and
spares the keys in them. A lease is two kinds of files:

* ``leases/<writer-id>``, the manifest: when it was written (the writer's clock), for how
  long it holds (``ttl``), and the names of its key parts. Small: renewing a lease
  rewrites only this file.
* ``lease-keys/<writer-id>/<n>``, the parts: immutable lists of keys. New keys go to a
  new part; the parts are rewritten as one new set (a rebase) only when they list many
  keys no longer held or are too many. Between rebases a lease lists a superset of what
  the cluster holds: it may protect too much for a while, never too little.

A reader treats a lease as live until ``written + ttl + SKEW_MARGIN`` by its own clock,
so clocks that disagree by less than the margin never end a lease early. Parts are
decoded in a thread, frame by frame (each frame holds the GIL only briefly), and cached
by name: an unchanged lease costs a reader one small read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from storage_scheduler._exceptions import IntegrityError
from storage_scheduler._threads import HAND_OVER, in_slices
from storage_scheduler.store._store import Store
from storage_scheduler.store.serialize import msgpack_ext_hook, msgpack_key_part

__all__ = [
    "LEASES",
    "LEASE_KEYS",
    "LEASE_TTL",
    "SKEW_MARGIN",
    "LeaseReader",
    "LeaseWriter",
    "LeasedKeys",
    "keys_leased_by_others",
    "remove_expired_leases",
    "write_lease",
]

LEASES = "leases"
LEASE_KEYS = "lease-keys"
#: Seconds a lease holds after it was written; renewed every quarter of it, so a scheduler
#: may miss three renewals (a store outage, a busy event loop) before its lease lapses.
LEASE_TTL = 60.0
#: Seconds of clock disagreement between machines that readers tolerate: a lease is live
#: until ``written + ttl + SKEW_MARGIN`` by the reader's clock.
SKEW_MARGIN = 300.0
#: Keys per part file, and per msgpack frame inside one. Decoding 10,000 keys takes
#: ~7 ms with the GIL held (msgpack decodes a frame in one C call): a thread decoding a
#: big lease never stalls the event loop.
PART_KEYS = 100_000
FRAME_KEYS = 10_000
#: Parts of one lease before they are rewritten as one set.
MAX_PARTS = 64
#: The writer's set of listed keys, split by hash so that no set grows big.
_BUCKETS = 256
_BUCKET_MASK = _BUCKETS - 1


def _encode_part(keys: Sequence[Any]) -> bytes:
    # msgpack packs tuples as arrays, as key_to_msgpack does; letting it walk the keys
    # (instead of building a list per key) is ~10x faster and leaves the garbage
    # collector nothing to collect: a full collection holds the GIL (~300 ms for 1M keys).
    return b"".join(
        msgpack.packb(list(frame), use_bin_type=True, default=msgpack_key_part)
        for frame in in_slices(keys, FRAME_KEYS)
    )


def _decode_part(data: bytes) -> frozenset[Any]:
    unpacker = msgpack.Unpacker(
        raw=False, use_list=False, ext_hook=msgpack_ext_hook, max_buffer_size=len(data) + 1
    )
    unpacker.feed(data)
    keys: set[Any] = set()
    for frame in unpacker:
        keys.update(frame)
        time.sleep(HAND_OVER)  # a frame at a time, as in_slices does
    return frozenset(keys)


def _encode_manifest(written: float, ttl: float, parts: list[str]) -> bytes:
    # "expires" and "keys" keep readers of the one-file format (before 0.x) from failing.
    lease = {"written": written, "ttl": ttl, "expires": written + ttl, "parts": parts, "keys": []}
    return msgpack.packb(lease, use_bin_type=True)


@dataclass(frozen=True)
class _Manifest:
    #: When the lease stops protecting, by the writer's clock.
    expires: float
    parts: tuple[str, ...]
    #: Keys listed in the manifest itself (the one-file format).
    keys: frozenset[Any]


def _decode_manifest(data: bytes) -> _Manifest:
    lease = msgpack.unpackb(data, raw=False, use_list=False, ext_hook=msgpack_ext_hook)
    if "written" in lease:
        expires = float(lease["written"]) + float(lease["ttl"])
    else:
        expires = float(lease["expires"])
    return _Manifest(expires, tuple(lease.get("parts", ())), frozenset(lease.get("keys", ())))


async def _in_thread(fn: Any, *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


class LeaseWriter:
    """One cluster's lease.

    Notes
    -----
    Coroutines run on the event loop; the key set and the encoding live in a thread. Only
    one coroutine at a time may run (the plugin's lease task).
    """

    store: Store
    writer_id: str
    ttl: float
    #: Names of the parts the manifest lists.
    parts: list[str]
    #: When the manifest was last written (this machine's clock); 0: never.
    renewed: float
    #: Keys the parts list, by hash bucket (touched only from the thread of :meth:`publish`).
    _listed: list[set[Any]]
    _nlisted: int
    #: Whether :meth:`publish` is given tasks (else keys).
    _tasks: bool
    #: Whether the next publication must rewrite every part (a write failed, or lapsed).
    _rebase: bool
    _seq: int

    def __init__(
        self, store: Store, writer_id: str, ttl: float = LEASE_TTL, *, tasks: bool = False
    ):
        self.store = store
        self.writer_id = writer_id
        self.ttl = ttl
        self._tasks = tasks
        self.parts = []
        self.renewed = 0.0
        self._listed = [set() for _ in range(_BUCKETS)]
        self._nlisted = 0
        self._rebase = True
        self._seq = 0

    @property
    def name(self) -> str:
        return f"{LEASES}/{self.writer_id}"

    @property
    def lapsed(self) -> bool:
        """Whether the lease was never written or went unrenewed for a whole ``ttl``
        (another tool may have removed its files since)."""
        return time.time() - self.renewed > self.ttl

    async def renew(self) -> None:
        """Rewrite the manifest (a small file) with a new write time."""
        now = time.time()
        await self.store.write_file(self.name, _encode_manifest(now, self.ttl, self.parts))
        self.renewed = now

    async def publish(self, held: list[list[Any]]) -> None:
        """Make the lease list every key of ``held``, and renew it.

        ``held`` holds snapshots (lists) of what the lanes hold: keys, or ``TaskState``
        objects if the writer was made with ``tasks=True``. They are read, then emptied,
        in a thread: the caller must not use them again.
        """
        if self.lapsed:
            # Manifest first: ``remove_expired_leases`` deletes parts without one.
            await self.renew()
            self._rebase = True
        rebase, self._rebase = self._rebase, True  # until this publication succeeds
        blobs, rebase = await _in_thread(self._plan, held, rebase)
        names = []
        for _ in blobs:
            names.append(f"{LEASE_KEYS}/{self.writer_id}/{self._seq:08d}")
            self._seq += 1
        for name, blob in zip(names, blobs, strict=True):
            await self.store.write_file(name, blob)
        old = self.parts
        self.parts = names if rebase else old + names
        try:
            await self.renew()
        except BaseException:
            self.parts = old  # the manifest still lists the old parts
            raise
        self._rebase = False
        if rebase and old:
            # After the manifest: a reader holding the old one reads it again (see LeaseReader).
            await self.store.delete_files(old)

    def _plan(self, held: list[list[Any]], rebase: bool) -> tuple[list[bytes], bool]:
        """The new parts, and whether they replace every part (in a thread; empties
        ``held``).

        Python loops over small sets only: one C call on a set of a million keys (a
        resize, ``list(set)``, freeing it) holds the GIL for 30-100 ms. Big lists are
        freed here too: freeing touches every object they hold (~70 ms per million).
        """
        keys, rebase = self._new_keys(held, rebase)
        for snapshot in held:
            snapshot.clear()
        blobs = [_encode_part(keys[i : i + PART_KEYS]) for i in range(0, len(keys), PART_KEYS)]
        keys.clear()
        return blobs, rebase

    def _new_keys(self, held: Sequence[Sequence[Any]], rebase: bool) -> tuple[list[Any], bool]:
        listed = self._listed
        if not rebase:
            new: list[Any] = []
            nheld = 0
            for snapshot in held:
                nheld += len(snapshot)
                for key in self._keys(snapshot):
                    bucket = listed[hash(key) & _BUCKET_MASK]
                    if key not in bucket:
                        bucket.add(key)
                        new.append(key)
            # Listed, no longer held (too many if a key is on two lanes: harmless).
            stale = self._nlisted - (nheld - len(new))
            nparts = len(self.parts) + -(-len(new) // PART_KEYS)
            if stale <= max(nheld, PART_KEYS) and nparts <= MAX_PARTS:
                self._nlisted += len(new)
                return new, False
        old, self._listed = listed, [set() for _ in range(_BUCKETS)]
        keys: list[Any] = []
        for snapshot in held:
            for key in self._keys(snapshot):
                bucket = self._listed[hash(key) & _BUCKET_MASK]
                if key not in bucket:
                    bucket.add(key)
                    keys.append(key)
        self._nlisted = len(keys)
        while old:
            old.pop()  # one bucket at a time (see above)
        return keys, True

    def _keys(self, snapshot: Sequence[Any]) -> Iterator[Any]:
        for part in in_slices(snapshot):
            yield from (x.key for x in part) if self._tasks else part

    async def close(self) -> None:
        """Withdraw the lease: this cluster protects nothing any more."""
        await self.store.delete_files([self.name])
        # Every part, also one written by a publication cancelled before its manifest.
        await self.store.delete_files(await self.store.list_files(f"{LEASE_KEYS}/{self.writer_id}"))
        self.parts, self._rebase = [], True


class LeasedKeys:
    """The keys of several leases, tested without building their union."""

    #: How many live leases were read (empty ones included).
    live: int

    def __init__(self, sets: Iterable[Collection[Any]], live: int = 0):
        self._sets = [s for s in sets if s]
        self.live = live

    def __contains__(self, key: object) -> bool:
        return any(key in s for s in self._sets)

    def spare(self, keys: Iterable[Any]) -> tuple[list[Any], list[Any]]:
        """``keys`` split into (not leased, leased); a loop over every key: in a thread."""
        free: list[Any] = []
        leased: list[Any] = []
        for k in keys:
            (leased if k in self else free).append(k)
        return free, leased

    def union(self) -> set[Any]:
        out: set[Any] = set()
        for s in self._sets:
            out.update(s)
        return out


class LeaseReader:
    """Reads other clusters' leases; caches decoded parts by name (parts never change)."""

    _parts: dict[str, frozenset[Any]]

    def __init__(self) -> None:
        self._parts = {}

    async def leased(self, store: Store, own_lease: str | None = None) -> LeasedKeys:
        """The keys of the live leases of ``store``, except ``own_lease``.

        Raises ``FileNotFoundError`` if a lease kept changing its parts while being read
        (the caller deletes nothing this round).
        """
        sets: list[frozenset[Any]] = []
        used: set[str] = set()
        live = 0
        for name in await store.list_files(LEASES):
            if name != own_lease and "/" not in name[len(LEASES) + 1 :]:
                lease = await self._read_lease(store, name, used)
                if lease is not None:
                    live += 1
                    sets.extend(lease)
        self._parts = {n: keys for n, keys in self._parts.items() if n in used}
        return LeasedKeys(sets, live)

    async def _read_lease(
        self, store: Store, name: str, used: set[str]
    ) -> list[frozenset[Any]] | None:
        """The key sets of a live lease; None if it is not live."""
        for attempt in range(3):
            # Vanished (withdrawn), unsigned or damaged: it protects nothing. Any other
            # error (an unreachable store) propagates: then nothing is deleted.
            try:
                data = await store.read_file(name)
            except (FileNotFoundError, IntegrityError):
                return None
            try:
                manifest: _Manifest = await _in_thread(_decode_manifest, data)
            except Exception:
                return None
            if time.time() > manifest.expires + SKEW_MARGIN:
                return None
            try:
                sets = [manifest.keys]
                for part in manifest.parts:
                    sets.append(await self._part(store, part))
                    used.add(part)
                return sets
            except FileNotFoundError:
                if attempt == 2:
                    raise
                # The writer replaced its parts since its manifest was read: read it again.
        raise AssertionError("unreachable")  # pragma: no cover

    async def _part(self, store: Store, name: str) -> frozenset[Any]:
        keys = self._parts.get(name)
        if keys is None:
            try:
                keys = await _in_thread(_decode_part, await store.read_file(name))
            except (IntegrityError, ValueError, TypeError, msgpack.UnpackException):
                keys = frozenset()  # damaged: it protects nothing (as a damaged lease)
            self._parts[name] = keys
        return keys


async def keys_leased_by_others(store: Store, own_lease: str | None) -> set[Any]:
    """Keys in the live leases of the store, except ``own_lease``."""
    leased = await LeaseReader().leased(store, own_lease)
    return await _in_thread(leased.union)  # type: ignore[no-any-return]


async def write_lease(
    store: Store, writer_id: str, keys: Collection[Any], written: float | None = None
) -> LeaseWriter:
    """Publish a lease on ``keys`` (for tools and tests), written at ``written``."""
    writer = LeaseWriter(store, writer_id)
    await writer.publish([list(keys)])
    if written is not None:
        await store.write_file(writer.name, _encode_manifest(written, writer.ttl, writer.parts))
    return writer


async def remove_expired_leases(store: Store) -> int:
    """Delete the files of leases that expired (past the skew margin); return how many."""
    # Parts before manifests: a writer writes its manifest before its first part, so a
    # part listed here whose manifest is not listed next belongs to a withdrawn lease.
    parts = await store.list_files(LEASE_KEYS)
    manifests = await store.list_files(LEASES)
    live: set[str] = set()
    expired: list[str] = []
    for name in manifests:
        writer_id = name[len(LEASES) + 1 :]
        try:
            manifest = _decode_manifest(await store.read_file(name))
        except FileNotFoundError:
            continue
        except Exception:
            manifest = _Manifest(0.0, (), frozenset())  # damaged: protects nothing
        if time.time() > manifest.expires + SKEW_MARGIN:
            expired.append(name)
        else:
            live.add(writer_id)
    await store.delete_files(expired)
    await store.delete_files([p for p in parts if p.split("/")[1] not in live])
    return len(expired)
