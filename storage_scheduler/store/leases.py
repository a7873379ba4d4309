"""Leases: what live clusters hold, so that no other cluster or tool deletes it.

A running scheduler publishes the keys its lanes hold in ``leases/<writer-id>``, with an
expiry it renews. Whoever deletes stored results (another cluster's lifecycle policy,
``dask storage gc``) first reads the live leases and spares the keys in them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import msgpack

from storage_scheduler.store._store import Store
from storage_scheduler.store.serialize import key_to_msgpack, msgpack_ext_hook

__all__ = ["LEASES", "keys_leased_by_others", "write_lease"]

LEASES = "leases"


async def write_lease(store: Store, name: str, keys: Iterable[Any], expires: float) -> None:
    lease = {"expires": expires, "keys": [key_to_msgpack(k) for k in keys]}
    await store.write_file(name, msgpack.packb(lease, use_bin_type=True))


async def keys_leased_by_others(store: Store, own_lease: str | None) -> set[Any]:
    """Keys in the unexpired leases of the store, except ``own_lease``."""
    names = [n for n in await store.list_files(LEASES) if n != own_lease]
    keys: set[Any] = set()
    now = time.time()
    for name in names:
        try:
            lease = msgpack.unpackb(
                await store.read_file(name), raw=False, use_list=False, ext_hook=msgpack_ext_hook
            )
        except Exception:
            continue  # vanished or damaged: it protects nothing
        if lease.get("expires", 0) > now:
            keys.update(lease["keys"])
    return keys
