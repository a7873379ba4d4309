"""The ``storage://`` comm backend: storage lanes that answer ``get_data`` from the store.

The scheduler names each store's lanes ``storage://<store-id>-lane<i>`` and records them as
holders of stored keys (replicas in ``TaskState.who_has``). Anything in distributed that
fetches data from a holder — ``Worker.gather_dep``, ``Scheduler.gather``,
``Client.gather(direct=True)``, ``Worker.gather`` for ``replicate`` — opens a comm to that
address and sends ``{"op": "get_data", "keys": ...}``. This backend answers in process, by
reading the store; nothing listens on a socket.

A process resolves lane addresses through :data:`registry`, in which the plugins of that
process register their store. A process with no store for an address (a client that was
never told about the store) gets a fatal connection error at once, and distributed falls
back to asking the scheduler.

Keys whose object is missing or damaged (deleted behind our back, corrupted) are left out
of the answer, as a worker that lost a key would, and reported to the listeners
registered with the store, so that the scheduler drops the lane replica instead of
sending readers back to it forever. A store that does not answer is another matter: after
the store's short retries, the lane answers ``busy``, as a worker with too many transfers
would. The reader then fetches from another holder if there is one, or asks this lane
again later (so it waits out the outage); nothing is reported lost.

Loaded through the ``distributed.comm.backends`` entry point of this package.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from dask.sizeof import sizeof
from distributed.comm.core import Comm, CommClosedError, Connector, FatalCommClosedError
from distributed.comm.registry import Backend
from distributed.core import error_message
from distributed.metrics import context_meter
from distributed.protocol.serialize import Serialized

from storage_scheduler import _compat
from storage_scheduler._protocol import SCHEME, store_id_of
from storage_scheduler.store import Store, classify, is_outage

__all__ = ["StorageBackend", "StoreRegistry", "registry"]

logger = logging.getLogger(__name__)

#: Called with the keys a lane could not serve.
UnreadableListener = Callable[[list[Any]], None]
#: The tokens of the results the cluster holds in its lanes, for some keys: what a read
#: from a lane must find in the object (another token is another cluster's result).
TokenLookup = Callable[[list[Any]], Awaitable[dict[Any, str]]]


@dataclass
class _Entry:
    store: Store
    listener: UnreadableListener | None
    tokens: TokenLookup | None = None


@dataclass
class StoreRegistry:
    """The stores that ``storage://`` addresses resolve to in this process.

    Each plugin (scheduler or worker) registers the store it opened, with a listener for
    unreadable keys, and unregisters it when it closes. Several plugins of one process
    (an in-process cluster) may register the same store id: reads use the first store
    still registered, and every listener hears of unreadable keys.
    """

    _entries: dict[str, list[_Entry]] = field(default_factory=dict)
    #: Bytes (in memory, as dask sizes them) that lanes served, by requester address.
    bytes_served: Counter[str] = field(default_factory=Counter)

    def register(
        self,
        store_id: str,
        store: Store,
        listener: UnreadableListener | None,
        tokens: TokenLookup | None = None,
    ) -> None:
        self._entries.setdefault(store_id, []).append(_Entry(store, listener, tokens))

    def unregister(self, store_id: str, store: Store) -> None:
        entries = [e for e in self._entries.get(store_id, []) if e.store is not store]
        if entries:
            self._entries[store_id] = entries
        else:
            self._entries.pop(store_id, None)

    def store(self, store_id: str) -> Store | None:
        entries = self._entries.get(store_id)
        return entries[0].store if entries else None

    async def tokens(self, store_id: str, keys: list[Any]) -> dict[Any, str]:
        """The tokens the registered plugins know for ``keys`` (the first to know wins)."""
        found: dict[Any, str] = {}
        for entry in list(self._entries.get(store_id, [])):
            missing = [k for k in keys if k not in found]
            if not missing:
                break
            if entry.tokens is not None:
                try:
                    found.update(await entry.tokens(missing))
                except Exception as e:  # the scheduler is gone, say: read unchecked
                    logger.debug("Cannot look up the tokens of %d keys: %s", len(missing), e)
        return found

    def report_unreadable(self, store_id: str, keys: list[Any]) -> None:
        for entry in list(self._entries.get(store_id, [])):
            if entry.listener is not None:
                try:
                    entry.listener(keys)
                except Exception:
                    logger.exception("Reporting unreadable keys failed")


#: The registry of this process. Process-wide by necessity, like distributed's own
#: ``inproc`` transport: a ``Connector`` is given an address and nothing else, so it cannot
#: reach the server (scheduler, worker or client) on whose behalf it connects.
registry = StoreRegistry()


class StorageComm(Comm):
    """An in-process connection to a storage lane.

    It speaks just enough of the worker protocol for ``get_data``: the handshake, then
    any number of ``get_data`` requests, each answered by one ``read()``.
    """

    def __init__(self, address: str, store: Store, deserialize: bool = True):
        super().__init__(deserialize=deserialize)
        self._address = address
        self._store_id = store_id_of(address)
        self._store = store
        _compat.set_comm_addresses(self, peer=address, local=f"{SCHEME}://local")
        self._closed = False
        self._handshake_done = False
        self._reply: asyncio.Future[Any] | None = None

    async def write(self, msg: Any, serializers: Any = None, on_error: Any = None) -> int:
        if self._closed:
            raise CommClosedError(f"storage comm to {self._address} is closed")
        loop = asyncio.get_running_loop()
        if not self._handshake_done:  # connect() always sends its handshake first
            self._handshake_done = True
            self._reply = loop.create_future()
            self._reply.set_result(self.handshake_info())
        elif isinstance(msg, dict) and msg.get("op") == "get_data":
            self._reply = asyncio.ensure_future(self._get_data(list(msg["keys"]), msg.get("who")))
        elif isinstance(msg, dict) and msg.get("reply", True):
            self._reply = loop.create_future()
            self._reply.set_result(
                error_message(ValueError(f"a storage lane cannot answer {msg.get('op')!r}"))
            )
        # Anything else ("OK" after get_data, fire-and-forget ops) needs no answer.
        return 0

    async def _get_data(self, keys: list[Any], who: str | None) -> dict[str, Any]:
        read = self._store.get if self.deserialize else self._store.get_serialized
        # Shows in Dask's fine performance metrics as gather-dep / store-read.
        with context_meter.meter("store-read", "seconds"):
            tokens = await registry.tokens(self._store_id, keys)
            # Not patient: while the store is down, the requester had better try a peer
            # that holds the key (busy, below) than wait out the outage here.
            results = await asyncio.gather(
                *(read(key, tokens.get(key), patient=False) for key in keys),
                return_exceptions=True,
            )
        data: dict[Any, Any] = {}
        unreadable: list[Any] = []
        unavailable: list[BaseException] = []
        for key, result in zip(keys, results, strict=True):
            if not isinstance(result, BaseException):
                data[key] = result
            elif classify(result) == "unavailable":
                # Not a lost result: the store (or our access to it) is down. The store
                # has already warned, once per outage.
                logger.debug("Cannot read the stored result of %r now: %s", key, result)
                unavailable.append(result)
            else:
                unreadable.append(key)
                logger.warning(
                    "Cannot read the stored result of %r (%s): %s", key, classify(result), result
                )
        nbytes = sum(
            sum(map(len, v.frames)) if isinstance(v, Serialized) else sizeof(v)
            for v in data.values()
        )
        context_meter.digest_metric("store-read", len(data), "count")
        context_meter.digest_metric("store-read", nbytes, "bytes")
        if who is not None:
            # Attributed to the requester: in an in-process cluster, every worker's
            # reads go through the first store registered in the process.
            registry.bytes_served[who] += nbytes
        if unreadable:
            registry.report_unreadable(self._store_id, unreadable)
        if unavailable and not data:
            if not all(map(is_outage, unavailable)):
                # Refused (permissions, say) rather than waited out: pace the requester,
                # which asks a busy holder again after 0.15s.
                await asyncio.sleep(self._store.settings.retry.delay_max)
            # Busy: try another holder now, this lane later (Worker.gather_dep, and
            # gather_from_workers for Client.gather and Scheduler.gather).
            return {"status": "busy"}
        # Keys left out without a report: the reader asks the scheduler who holds them,
        # which still names this lane (as when a worker's answer omits a key).
        return {"status": "OK", "data": data}

    async def read(self, deserializers: Any = None) -> Any:
        if self._closed or self._reply is None:
            raise CommClosedError(f"storage comm to {self._address}: nothing to read")
        reply, self._reply = self._reply, None
        return await reply

    async def close(self) -> None:
        self.abort()

    def abort(self) -> None:
        self._closed = True
        # A read waiting out a store outage must not outlive its requester.
        if self._reply is not None and not self._reply.done():
            self._reply.cancel()

    def closed(self) -> bool:
        return self._closed

    @property
    def local_address(self) -> str:
        return f"{SCHEME}://local"

    @property
    def peer_address(self) -> str:
        return self._address


class StorageConnector(Connector):
    async def connect(self, address: str, deserialize: bool = True, **kwargs: Any) -> Comm:
        full = f"{SCHEME}://{address}"
        store = registry.store(store_id_of(full))
        if store is None:
            # Fatal: distributed would otherwise retry for the whole connect timeout.
            raise FatalCommClosedError(f"no store is open in this process for {full}")
        return StorageComm(full, store, deserialize=deserialize)


class StorageBackend(Backend):
    """The ``storage://`` scheme: connect only; lanes never listen."""

    def get_connector(self) -> Connector:
        return StorageConnector()

    def get_listener(self, loc: str, handle_comm: Any, deserialize: bool, **kwargs: Any) -> Any:
        raise NotImplementedError("storage:// addresses cannot listen")

    def get_address_host(self, loc: str) -> str:
        return SCHEME

    def resolve_address(self, loc: str) -> str:
        return loc

    def get_local_address_for(self, loc: str) -> str:
        return "local"
