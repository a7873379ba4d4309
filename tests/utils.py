"""Helpers shared by the cluster tests."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from distributed import Client, LocalCluster

from storage_scheduler import StorageSchedulerPlugin, Store
from storage_scheduler.store.catalog import Catalog
from storage_scheduler.store.leases import keys_leased_by_others


async def enable_storage(scheduler: Any, url: str, **kwargs: Any) -> StorageSchedulerPlugin:
    """Install storage_scheduler on a running (gen_cluster) scheduler and its workers."""
    plugin = StorageSchedulerPlugin(url, **kwargs)
    await scheduler.register_scheduler_plugin(plugin, name=plugin.name, idempotent=False)
    return plugin


async def async_poll_until(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float = 15,
    period: float = 0.05,
    what: str = "condition",
) -> None:
    """Wait until ``predicate()`` is true; fail the test after ``timeout`` seconds.

    ``distributed.utils_test.async_poll_for``, for predicates that may be coroutines
    too (reading the store).
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached after {timeout} seconds")
        await asyncio.sleep(period)


async def stored_headers(store: Store, key: Any) -> list[Any]:
    """The headers of every stored result (version) of ``key``, by listing the store."""
    from storage_scheduler.store.inventory import take_inventory

    objects = (await take_inventory(store)).objects
    return [await store.read_header(o.path) for o in objects if o.key == key]


async def stored_token(store: Store, key: Any) -> str | None:
    """The token of the one stored result of ``key`` (fails if there are several)."""
    (header,) = await stored_headers(store, key)
    token: str | None = header.token
    return token


async def stored_value(store: Store, key: Any) -> Any:
    """The value of the one stored result of ``key``."""
    return await store.get(key, await stored_token(store, key))


async def cataloged_keys(store: Store) -> set[Any]:
    """Keys in the store's catalog manifest, as a scheduler starting now would load them.

    (Loading compacts a manifest of more than 16 segments: fine for the few a test writes.)
    """
    catalog = Catalog(store)
    await catalog.load()
    return set(catalog.entries)


async def leased_keys(store: Store) -> set[Any]:
    """Keys that the unexpired leases of live clusters protect in the store."""
    return await keys_leased_by_others(store, own_lease=None)


def record_run(directory: str, key: str) -> None:
    """Leave a file behind for every execution of a task, whatever process runs it."""
    Path(directory, f"{key}.{os.getpid()}.{os.urandom(4).hex()}").touch()


def runs(directory: str | Path) -> dict[str, int]:
    """How many times each recorded task ran."""
    out: dict[str, int] = {}
    for name in os.listdir(directory):
        key = name.split(".", 1)[0]
        out[key] = out.get(key, 0) + 1
    return out


def lane_keys(who_has: dict[Any, Any]) -> set[Any]:
    """Keys that a storage lane holds, from ``client.who_has()``."""
    return {k for k, holders in who_has.items() if any(h.startswith("storage://") for h in holders)}


def produce(i: int, directory: str, size: int = 100_000) -> Any:
    """A producer task that records its runs."""
    import numpy as np

    record_run(directory, f"produce-{i}")
    return np.full(size, i, dtype="f8")


def consume(x: Any, directory: str, i: int, delay: float = 0.0) -> float:
    """A consumer task that records its runs."""
    import time

    record_run(directory, f"consume-{i}")
    time.sleep(delay)
    return float(x.sum())


def preload_kwargs(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """``scheduler_kwargs`` of a cluster whose scheduler preloads storage on ``url``."""
    argv = ["--storage-url", url]
    for k, v in options.items():
        argv += ["--storage-option", f"{k}={v}"]
    return {"preload": ["storage_scheduler"], "preload_argv": argv}


@contextlib.asynccontextmanager
async def process_cluster(
    url: str, options: dict[str, Any] | None = None
) -> AsyncIterator[tuple[Any, Any]]:
    """Two worker processes (one thread each) and an asynchronous client; the scheduler
    preloads storage on ``url``. Yields ``(cluster, client)``."""
    from distributed import Client, LocalCluster

    async with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            asynchronous=True,
            dashboard_address=":0",
            scheduler_kwargs=preload_kwargs(url, options or {}),
        ) as cluster,
        Client(cluster, asynchronous=True) as c,
    ):
        yield cluster, c


@contextlib.asynccontextmanager
async def storage_cluster(
    url: str, n_workers: int = 2, **plugin_kwargs: Any
) -> AsyncIterator[tuple[Any, Any, StorageSchedulerPlugin]]:
    """An in-process scheduler, workers and client with storage on ``url``.

    Yields ``(client, scheduler, plugin)``. Closing it is a clean shutdown: the client
    releases its keys first, as a user's session ending would.
    """
    from distributed import Client, Scheduler, Worker

    async with Scheduler(dashboard_address=":0", validate=True) as s:
        plugin = await enable_storage(s, url, **plugin_kwargs)
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(n_workers):
                await stack.enter_async_context(Worker(s.address, nthreads=1, validate=True))
            async with Client(s.address, asynchronous=True) as c:
                yield c, s, plugin


@contextlib.contextmanager
def preloaded_cluster(url: str, processes: bool = False) -> Iterator[Client]:
    """A synchronous cluster of one worker (in-process unless ``processes``), started with
    the preload (``.compute()`` works)."""
    with (
        LocalCluster(
            n_workers=1,
            processes=processes,
            dashboard_address=":0",
            scheduler_kwargs=preload_kwargs(url, {}),
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client
