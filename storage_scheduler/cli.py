"""``dask storage``: look after a store from the command line.

Registered through the ``dask_cli`` entry point, so it appears as ``dask storage``::

    dask storage ls URL                      stored keys, sizes and ages
    dask storage du URL [--by prefix|age]    keys and bytes, grouped
    dask storage gc URL --older-than 7d      delete by a retention rule (--dry-run first)
    dask storage verify URL [--delete]       read every object and check its checksum
    dask storage rebuild-catalog URL         recreate the manifest from a listing
    dask storage status SCHEDULER_ADDRESS    task RAM and stored bytes of a running cluster

Every command takes ``--storage-option key=value`` (repeatable) for the filesystem.
``gc``, ``verify`` and ``rebuild-catalog`` show their progress on stderr when it is a
terminal (not with ``--quiet``); what they found goes to stdout.
The catalog (``manifest/``) is what ``ls``, ``du`` and ``gc`` read: fast even for
millions of keys. ``verify`` and ``rebuild-catalog`` read the store itself.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar, cast

import click

from dask.utils import format_bytes, format_time, key_split, parse_bytes, parse_timedelta

from storage_scheduler._exceptions import IntegrityError, StorageSchedulerError
from storage_scheduler._protocol import StorageStatus
from storage_scheduler.config import parse_storage_options
from storage_scheduler.progress import ProgressLine, Tally
from storage_scheduler.store import Store
from storage_scheduler.store.catalog import Catalog, Entry
from storage_scheduler.store.inventory import (
    PARTIAL_WRITE_AGE,
    Inventory,
    StoredObject,
    sweep_partial_writes,
    take_inventory,
    verify_object,
)
from storage_scheduler.store.leases import keys_leased_by_others, remove_expired_leases

__all__ = ["storage"]

T = TypeVar("T")

storage_option = click.option(
    "--storage-option",
    "storage_options",
    multiple=True,
    help="Filesystem option as key=value (repeatable)",
)
quiet_option = click.option(
    "--quiet", "-q", is_flag=True, help="No progress line on stderr (shown only on a terminal)"
)
#: Objects deleted per request: an S3 DeleteObjects call takes at most 1,000 keys.
DELETE_BATCH = 1000


def _run(url: str, options: Iterable[str], work: Callable[[Store], Awaitable[T]]) -> T:
    """Open the store, run ``work`` on it, and turn our errors into a clean exit."""

    async def main() -> T:
        store = Store.from_url(url, **parse_storage_options(options))
        try:
            await _must_exist(store, url)
            return await work(store)
        finally:
            store.close()

    try:
        return asyncio.run(main())
    except (StorageSchedulerError, OSError) as e:
        raise click.ClickException(str(e)) from e


async def _must_exist(store: Store, url: str) -> None:
    """A mistyped directory or bucket is an error, not an empty store."""
    root = store.root if store.local else store.root.lstrip("/").split("/", 1)[0]
    if root and not await asyncio.to_thread(store.fs.exists, root):
        raise click.ClickException(f"no store at {store.url}: {root!r} does not exist")


async def _catalog(store: Store, compact: bool = True) -> Catalog:
    catalog = Catalog(store)
    await catalog.load(compact=compact)
    return catalog


async def _read_catalog(store: Store) -> Catalog:
    """The catalog, for commands that only read: never compacted (written) by them."""
    return await _catalog(store, compact=False)


def _age(entry: Entry, now: float) -> str:
    return format_time(max(0.0, now - entry.created))


@click.group()
def storage() -> None:
    """Inspect and clean the store of a storage_scheduler cluster."""


@storage.command("ls")
@click.argument("url")
@storage_option
@click.option("--limit", type=int, default=None, help="Show at most this many keys")
def ls(url: str, storage_options: tuple[str, ...], limit: int | None) -> None:
    """List the stored keys with their sizes and ages, newest first."""
    catalog = _run(url, storage_options, _read_catalog)
    now = time.time()
    rows = sorted(catalog.items(), key=lambda kv: -kv[1].created)
    for key, entry in rows[:limit]:
        click.echo(f"{format_bytes(entry.nbytes):>10}  {_age(entry, now):>10}  {key!r}")
    click.echo(
        f"{len(rows)} stored results of {len(catalog.entries)} keys, "
        f"{format_bytes(sum(e.nbytes for _, e in rows))}"
    )


AGE_BUCKETS = [
    (3600, "< 1 hour"),
    (86400, "< 1 day"),
    (7 * 86400, "< 1 week"),
    (float("inf"), ">= 1 week"),
]


@storage.command("du")
@click.argument("url")
@storage_option
@click.option("--by", type=click.Choice(["prefix", "age"]), default="prefix", show_default=True)
def du(url: str, storage_options: tuple[str, ...], by: str) -> None:
    """Keys and bytes in the store, by key prefix (task name) or by age."""
    catalog = _run(url, storage_options, _read_catalog)
    now = time.time()
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for key, entry in catalog.items():
        if by == "prefix":
            group = str(key_split(key))
        else:
            group = next(label for limit, label in AGE_BUCKETS if now - entry.created < limit)
        groups[group][0] += 1
        groups[group][1] += entry.nbytes
    order = sorted(groups, key=lambda g: -groups[g][1])
    if by == "age":
        order = [label for _, label in AGE_BUCKETS if label in groups]
    click.echo(f"{'keys':>10} {'bytes':>12}  {by}")
    for group in order:
        n, nbytes = groups[group]
        click.echo(f"{n:>10} {format_bytes(nbytes):>12}  {group}")
    total_n = sum(g[0] for g in groups.values())
    total_b = sum(g[1] for g in groups.values())
    click.echo(f"{total_n:>10} {format_bytes(total_b):>12}  total")


@storage.command("gc")
@click.argument("url")
@storage_option
@click.option(
    "--older-than", default=None, help="Delete results stored longer ago than this, e.g. 7d"
)
@click.option(
    "--max-size",
    default=None,
    help="Delete the oldest results until the store is this small, e.g. 100GiB",
)
@click.option("--all", "everything", is_flag=True, help="Delete every stored result")
@click.option("--dry-run", is_flag=True, help="Only say what would be deleted")
@quiet_option
def gc(
    url: str,
    storage_options: tuple[str, ...],
    older_than: str | None,
    max_size: str | None,
    everything: bool,
    dry_run: bool,
    quiet: bool,
) -> None:
    """Delete stored results by a retention rule.

    Keys held by a running cluster (in its lease) are never deleted.
    """
    if not (older_than or max_size or everything):
        raise click.UsageError("say what to delete: --older-than, --max-size or --all")
    if older_than and not older_than.strip()[-1:].isalpha():
        raise click.BadParameter(f"give a unit: 7d, 12h, 30m (got {older_than!r})")
    try:
        max_age = parse_timedelta(older_than) if older_than else None
        limit = parse_bytes(max_size) if max_size else None
    except (ValueError, KeyError) as e:
        raise click.BadParameter(str(e)) from e
    if limit is not None and limit <= 0:
        raise click.BadParameter(f"--max-size must be positive, got {max_size!r}")

    async def work(store: Store) -> tuple[int, int, int, int]:
        tally.begin("reading the catalog")
        catalog = await _catalog(store)
        now = time.time()
        oldest_first = sorted(catalog.items(), key=lambda kv: kv[1].created)
        doomed: dict[tuple[Any, str | None], int] = {}
        if everything:
            doomed = {(k, e.token): e.nbytes for k, e in oldest_first}
        if max_age is not None:
            doomed.update(
                {(k, e.token): e.nbytes for k, e in oldest_first if now - e.created > max_age}
            )
        if limit is not None:
            remaining = catalog.nbytes - sum(doomed.values())
            for key, entry in oldest_first:
                if remaining <= limit:
                    break
                if (key, entry.token) not in doomed:
                    doomed[key, entry.token] = entry.nbytes
                    remaining -= entry.nbytes
        protected = await keys_leased_by_others(store, own_lease=None)
        kept = [kt for kt in doomed if kt[0] in protected]
        for kt in kept:
            del doomed[kt]
        # Objects the catalog never heard of: written in the last flush interval before a
        # scheduler was killed. Only a listing finds them; deleted with --all when no live
        # cluster holds anything (one might be writing them right now).
        stray: list[StoredObject] = []
        if everything and not protected:
            tally.begin("listing the store")
            known = {store.path(k, e.token) for k, e in catalog.items()}
            stray = [o for o in (await take_inventory(store)).objects if o.path not in known]
        swept = 0
        if not dry_run:
            tally.begin("sweeping partial writes")
            # Left by writers that died; with --all and no live cluster, whatever their age.
            age = 0.0 if everything and not protected else PARTIAL_WRITE_AGE
            swept = await sweep_partial_writes(store, older_than=age)
            await remove_expired_leases(store)  # left by clusters that did not shut down
            victims = [(o.path, o.size) for o in stray]
            victims += [(store.path(k, t), nbytes) for (k, t), nbytes in doomed.items()]
            tally.begin("deleted", len(victims), sum(size for _, size in victims))
            for i in range(0, len(victims), DELETE_BATCH):
                batch = victims[i : i + DELETE_BATCH]
                await store.delete_paths([path for path, _ in batch])
                tally.add(sum(size for _, size in batch), len(batch))
            for key, token in doomed:
                catalog.discard(key, token)
            await catalog.flush()
        n = len(doomed) + len(stray)
        return n, sum(doomed.values()) + sum(o.size for o in stray), len(kept), swept

    tally = Tally()
    with ProgressLine(tally, "gc", quiet=quiet):
        n, nbytes, kept, swept = _run(url, storage_options, work)
    verb = "Would delete" if dry_run else "Deleted"
    click.echo(f"{verb} {n} stored results, {format_bytes(nbytes)}")
    if kept:
        click.echo(f"Kept {kept} results that a running cluster holds")
    if swept:
        click.echo(f"Removed {swept} partial writes of writers that died")


@storage.command("verify")
@click.argument("url")
@storage_option
@click.option("--delete", is_flag=True, help="Delete the objects that fail, so they are recomputed")
@quiet_option
def verify(url: str, storage_options: tuple[str, ...], delete: bool, quiet: bool) -> None:
    """Read every stored object and check it (checksum, signature, key and token).

    Files that are not objects of this store are reported and left alone; partial writes
    are counted (``gc`` removes them). Exits with status 1 if anything was found wrong.
    """

    async def work(store: Store) -> tuple[Inventory, list[tuple[StoredObject, str]]]:
        tally.begin("listing the store")
        inventory = await take_inventory(store)
        objects = inventory.objects
        tally.begin("checked", len(objects), sum(obj.size for obj in objects))
        sem = asyncio.Semaphore(store.settings.max_concurrency)
        bad: list[tuple[StoredObject, str]] = []

        async def check(obj: StoredObject) -> None:
            async with sem:
                try:
                    await verify_object(store, obj)
                except (IntegrityError, FileNotFoundError) as e:
                    bad.append((obj, str(e)))
            tally.add(obj.size)

        await asyncio.gather(*map(check, objects))
        if delete and bad:
            catalog = await _catalog(store)
            await store.delete_paths([obj.path for obj, _ in bad])
            for obj, _ in bad:
                for entry in catalog.versions(obj.key):
                    if store.path(obj.key, entry.token) == obj.path:
                        catalog.discard(obj.key, entry.token)
            await catalog.flush()
        return inventory, bad

    tally = Tally()
    with ProgressLine(tally, "verify", quiet=quiet):
        inventory, bad = _run(url, storage_options, work)
    for obj, reason in bad:
        click.echo(f"BAD {obj.key!r}: {reason}")
    for path, reason in inventory.problems:
        click.echo(f"NOT AN OBJECT {path}: {reason}")
    click.echo(
        f"{len(inventory.objects)} objects checked, {len(bad)} bad"
        + (" (deleted)" if delete and bad else "")
        + f", {len(inventory.problems)} other files, {len(inventory.partial)} partial writes"
    )
    if (bad and not delete) or inventory.problems:
        sys.exit(1)


@storage.command("rebuild-catalog")
@click.argument("url")
@storage_option
@quiet_option
def rebuild_catalog(url: str, storage_options: tuple[str, ...], quiet: bool) -> None:
    """Recreate the catalog by listing the store (when the manifest is lost or damaged).

    Files that cannot be catalogued are reported and left out; exits with status 1 then.
    """

    async def work(store: Store) -> tuple[Catalog, list[tuple[str, str]]]:
        catalog = Catalog(store)
        return catalog, await catalog.rebuild(tally)

    tally = Tally()
    with ProgressLine(tally, "rebuild-catalog", quiet=quiet):
        catalog, problems = _run(url, storage_options, work)
    for path, reason in problems:
        click.echo(f"LEFT OUT {path}: {reason}")
    click.echo(f"Catalog rebuilt: {len(catalog)} stored results")
    if problems:
        sys.exit(1)


@storage.command("status")
@click.argument("scheduler_address")
@click.option(
    "--timeout", default="30s", show_default=True, help="How long to wait for the scheduler"
)
def status(scheduler_address: str, timeout: str) -> None:
    """Task RAM and stored bytes per worker of a running cluster, and the store's totals."""
    from distributed.core import rpc

    from storage_scheduler.dashboard.report import format_status

    async def fetch() -> StorageStatus:
        async with rpc(  # type: ignore[no-untyped-call]
            scheduler_address, timeout=parse_timedelta(timeout)
        ) as scheduler:
            try:
                await scheduler.identity()
            except (OSError, ValueError, TypeError) as e:  # unreachable, or not an address
                raise click.ClickException(
                    f"cannot reach the scheduler at {scheduler_address}: {e}"
                ) from e
            try:
                return cast(StorageStatus, await scheduler.storage_status())
            except Exception as e:
                raise click.ClickException(
                    f"storage_scheduler is not running on {scheduler_address} ({e})"
                ) from e

    click.echo(format_status(asyncio.run(fetch())))
