"""The scheduler's index of stored keys, kept in the store as an append-only manifest.

Listing a bucket of a million objects at every start would take minutes, so the
scheduler keeps its own index: for every stored key, the token of what produced it,
the object's size and when it was written. Changes are batched in memory and written
every ``catalog-flush-interval`` as one *segment* object under ``manifest/`` (object
stores cannot append; a new object per batch can be written atomically). A segment holds
additions and deletions; at start, the segments are replayed in name (time) order.
When there are many, they are compacted into one snapshot segment and the segments it
replaced are deleted. Several clusters sharing a store each write their own segments.

If the manifest is lost or damaged, :meth:`Catalog.rebuild` recreates it by listing the
store and reading the objects' headers (``dask storage rebuild-catalog``).

The catalog can lag the store (objects deleted behind its back, or written in the last
flush interval before a crash). That is safe: a listed object that is gone is detected
when read and recomputed; an unlisted one is recomputed and overwritten.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import msgpack

from storage_scheduler._exceptions import UntrustedObjectError
from storage_scheduler.store._store import Store
from storage_scheduler.store.serialize import key_to_msgpack, msgpack_ext_hook

__all__ = ["Catalog", "Entry"]

logger = logging.getLogger(__name__)

MANIFEST = "manifest"
#: More segments than this at start are compacted into one snapshot.
COMPACT_AFTER = 16


@dataclass(frozen=True, slots=True)
class Entry:
    """What the catalog knows of one stored key."""

    #: Token of the task that produced the result (see :mod:`storage_scheduler.tokens`).
    token: str | None
    #: Size of the stored object in bytes.
    nbytes: int
    #: When it was stored (seconds since the epoch).
    created: float
    #: A client asked for it (or it is annotated ``storage_keep``): no cluster's lifecycle
    #: policy deletes it; only ``dask storage gc`` does.
    kept: bool = False


def _encode_segment(added: dict[Any, Entry], deleted: list[Any]) -> bytes:
    # Columns, not records: a million entries decode in one msgpack call.
    return msgpack.packb(
        {
            "version": 1,
            "keys": [key_to_msgpack(k) for k in added],
            "tokens": [e.token for e in added.values()],
            "nbytes": [e.nbytes for e in added.values()],
            "created": [e.created for e in added.values()],
            "kept": [e.kept for e in added.values()],
            "deleted": [key_to_msgpack(k) for k in deleted],
        },
        use_bin_type=True,
    )


def _decode_segment(data: bytes) -> tuple[Iterator[tuple[Any, Entry]], Any]:
    seg = msgpack.unpackb(data, raw=False, use_list=False, ext_hook=msgpack_ext_hook)
    kept = seg.get("kept") or (False,) * len(seg["keys"])  # segments from before "kept"
    added = (
        (k, Entry(t, n, c, bool(kp)))
        for k, t, n, c, kp in zip(
            seg["keys"], seg["tokens"], seg["nbytes"], seg["created"], kept, strict=True
        )
    )
    return added, seg["deleted"]


class Catalog:
    """Stored keys of one store, as seen by one scheduler.

    Parameters
    ----------
    store
        The store whose ``manifest/`` this catalog reads and writes.
    writer_id
        Distinguishes this scheduler's segments from other clusters' on the same store.

    Notes
    -----
    ``add``, ``discard`` and lookups are synchronous and do no I/O: they run in scheduler
    hooks on the event loop. ``load``, ``flush`` and ``rebuild`` are coroutines that do
    their I/O through the store and decode in a thread.
    """

    store: Store
    writer_id: str
    entries: dict[Any, Entry]
    #: Total size of the objects in ``entries``.
    nbytes: int
    #: Changes not yet written: an Entry to add, or None to delete.
    _pending: dict[Any, Entry | None]
    #: Segments already reflected in ``entries`` (compaction may delete them).
    _seen_segments: list[str]
    _seq: int

    def __init__(self, store: Store, writer_id: str | None = None):
        self.store = store
        self.writer_id = writer_id or uuid.uuid4().hex[:12]
        self.entries = {}
        self.nbytes = 0
        self._pending = {}
        self._seen_segments = []
        self._seq = 0

    @property
    def segments_since_compaction(self) -> int:
        return len(self._seen_segments)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: object) -> bool:
        return key in self.entries

    def get(self, key: Any) -> Entry | None:
        return self.entries.get(key)

    def add(self, key: Any, token: str | None, nbytes: int, kept: bool = False) -> None:
        old = self.entries.get(key)
        entry = Entry(token, nbytes, time.time(), kept or (old is not None and old.kept))
        self.nbytes += nbytes - (old.nbytes if old is not None else 0)
        self.entries[key] = entry
        self._pending[key] = entry

    def keep(self, key: Any) -> None:
        """Mark a stored key as asked for: kept by every cluster's lifecycle policy."""
        old = self.entries.get(key)
        if old is not None and not old.kept:
            self.entries[key] = self._pending[key] = replace(old, kept=True)

    def discard(self, key: Any) -> None:
        old = self.entries.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes
        if old is not None or key in self._pending:
            self._pending[key] = None

    def _replace(self, entries: dict[Any, Entry]) -> None:
        self.entries = entries
        self.nbytes = sum(e.nbytes for e in entries.values())

    # ------------------------------------------------------------------- I/O

    def _segment_name(self) -> str:
        self._seq += 1
        return f"{MANIFEST}/{time.time_ns():020d}-{self.writer_id}-{self._seq:06d}.seg"

    async def flush(self) -> int:
        """Write the pending changes as one segment; return how many there were."""
        if not self._pending:
            return 0
        pending, self._pending = self._pending, {}
        added = {k: e for k, e in pending.items() if e is not None}
        deleted = [k for k, e in pending.items() if e is None]
        name = self._segment_name()
        data = await asyncio.get_running_loop().run_in_executor(
            None, _encode_segment, added, deleted
        )
        try:
            await self.store.write_file(name, data)
        except BaseException:
            # Keep the changes for the next flush, unless newer ones replaced them.
            self._pending = {**pending, **self._pending}
            raise
        self._seen_segments.append(name)
        return len(pending)

    async def load(self, compact: bool = True) -> None:
        """Replay the manifest into memory; compact it when it has many segments (unless
        ``compact`` is false: a reader that must not write)."""
        listed = await self.store.list_files(MANIFEST)
        read = await asyncio.gather(*map(self._read_segment, listed))
        names = [n for n, blob in zip(listed, read, strict=True) if blob is not None]
        blobs = [blob for blob in read if blob is not None]
        loop = asyncio.get_running_loop()
        entries = await loop.run_in_executor(None, self._replay, blobs, names)
        self._replace(entries)
        # Only what was read is replaced (and deleted) by a compaction: a segment that
        # vanished is someone else's business, an untrusted one stays for inspection.
        self._seen_segments = list(names)
        logger.info(
            "Catalog of %s: %d stored keys from %d segments",
            self.store.url,
            len(entries),
            len(names),
        )
        if compact and len(names) > COMPACT_AFTER:
            await self.compact()

    async def _read_segment(self, name: str) -> bytes | None:
        try:
            return await self.store.read_file(name)
        except FileNotFoundError:
            return None  # compacted away by another scheduler since the listing
        except UntrustedObjectError as e:
            logger.warning("Ignoring catalog segment %s: %s", name, e)
            return None

    def _replay(self, blobs: list[bytes], names: list[str]) -> dict[Any, Entry]:
        entries: dict[Any, Entry] = {}
        for name, blob in zip(names, blobs, strict=True):
            try:
                added, deleted = _decode_segment(blob)
                entries.update(added)
            except Exception as e:
                logger.warning("Skipping unreadable catalog segment %s: %s", name, e)
                continue
            for key in deleted:
                entries.pop(key, None)
        return entries

    async def compact(self) -> None:
        """Write the whole catalog as one segment and delete the segments it replaces."""
        old = list(self._seen_segments)
        await self.flush()
        name = self._segment_name()
        snapshot = dict(self.entries)
        data = await asyncio.get_running_loop().run_in_executor(None, _encode_segment, snapshot, [])
        await self.store.write_file(name, data)
        await self.store.delete_files(old + [n for n in self._seen_segments if n not in old])
        self._seen_segments = [name]

    async def rebuild(self) -> int:
        """Recreate the manifest from a listing of the store (reads every header)."""
        listing = await self.store.list()
        sem = asyncio.Semaphore(64)

        async def head(key: Any) -> tuple[Any, Any]:
            async with sem:
                try:
                    return key, await self.store.head(key)
                except Exception as e:
                    logger.warning("Leaving %r out of the catalog: %s", key, e)
                    return key, None

        heads = await asyncio.gather(*map(head, listing))
        self._replace({k: Entry(h.token, listing[k], h.created) for k, h in heads if h is not None})
        self._pending = {}
        old = await self.store.list_files(MANIFEST)
        self._seen_segments = old
        await self.compact()
        return len(self.entries)
