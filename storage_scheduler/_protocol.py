"""What the scheduler side, the worker side and the tools say to each other.

Every message or record that crosses a process or module boundary is typed here, the way
``distributed/shuffle/_core.py`` holds what the shuffle's plugins share:

* the task-finished metadata a worker attaches when it stored a result
  (:class:`StoredResult`), read by the scheduler plugin's ``transition`` hook;
* the figures a worker sends with every heartbeat (:class:`Heartbeat`);
* what the scheduler reports of its store (:class:`StorageInfo`, :class:`StorageStatus`),
  read by ``enable``, ``dask storage status``, the dashboard page and the metrics;
* lane addressing: ``storage://<store-id>-lane<i>``;
* the token a stored result must carry to be reused, computed by one function
  (:func:`result_token`) on both sides, so that they can never disagree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, TypedDict

from storage_scheduler.tokens import task_token

__all__ = [
    "HEARTBEAT_KEY",
    "METADATA_KEY",
    "PLUGIN_NAME",
    "SCHEME",
    "Heartbeat",
    "StorageInfo",
    "StorageStatus",
    "StoredResult",
    "WorkerStatus",
    "empty_heartbeat",
    "is_lane",
    "lane_addresses",
    "result_token",
    "store_id_for",
    "store_id_of",
]

#: Name of both plugins (``scheduler.plugins[...]``, ``worker.plugins[...]``) and of the
#: worker extension that carries a worker's own store settings.
PLUGIN_NAME = "storage-scheduler"
#: Key of the task-finished metadata (``TaskState.metadata``) that says a result was stored.
METADATA_KEY = "storage-scheduler"
#: Key of the worker's figures in its heartbeats (scheduler ``WorkerState.metrics``).
HEARTBEAT_KEY = "storage"
#: Comm scheme of the storage lanes.
SCHEME = "storage"


class StoredResult(TypedDict, total=False):
    """Task-finished metadata of a result the store holds.

    ``nbytes``, ``token`` and ``created`` (the write's time, in the object's header: it
    tells this write apart from any other of the same object) when the worker wrote it;
    ``loaded`` alone when the task read it back from the store (it is there already).
    """

    nbytes: int
    token: str
    created: float
    loaded: bool


class Heartbeat(TypedDict):
    """One worker's store traffic since it started, sent with each heartbeat."""

    bytes_written: int
    objects_written: int
    bytes_read: int
    writes_in_flight: int
    write_failures: int
    not_stored: int
    #: Objects refused because they were not signed with the signing key.
    untrusted_objects: int
    #: Results not stored, by reason: ``annotation`` (``storage=False``),
    #: ``not-annotated`` (``results: annotated``), ``recomputable`` (``policy:
    #: worth-storing``: cheaper to recompute from stored inputs), ``side-effect`` (a
    #: writer, or a result of None), ``write-failed``, ``store-down``.
    not_stored_by_reason: dict[str, int]
    #: Bytes (in memory) of stored results dropped from RAM without a write, in total.
    evicted_bytes: int
    #: Stored results dropped from RAM, in total.
    evicted: int
    #: Bytes (in memory) of the results dropped now: held by the store only.
    dropped_bytes: int
    #: Dropped results read back from the store; those it could not serve.
    read_back: int
    lost: int
    #: Bytes spilled to local disk now (pickled), and written to it in total.
    spilled_bytes: int
    spill_written_bytes: int


def empty_heartbeat() -> Heartbeat:
    """The figures of a worker that has not reported any yet."""
    return Heartbeat(
        bytes_written=0,
        objects_written=0,
        bytes_read=0,
        writes_in_flight=0,
        write_failures=0,
        not_stored=0,
        untrusted_objects=0,
        not_stored_by_reason={},
        evicted_bytes=0,
        evicted=0,
        dropped_bytes=0,
        read_back=0,
        lost=0,
        spilled_bytes=0,
        spill_written_bytes=0,
    )


class WorkerStatus(Heartbeat):
    """One worker's RAM and store traffic, as the scheduler sees it."""

    address: str
    name: str
    #: Managed memory: results held in RAM.
    results_ram: int
    #: The rest of the process: running tasks and overhead.
    tasks_ram: int
    memory_limit: int


class StorageInfo(TypedDict):
    """What the scheduler holds in its store (RPC ``storage_info``)."""

    url: str
    store_id: str
    lanes: list[str]
    keys_in_lanes: int
    bytes_in_lanes: int
    stored_total: int
    unreadable_total: int
    reused_total: int
    deleted_total: int
    catalog_keys: int
    catalog_bytes: int
    stored_bytes_total: int
    writing: bool
    results: str
    prefer: str


class StorageStatus(StorageInfo):
    """:class:`StorageInfo` with every worker and the throughput history (RPC ``storage_status``)."""

    workers: list[WorkerStatus]
    #: (time, bytes stored so far, bytes read by workers so far), one sample a second.
    history: list[tuple[float, int, int]]


# ---------------------------------------------------------------------- lanes


def store_id_for(url: str, cluster: str = "") -> str:
    """A short identifier of a store as one cluster uses it, for its lane addresses.

    ``cluster`` tells apart clusters that share a store: lane reads look up, in the
    process they run in, the tokens of the results *their* cluster holds. Two in-process
    clusters on one store (two ``LocalCluster(processes=False)`` on the default store, say)
    would otherwise read each other's versions of a key.

    Examples
    --------
    >>> store_id_for("s3://bucket/prefix")
    'b8f008cf'
    >>> store_id_for("s3://bucket/prefix", "cluster-2") != store_id_for("s3://bucket/prefix")
    True
    """
    salt = f"\0{cluster}" if cluster else ""
    return hashlib.blake2b((url + salt).encode(), digest_size=4).hexdigest()


def lane_addresses(store_id: str, n: int) -> list[str]:
    """The addresses of a store's ``n`` lanes.

    Examples
    --------
    >>> lane_addresses("b8f008cf", 2)
    ['storage://b8f008cf-lane0', 'storage://b8f008cf-lane1']
    """
    return [f"{SCHEME}://{store_id}-lane{i}" for i in range(n)]


def is_lane(address: str) -> bool:
    """Whether an address is a storage lane rather than a worker."""
    return address.startswith(f"{SCHEME}://")


def store_id_of(address: str) -> str:
    """The store id in a lane address (with or without the scheme).

    Examples
    --------
    >>> store_id_of("storage://b8f008cf-lane3")
    'b8f008cf'
    """
    return address.split("://", 1)[-1].rsplit("-lane", 1)[0]


# ---------------------------------------------------------------------- tokens


def result_token(spec: Any, version: str | None, annotations: Mapping[str, Any] | None) -> str:
    """The token recorded with a stored result, and required to reuse it.

    Workers call it when they store a result, the scheduler when it decides whether a
    stored result can stand in for a task: both with the task's spec, the cluster's
    ``storage-scheduler.version`` and the task's annotations (``storage_version``, and
    ``storage_sources``: the versions of the zarr arrays it is computed from, see
    :mod:`storage_scheduler.scheduler.sources`).
    """
    annotations = annotations or {}
    salt: tuple[Any, ...] = (version, annotations.get("storage_version"))
    sources = annotations.get("storage_sources")
    if sources:  # absent, the salt is what it always was: stored results stay valid
        salt = (*salt, tuple(sources))
    return task_token(spec, salt)
