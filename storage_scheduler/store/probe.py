"""Startup probes: the store works, and every process sees the same store.

:func:`check` writes, reads back and deletes a small object: a store that is unreachable,
missing or read-only is refused at start with its URL and the cause. A worker's probe
proves only that *a* store works; :func:`publish_nonce` and :func:`read_nonce` prove it is
the scheduler's: the scheduler writes a random nonce, each worker must read it back. A
host that sees another directory under the same path (the default store is a per-host
cache directory) or another bucket would otherwise start silently, and could serve its own
old objects under the cluster's keys.
"""

from __future__ import annotations

import asyncio
import uuid

from storage_scheduler._exceptions import StoreError, StoreUnavailableError
from storage_scheduler.config import redact
from storage_scheduler.store._counters import StoreCounters
from storage_scheduler.store._errors import describe
from storage_scheduler.store._store import Store

__all__ = ["check", "forget_nonce", "publish_nonce", "read_nonce"]

PROBES = "probes"


async def check(store: Store) -> None:
    """Write, read back and delete a small object.

    Raises
    ------
    StoreUnavailableError
        If any step fails or the store does not answer within
        ``storage-scheduler.connect-timeout``; the message names the URL and the cause.
    """
    key = ("storage-scheduler-probe", uuid.uuid4().hex)
    counted = store.counters
    store.counters = StoreCounters()  # the probe is not traffic worth reporting

    async def probe() -> None:
        await store.put(key, b"probe")
        if await store.get(key) != b"probe":
            raise StoreError("the probe object read back differs from what was written")
        await store.delete([key])

    timeout = store.settings.connect_timeout
    try:
        await asyncio.wait_for(probe(), timeout)
    except asyncio.TimeoutError as e:
        raise StoreUnavailableError(
            f"store {store.url!r} did not answer within {timeout:g}s"
        ) from e
    except Exception as e:
        message = f"store {store.url!r} is not usable: {describe(e)}"
        raise StoreUnavailableError(redact(message, store.settings.url)) from e
    finally:
        store.counters = counted


async def publish_nonce(store: Store, name: str) -> str:
    """Write a new random nonce as ``probes/<name>``; return it."""
    nonce = uuid.uuid4().hex
    await store.write_file(f"{PROBES}/{name}", nonce.encode())
    return nonce


async def read_nonce(store: Store, name: str) -> str | None:
    """The nonce ``probes/<name>`` holds in this process's view of the store, or None."""
    try:
        return (await store.read_file(f"{PROBES}/{name}")).decode(errors="replace")
    except (FileNotFoundError, StoreError):
        return None


async def forget_nonce(store: Store, name: str) -> None:
    await store.delete_files([f"{PROBES}/{name}"])
