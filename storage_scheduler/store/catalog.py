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
from dataclasses import replace
from typing import Any

from storage_scheduler._exceptions import StoreError, UntrustedObjectError
from storage_scheduler.progress import Tally
from storage_scheduler.store._segments import (
    ANY_VERSION,
    Deleted,
    Entry,
    Versions,
    decode_segment,
    encode_segment,
    encode_snapshot,
    versions_of,
)
from storage_scheduler.store._store import Store
from storage_scheduler.store.inventory import StoredObject, take_inventory
from storage_scheduler.store.serialize import pack_key, version_name

__all__ = ["Catalog", "Entry"]

logger = logging.getLogger(__name__)

MANIFEST = "manifest"
#: Where unreadable catalog segments are set aside.
QUARANTINE = "quarantine"
#: More segments than this at start are compacted into one snapshot.
COMPACT_AFTER = 16


def _segment_time(name: str) -> float:
    """When a segment was written, from its name (``<time_ns>-<writer>-<seq>.seg``)."""
    try:
        return int(name.rsplit("/", 1)[-1].split("-", 1)[0]) / 1e9
    except ValueError:
        return float("inf")  # not named by us: its deletions win


def _apply_deleted(catalog: Catalog, deleted: list[Deleted], written: float) -> None:
    """Remove what a segment written at ``written`` deletes: each version the very write
    it names (its ``created``), or else any write up to ``written``; never a result
    stored again since."""
    for key, token, created in deleted:
        limit = written if created is None else created
        for entry in catalog.versions(key):
            if (token is ANY_VERSION or entry.token == token) and entry.created <= limit:
                catalog._remove(key, entry.token)


class Catalog:
    """Stored results of one store, as seen by one scheduler.

    A key may have several stored results, one per token (clusters running other code
    on one store): each is its own object, and its own entry.

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
    #: The versions of every stored key.
    entries: dict[Any, Versions]
    #: Number of stored results (versions) and their total size.
    count: int
    nbytes: int
    #: Changes not yet written, by (key, token): an Entry to add, or a deletion: the
    #: ``created`` of the write deleted (None: any write up to the segment's time).
    _pending: dict[tuple[Any, str | None], Entry | float | None]
    #: Segments already reflected in ``entries`` (compaction may delete them).
    _seen_segments: list[str]
    _seq: int

    def __init__(self, store: Store, writer_id: str | None = None):
        self.store = store
        self.writer_id = writer_id or uuid.uuid4().hex[:12]
        self.entries = {}
        self.count = 0
        self.nbytes = 0
        self._pending = {}
        self._seen_segments = []
        self._seq = 0

    @property
    def segments_since_compaction(self) -> int:
        return len(self._seen_segments)

    def __len__(self) -> int:
        """The number of stored results (a key stored by different code counts twice)."""
        return self.count

    def __contains__(self, key: object) -> bool:
        return key in self.entries

    def versions(self, key: Any) -> tuple[Entry, ...]:
        """Every stored result of ``key``."""
        return versions_of(self.entries.get(key))

    def get(self, key: Any, token: str | None) -> Entry | None:
        """The stored result of ``key`` produced with ``token``, if any."""
        v = self.entries.get(key)
        if isinstance(v, Entry):
            return v if v.token == token else None
        return next((e for e in versions_of(v) if e.token == token), None)

    def items(self) -> Iterator[tuple[Any, Entry]]:
        """Every stored result, as (key, entry)."""
        for key, v in self.entries.items():
            if isinstance(v, Entry):
                yield key, v
            else:
                for e in v:
                    yield key, e

    def _set(self, key: Any, entry: Entry) -> Entry | None:
        """Add or replace the version ``entry.token`` of ``key``; return the one replaced."""
        v = self.entries.get(key)
        if v is None or (isinstance(v, Entry) and v.token == entry.token):
            self.entries[key] = entry
            old = v
        else:
            others = versions_of(v)
            old = next((e for e in others if e.token == entry.token), None)
            self.entries[key] = (*(e for e in others if e.token != entry.token), entry)
        self.count += old is None
        self.nbytes += entry.nbytes - (old.nbytes if old is not None else 0)
        return old

    def _remove(self, key: Any, token: object) -> None:
        """Forget the version ``token`` of ``key`` (every version for ``ANY_VERSION``)."""
        versions = versions_of(self.entries.get(key))
        gone = [e for e in versions if token is ANY_VERSION or e.token == token]
        left = tuple(e for e in versions if not (token is ANY_VERSION or e.token == token))
        if not gone:
            return
        if not left:
            del self.entries[key]
        else:
            self.entries[key] = left[0] if len(left) == 1 else left
        self.count -= len(gone)
        self.nbytes -= sum(e.nbytes for e in gone)

    def add(
        self,
        key: Any,
        token: str | None,
        nbytes: int,
        kept: bool = False,
        lineage: str | None = None,
        created: float | None = None,
    ) -> None:
        """Record a stored result; ``created`` is the time in its object's header."""
        old = self.get(key, token)
        kept = kept or (old is not None and old.kept)
        entry = Entry(token, nbytes, time.time() if created is None else created, kept, lineage)
        self._set(key, entry)
        self._pending[key, token] = entry

    def keep(self, key: Any, token: str | None) -> None:
        """Mark a stored result as asked for: kept by every cluster's lifecycle policy."""
        old = self.get(key, token)
        if old is not None and not old.kept:
            new = replace(old, kept=True)
            self._set(key, new)
            self._pending[key, token] = new

    def discard(self, key: Any, token: str | None) -> None:
        """Forget the stored result of ``key`` produced with ``token``: that very write,
        not one made since by another cluster (whose entry other catalogs keep)."""
        old = self.get(key, token) or self._pending.get((key, token))
        self._remove(key, token)
        if old is not None or (key, token) in self._pending:
            # The write deleted: an entry's, or that of a deletion already pending.
            self._pending[key, token] = old.created if isinstance(old, Entry) else old

    def _replace(self, entries: dict[Any, Versions]) -> None:
        self.entries = entries
        self.count = self.nbytes = 0
        for _, e in self.items():
            self.count += 1
            self.nbytes += e.nbytes

    # ------------------------------------------------------------------- I/O

    def _segment_name(self) -> str:
        self._seq += 1
        return f"{MANIFEST}/{time.time_ns():020d}-{self.writer_id}-{self._seq:06d}.seg"

    async def flush(self) -> int:
        """Write the pending changes as one segment; return how many there were."""
        if not self._pending:
            return 0
        pending, self._pending = self._pending, {}
        added = [(k, e) for (k, _), e in pending.items() if isinstance(e, Entry)]
        deleted = [(k, t, e) for (k, t), e in pending.items() if not isinstance(e, Entry)]
        name = self._segment_name()
        try:
            data = await asyncio.get_running_loop().run_in_executor(
                None, encode_segment, added, deleted
            )
            await self.store.write_file(name, data)
        except BaseException:
            # Failed, or cancelled by a close: keep them for the next flush unless replaced.
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
        entries, damaged = await loop.run_in_executor(None, _replay, self.store, blobs, names)
        self._replace(entries)
        if damaged and compact:  # a writer: set them aside for ``rebuild-catalog``
            await _quarantine(self.store, damaged, dict(zip(names, blobs, strict=True)))
        names = [n for n in names if n not in damaged]
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

    async def refresh(self) -> int:
        """Replay the segments other schedulers wrote since this catalog read the manifest:
        what they stored, deleted and keep since. Returns how many segments were read.

        A deleter refreshes first, so that it never deletes a result another cluster
        recorded meanwhile. Entries are applied in chunks, yielding to the event loop.
        """
        seen = set(self._seen_segments)
        new = [n for n in await self.store.list_files(MANIFEST) if n not in seen]
        if not new:
            return 0
        read = await asyncio.gather(*map(self._read_segment, new))
        found = [(n, blob) for n, blob in zip(new, read, strict=True) if blob is not None]
        loop = asyncio.get_running_loop()
        for name, blob in found:
            try:
                added, deleted = await loop.run_in_executor(None, decode_segment, blob)
            except Exception as e:  # quarantined by the next scheduler that starts
                logger.warning("Skipping unreadable catalog segment %s: %s", name, e)
                continue
            for i, (key, entry) in enumerate(added):
                mine = self.get(key, entry.token)
                if mine is None or mine.created <= entry.created:
                    self._set(key, replace(entry, kept=entry.kept or bool(mine and mine.kept)))
                if i % 10_000 == 9_999:
                    await asyncio.sleep(0)
            _apply_deleted(self, deleted, _segment_time(name))
            self._seen_segments.append(name)
        return len(found)

    async def _read_segment(self, name: str) -> bytes | None:
        try:
            return await self.store.read_file(name)
        except FileNotFoundError:
            return None  # compacted away by another scheduler since the listing
        except UntrustedObjectError as e:
            logger.warning("Ignoring catalog segment %s: %s", name, e)
            return None

    async def compact(self) -> None:
        """Write the whole catalog as one segment and delete the segments it replaces."""
        old = list(self._seen_segments)
        await self.flush()
        name = self._segment_name()
        snapshot = self.entries.copy()  # one quick call: entries are never changed in place
        data = await asyncio.get_running_loop().run_in_executor(None, encode_snapshot, snapshot)
        await self.store.write_file(name, data)
        await self.store.delete_files(old + [n for n in self._seen_segments if n not in old])
        self._seen_segments = [name]

    async def rebuild(self, tally: Tally | None = None) -> list[tuple[str, str]]:
        """Recreate the manifest from a listing of the store (reads every header).

        Returns the files that were left out, with the reason: stray files, objects whose
        header cannot be read or whose name is not their token's. ``tally`` counts progress.
        """
        tally = tally or Tally()
        tally.begin("listing the store")
        inventory = await take_inventory(self.store)
        tally.begin("catalogued", len(inventory.objects), sum(o.size for o in inventory.objects))
        sem = asyncio.Semaphore(64)
        problems = list(inventory.problems)
        catalog = Catalog(self.store, self.writer_id)

        async def add(obj: StoredObject) -> None:
            async with sem:
                try:
                    h = await self.store.read_header(obj.path)
                except (OSError, StoreError) as e:
                    problems.append((obj.path, str(e)))
                    return
                finally:
                    tally.add(obj.size)
            named = None if h.token is None else version_name(h.token)
            if named != obj.listed.version or pack_key(h.key) != pack_key(obj.key):
                problems.append((obj.path, "its header does not match its name"))
                return
            catalog._set(obj.key, Entry(h.token, obj.size, h.created))

        await asyncio.gather(*map(add, inventory.objects))
        self._replace(catalog.entries)
        self._pending = {}
        self._seen_segments = await self.store.list_files(MANIFEST)
        await self.compact()
        return problems


def _replay(
    store: Store, blobs: list[bytes], names: list[str]
) -> tuple[dict[Any, Versions], list[str]]:
    """The entries the segments add up to, and the names of those that cannot be read."""
    catalog = Catalog(store)  # replays with the same rules as live
    damaged = []
    for name, blob in zip(names, blobs, strict=True):
        try:
            added, deleted = decode_segment(blob)
        except Exception as e:
            logger.warning("Skipping unreadable catalog segment %s: %s", name, e)
            damaged.append(name)
            continue
        for key, entry in added:
            catalog._set(key, entry)
        _apply_deleted(catalog, deleted, float("inf"))  # in order: nothing came after
    return catalog.entries, damaged


async def _quarantine(store: Store, damaged: list[str], blobs: dict[str, bytes]) -> None:
    """Move unreadable segments to ``quarantine/``: out of the manifest, never deleted
    (their keys come back with ``dask storage rebuild-catalog``)."""
    for name in damaged:
        try:
            await store.write_file(f"{QUARANTINE}/{name}", blobs[name])
            await store.delete_files([name])
        except OSError as e:
            logger.warning("Cannot quarantine catalog segment %s: %s", name, e)
        else:
            logger.warning(
                "Moved unreadable catalog segment %s to %s/ (run dask storage "
                "rebuild-catalog to recover its keys)",
                name,
                QUARANTINE,
            )
