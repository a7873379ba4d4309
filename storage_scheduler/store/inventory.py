"""What a store holds, found by listing it: for the repair tools and start-up sweeps.

Listing is the slow, authoritative view (the catalog is the fast one). Everything here
carries on past a file it cannot use: a stray file under ``objects/``, an object whose
header cannot be read, a damaged object. Those are reported, never fatal.

Partial writes (``.tmp-`` files of a writer killed mid-write) are recognised by name and
removed by :func:`sweep_partial_writes` once they are older than any write in progress
can be.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from storage_scheduler._exceptions import IntegrityError, StoreError
from storage_scheduler.store import serialize
from storage_scheduler.store._store import Store

__all__ = [
    "Inventory",
    "StoredObject",
    "stored_keys",
    "sweep_partial_writes",
    "take_inventory",
]

logger = logging.getLogger(__name__)

#: A partial write older than this (seconds) belongs to a writer that died.
PARTIAL_WRITE_AGE = 3600.0


@dataclass(frozen=True, slots=True)
class StoredObject:
    """A listed object whose key is known."""

    key: Any
    listed: serialize.ListedObject

    @property
    def path(self) -> str:
        return self.listed.path

    @property
    def size(self) -> int:
        return self.listed.size


@dataclass
class Inventory:
    """What a listing of ``objects/`` found."""

    objects: list[StoredObject] = field(default_factory=list)
    #: Unfinished or interrupted writes.
    partial: list[str] = field(default_factory=list)
    #: Files this package did not write, and objects whose header cannot be read,
    #: with the reason.
    problems: list[tuple[str, str]] = field(default_factory=list)


async def take_inventory(store: Store, concurrency: int = 64) -> Inventory:
    """List the store's objects; read the header of those whose name does not spell the
    key (a digest name)."""
    listed, other = serialize.parse_listing(await store.find("objects"))
    inventory = Inventory()
    for path in other:
        if ".tmp-" in path.rsplit("/", 1)[-1]:
            inventory.partial.append(path)
        else:
            inventory.problems.append((path, "not an object of this store"))
    sem = asyncio.Semaphore(concurrency)

    async def key_of(obj: serialize.ListedObject) -> None:
        if obj.key is not None:
            inventory.objects.append(StoredObject(obj.key, obj))
            return
        async with sem:
            try:
                header = await store.read_header(obj.path)
            except (OSError, StoreError) as e:
                inventory.problems.append((obj.path, str(e)))
                return
        inventory.objects.append(StoredObject(header.key, obj))

    await asyncio.gather(*map(key_of, listed))
    return inventory


async def stored_keys(store: Store) -> dict[Any, int]:
    """Every stored key with the total size of its objects (every version)."""
    out: dict[Any, int] = {}
    for obj in (await take_inventory(store)).objects:
        out[obj.key] = out.get(obj.key, 0) + obj.size
    return out


async def verify_object(store: Store, obj: StoredObject) -> serialize.ObjectHeader:
    """Read and verify ``obj`` entirely (checksum, signature, key); its token must be the
    one its name says: an object copied to another version's name is damaged."""
    where = store.where(obj.path)
    data = await store.read_path(obj.path)
    keys = store.settings.signing_keys
    header, _ = await asyncio.to_thread(serialize.verify, data, obj.key, where, keys)
    named = None if header.token is None else serialize.version_name(header.token)
    if named != obj.listed.version:
        raise IntegrityError(f"object {where} carries the token of another version")
    return header


async def sweep_partial_writes(store: Store, older_than: float = PARTIAL_WRITE_AGE) -> int:
    """Delete partial writes (``.tmp-`` files, unfinished multipart uploads) last touched
    more than ``older_than`` seconds ago, anywhere in the store; return how many went."""
    now = time.time()
    partial = [p for p in await store.find("") if ".tmp-" in p.rsplit("/", 1)[-1]]

    def stale(path: str) -> bool:
        try:
            modified = store.fs.modified(path)
        except (OSError, NotImplementedError):
            return older_than <= 0  # cannot tell its age: only a sweep of everything
        return bool(now - modified.timestamp() > older_than)

    ages = await asyncio.to_thread(lambda: [stale(p) for p in partial])
    victims = [p for p, old in zip(partial, ages, strict=True) if old]
    await store.delete_paths(victims)
    aborted = await _abort_uploads(store, older_than)
    if victims or aborted:
        logger.info(
            "Removed %d partial writes and %d unfinished uploads from %s",
            len(victims),
            aborted,
            store.url,
        )
    return len(victims) + aborted


async def _abort_uploads(store: Store, older_than: float) -> int:
    """Abort the store's unfinished S3 multipart uploads (a writer killed mid-upload
    leaves one, billed until aborted)."""
    call_s3 = getattr(store.fs, "_call_s3", None)
    if call_s3 is None:
        return 0
    bucket, _, prefix = store.root.lstrip("/").partition("/")
    now = time.time()
    try:
        listing = await _on_fs_loop(store, call_s3("list_multipart_uploads", Bucket=bucket))
    except Exception as e:  # a bucket policy may forbid it: not worth failing gc for
        logger.warning("Cannot list unfinished uploads in %s: %s", store.url, e)
        return 0
    n = 0
    for upload in listing.get("Uploads", []):
        key = upload["Key"]
        if prefix and not key.startswith(prefix + "/"):
            continue
        if now - upload["Initiated"].timestamp() <= older_than:
            continue
        await _on_fs_loop(
            store,
            call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload["UploadId"]),
        )
        n += 1
    return n


async def _on_fs_loop(store: Store, coro: Any) -> Any:
    """Run a coroutine of an async filesystem on that filesystem's own loop."""
    loop = getattr(store.fs, "loop", None)
    if loop is None or loop is asyncio.get_running_loop():
        return await coro
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))
