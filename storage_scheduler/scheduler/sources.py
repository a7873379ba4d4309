"""Versions of the data a graph reads, so that a stored result is not reused stale.

Dask names most readers' tasks after the version of what they read (``read_parquet``,
``read_csv`` and ``read_text`` put each file's modification time or ETag in their keys),
so new data means new keys. Not zarr: ``da.from_zarr`` and xarray's ``open_zarr`` name
their tasks after the array's location and metadata, and an array rewritten in place
(``to_zarr(region=...)``, a chunk replaced) keeps every key downstream of it. The token of
a task covers its spec and its dependencies' keys, not their data: without more, the next
cluster would reuse results computed from the old data.

So, when a graph is materialized (in distributed's offload thread, see
:func:`storage_scheduler._compat.watch_graphs`), every zarr array the graph holds is
fingerprinted by listing its files (names, sizes, modification times or ETags), and every
task downstream of it is annotated ``storage_sources`` with the fingerprints of the
arrays upstream of it. The annotation travels with the task to the worker and is part of
the token on both sides (:func:`~storage_scheduler._protocol.result_token`): a changed
array changes the token of everything computed from it, and those results are computed
again. Arrays whose files cannot be listed (a store of another kind) get a fingerprint
of their own at each submission: what is computed from them is stored, but never reused
by a later graph.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import sys
import uuid
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any

from dask._task_spec import DataNode, GraphNode, Task

__all__ = ["SOURCES_ANNOTATION", "annotate_sources", "fingerprint"]

logger = logging.getLogger(__name__)

#: The annotation that carries the fingerprints of the data a task is computed from.
SOURCES_ANNOTATION = "storage_sources"

#: Modules whose objects hold no zarr array: not searched.
_PLAIN_MODULES = frozenset({"builtins", "numpy", "pandas"})

#: Listing fields that change when a file is rewritten, by filesystem (first found wins).
_VERSION_FIELDS = ("ETag", "etag", "generation", "md5Hash", "mtime", "LastModified", "created")


def _zarr_array_type() -> type | None:
    zarr = sys.modules.get("zarr")  # a graph holding zarr arrays imported zarr to unpickle
    return getattr(zarr, "Array", None) if zarr is not None else None


def fingerprint(array: Any) -> str:
    """A string that changes whenever a file of the zarr ``array`` changes.

    Lists the array's files (one listing: ``os.scandir`` on a local directory, LIST
    requests on an object store). An array in a store whose files cannot be listed gets
    a random fingerprint: nothing computed from it is reused.
    """
    try:
        where, entries = _listing(array)
    except Exception as e:
        logger.info("Cannot list the files of %r (%s): results from it are not reused", array, e)
        return "unlisted-" + uuid.uuid4().hex
    digest = hashlib.sha256(where.encode())
    for name, info in sorted(entries.items()):
        version = next((info[f] for f in _VERSION_FIELDS if info.get(f) is not None), None)
        digest.update(
            repr((name[len(where) :], info.get("size"), info.get("ino"), version)).encode()
        )
    return digest.hexdigest()[:32]


def _listing(array: Any) -> tuple[str, dict[str, dict[str, Any]]]:
    """The array's location and its files' details, as fsspec's ``find`` gives them."""
    from fsspec.implementations.local import LocalFileSystem
    from zarr.core.sync import sync
    from zarr.storage import FsspecStore, LocalStore

    store, path = array.store, array.path
    if isinstance(store, LocalStore):
        where = f"{store.root}/{path}".rstrip("/")
        return where, _local_files(where)
    if isinstance(store, FsspecStore):
        where = f"{store.path}/{path}".rstrip("/")
        if isinstance(getattr(store.fs, "sync_fs", store.fs), LocalFileSystem):
            return where, _local_files(where)
        return where, sync(store.fs._find(where, detail=True))
    raise TypeError(f"a {type(store).__name__} cannot be listed")


def _local_files(root: str) -> dict[str, dict[str, Any]]:
    """Every file under ``root`` with its size, inode and modification time: ``scandir``
    and one ``stat`` a file (fsspec's ``find`` costs ten times as much)."""
    files: dict[str, dict[str, Any]] = {}
    pending = [root]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                else:
                    st = entry.stat()
                    files[entry.path] = {
                        "size": st.st_size,
                        "ino": st.st_ino,
                        "mtime": st.st_mtime_ns,
                    }
    return files


def _arrays_in(value: object, array_type: type) -> list[Any]:
    """The zarr arrays ``value`` holds, found by pickling it without copying its buffers
    (an xarray variable wraps its array in several adapters)."""
    if isinstance(value, array_type):
        return [value]
    if type(value).__module__.partition(".")[0] in _PLAIN_MODULES:
        return []
    found: list[Any] = []

    class Finder(pickle.Pickler):
        def reducer_override(self, obj: object) -> Any:
            if isinstance(obj, array_type):
                found.append(obj)
                return str, ()  # what it holds is not searched
            return NotImplemented

    try:
        Finder(io.BytesIO(), protocol=5, buffer_callback=lambda _: None).dump(value)
    except Exception:  # not picklable: it could not travel to a worker either
        return []
    return found


def _held_arrays(node: GraphNode, array_type: type) -> list[Any]:
    """Zarr arrays in a graph node: a data node's value, or a task's direct arguments
    (``inline_array=True``)."""
    if isinstance(node, DataNode):
        return _arrays_in(node.value, array_type)
    if isinstance(node, Task):
        values = list(node.args) + list(node.kwargs.values())
        return [
            a for v in values if isinstance(v, DataNode | array_type) for a in _held(v, array_type)
        ]
    return []


def _held(value: Any, array_type: type) -> list[Any]:
    return _arrays_in(value.value if isinstance(value, DataNode) else value, array_type)


def annotate_sources(
    dsk: Mapping[Any, Any],
    annotations: MutableMapping[str, Any],
    existing: Callable[[Any], Iterable[str] | None],
) -> int:
    """Annotate the tasks of a materialized graph with the fingerprints of the zarr
    arrays upstream of them; return how many were annotated.

    ``existing`` gives the fingerprints of a key outside the graph (a task the scheduler
    holds from an earlier graph), or None.
    """
    array_type = _zarr_array_type()
    seeds: dict[Any, frozenset[str]] = {}
    if array_type is not None:
        memo: dict[int, str] = {}
        for key, node in dsk.items():
            arrays = _held_arrays(node, array_type) if isinstance(node, GraphNode) else []
            if arrays:
                seeds[key] = frozenset(
                    memo[id(a)] if id(a) in memo else memo.setdefault(id(a), fingerprint(a))
                    for a in arrays
                )
    outside: dict[Any, frozenset[str]] = {}
    for node in dsk.values():
        for dep in getattr(node, "dependencies", ()):
            if dep not in dsk and dep not in outside:
                known = existing(dep)
                outside[dep] = frozenset(known or ())
    if not seeds and not any(outside.values()):
        return 0
    found = _propagate(dsk, seeds, outside)
    target = annotations.setdefault(SOURCES_ANNOTATION, {})
    interned: dict[frozenset[str], tuple[str, ...]] = {}
    annotated = 0
    for key in dsk:
        fps = found[key]
        if fps:
            target[key] = interned.setdefault(fps, tuple(sorted(fps)))
            annotated += 1
    return annotated


def _propagate(
    dsk: Mapping[Any, Any],
    seeds: Mapping[Any, frozenset[str]],
    outside: Mapping[Any, frozenset[str]],
) -> dict[Any, frozenset[str]]:
    """The fingerprints upstream of every key of ``dsk`` (iterative: graphs can be deeper
    than the recursion limit)."""
    empty: frozenset[str] = frozenset()
    done: dict[Any, frozenset[str]] = dict(outside)
    visiting: set[Any] = set()  # a cycle (which distributed rejects later) ends here
    for root in dsk:
        stack = [root]
        while stack:
            key = stack[-1]
            if key in done:
                stack.pop()
                continue
            deps = getattr(dsk[key], "dependencies", ())
            pending = [d for d in deps if d not in done and d in dsk and d not in visiting]
            if pending and key not in visiting:
                visiting.add(key)
                stack.extend(pending)
                continue
            stack.pop()
            visiting.discard(key)
            fps = seeds.get(key, empty)
            for d in deps:
                upstream = done.get(d, empty)
                if upstream and not upstream <= fps:
                    fps = fps | upstream
            done[key] = fps
    return done
