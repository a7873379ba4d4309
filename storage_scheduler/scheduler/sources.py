"""Versions of the data a graph reads, so that a stored result is not reused stale.

Dask names most readers' tasks after the version of what they read (``read_parquet``,
``read_csv`` and ``read_json`` put each file's modification time or ETag in their keys),
so new data means new keys. Not all: ``da.from_zarr`` and xarray's ``open_zarr`` name their
tasks after the array's location and metadata, so an array rewritten in place
(``to_zarr(region=...)``, a chunk replaced) keeps every key downstream of it; so does
``read_text`` of a file on an object store. The token of a task covers its spec and its
dependencies' keys, not their data: without more, the next cluster would reuse results
computed from the old data.

So, when a graph is materialized (in distributed's offload thread, see
:func:`storage_scheduler._compat.watch_graphs`), every *source* the graph holds (a zarr
array, an fsspec ``OpenFile``, an absolute path of a local file given as an argument:
``from_npy_stack``, ``from_map`` over paths) is fingerprinted by listing its files, or a
``stat`` of the path (names, sizes, modification times or ETags), and every task
downstream of it is annotated ``storage_sources`` with the fingerprints of the sources
upstream of it. The annotation travels with the task to the worker and is part of the
token on both sides (:func:`~storage_scheduler._protocol.result_token`): changed data
changes the token of everything computed from it, and those results are computed again.
Sources that cannot be listed (a store of another kind, one the scheduler cannot reach
within :data:`LISTING_TIMEOUT`) get a fingerprint of their own at each submission: what
is computed from them is stored, but never reused by a later graph.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import stat
import sys
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from functools import partial
from typing import Any

from fsspec import AbstractFileSystem
from fsspec.core import OpenFile
from fsspec.implementations.local import LocalFileSystem

from dask._task_spec import Alias, DataNode, Task, TaskRef

__all__ = ["SOURCES_ANNOTATION", "annotate_sources", "fingerprint"]

logger = logging.getLogger(__name__)

#: The annotation that carries the fingerprints of the data a task is computed from.
SOURCES_ANNOTATION = "storage_sources"

#: Modules whose objects hold no source: not searched.
_PLAIN_MODULES = frozenset({"builtins", "numpy", "pandas"})

#: Seconds that listing a graph's sources may take; sources not listed by then are taken
#: as new (nothing computed from them is reused), and the graph goes on.
LISTING_TIMEOUT = 30.0
#: Listings at a time.
LISTERS = 8

#: Listing fields that change when a file is rewritten, by filesystem (first found wins).
_VERSION_FIELDS = ("ETag", "etag", "generation", "md5Hash", "mtime", "LastModified", "created")


def _source_types() -> tuple[type, ...]:
    """Zarr arrays (if zarr is loaded: a graph holding one imported it to unpickle it) and
    fsspec's open files (``read_text``, ``read_bytes``, ``open_files``)."""
    zarr = sys.modules.get("zarr")
    array = getattr(zarr, "Array", None) if zarr is not None else None
    return (OpenFile,) if array is None else (OpenFile, array)


def fingerprint(source: Any) -> str:
    """A string that changes whenever the data of ``source`` changes: a zarr array (all
    of its files) or an fsspec ``OpenFile`` (its file).

    One listing: ``os.scandir`` on a local directory, LIST requests on an object store. A
    source that cannot be listed gets a random fingerprint: nothing computed from it is
    reused.
    """
    return fingerprints([source])[id(source)]


def fingerprints(sources: Iterable[Any]) -> dict[int, str]:
    """:func:`fingerprint` of each source, by ``id``: open files in one directory share
    one listing of it; listings run side by side, for at most :data:`LISTING_TIMEOUT`."""
    unique = {id(source): source for source in sources}
    jobs: dict[Any, Callable[[], Any]] = {}
    for source in unique.values():
        if isinstance(source, OpenFile):
            fs, parent = source.fs, source.fs._parent(source.path)
            jobs.setdefault((id(fs), parent), partial(_files_of, fs, parent, 1))
        else:
            jobs[id(source)] = partial(_array_files, source)
    listed = _run_all(jobs, LISTING_TIMEOUT)
    out: dict[int, str] = {}
    failed: list[tuple[Any, Exception]] = []
    for key, source in unique.items():
        try:
            if isinstance(source, OpenFile):
                found = listed[id(source.fs), source.fs._parent(source.path)]
                if isinstance(found, BaseException):
                    raise found
                where, entries = source.path, {source.path: found[source.path]}
            else:
                found = listed[key]
                if isinstance(found, BaseException):
                    raise found
                where, entries = found
        except Exception as e:
            failed.append((source, e))
            out[key] = "unlisted-" + uuid.uuid4().hex
        else:
            out[key] = _digest(where, entries)
    if failed:
        logger.warning(
            "Cannot tell the version of %d data sources of a new graph (%r: %r): results "
            "computed from them are stored but not reused",
            len(failed),
            *failed[0],
        )
    return out


def _run_all(jobs: Mapping[Any, Callable[[], Any]], timeout: float) -> dict[Any, Any]:
    """The result (or exception) of each job, run by up to :data:`LISTERS` daemon threads:
    a listing that hangs (a store the scheduler cannot reach) gets a ``TimeoutError``
    instead, and its thread never keeps the process from exiting."""
    if not jobs:
        return {}
    pending, results = list(jobs.items()), {}
    lock, finished = threading.Lock(), threading.Event()

    def work() -> None:
        while True:
            with lock:
                if not pending:
                    return
                key, job = pending.pop()
            try:
                result = job()
            except Exception as e:
                result = e
            with lock:
                results[key] = result
                if len(results) == len(jobs):
                    finished.set()

    for _ in range(min(LISTERS, len(jobs))):
        threading.Thread(target=work, name="storage-scheduler-sources", daemon=True).start()
    finished.wait(timeout)
    with lock:
        pending.clear()
        late = TimeoutError(f"no listing within {timeout:g} s")
        return {key: results.get(key, late) for key in jobs}


def _digest(where: str, entries: Mapping[str, Mapping[str, Any]]) -> str:
    digest = hashlib.sha256(where.encode())
    for name, info in sorted(entries.items()):
        version = next((info[f] for f in _VERSION_FIELDS if info.get(f) is not None), None)
        digest.update(
            repr((name[len(where) :], info.get("size"), info.get("ino"), version)).encode()
        )
    return digest.hexdigest()[:32]


def _array_files(array: Any) -> tuple[str, dict[str, dict[str, Any]]]:
    """The zarr array's location and its files' details."""
    from zarr.core.sync import sync
    from zarr.storage import FsspecStore, LocalStore

    store, path = array.store, array.path
    if isinstance(store, LocalStore):
        where = f"{store.root}/{path}".rstrip("/")
        return where, _local_files(where)
    if isinstance(store, FsspecStore):
        where = f"{store.path}/{path}".rstrip("/")
        fs = getattr(store.fs, "sync_fs", None)
        if fs is not None:  # a synchronous filesystem wrapped for zarr
            return where, _files_of(fs, where)
        return where, sync(store.fs._find(where, detail=True))
    raise TypeError(f"a {type(store).__name__} cannot be listed")


def _files_of(
    fs: AbstractFileSystem, where: str, maxdepth: int | None = None
) -> dict[str, dict[str, Any]]:
    """The files under ``where`` with their details, as fsspec's ``find`` gives them,
    never from a listings cache."""
    if isinstance(fs, LocalFileSystem):
        return _local_files(where, maxdepth)
    fs.invalidate_cache(where)
    found: dict[str, dict[str, Any]] = fs.find(where, maxdepth=maxdepth, detail=True)
    return found


def _local_files(root: str, maxdepth: int | None = None) -> dict[str, dict[str, Any]]:
    """Every file under ``root`` with its size, inode and modification time: ``scandir``
    and one ``stat`` a file (fsspec's ``find`` costs four times as much)."""
    files: dict[str, dict[str, Any]] = {}
    pending = [(root, 1)]
    while pending:
        directory, depth = pending.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    if maxdepth is None or depth < maxdepth:
                        pending.append((entry.path, depth + 1))
                    continue
                files[entry.path] = _stat_info(entry.stat())
    return files


def _stat_info(st: os.stat_result) -> dict[str, Any]:
    """What of a local file's ``stat`` changes when it is rewritten."""
    return {"size": st.st_size, "ino": st.st_ino, "mtime": st.st_mtime_ns}


def _sources_in(value: object, types: tuple[type, ...]) -> list[Any]:
    """The sources ``value`` holds, found by pickling it without copying its buffers (an
    xarray variable wraps its zarr array in several adapters)."""
    if isinstance(value, types):
        return [value]
    if type(value).__module__.partition(".")[0] in _PLAIN_MODULES:
        return []
    found: list[Any] = []

    class Finder(pickle.Pickler):
        def reducer_override(self, obj: object) -> Any:
            if isinstance(obj, types):
                found.append(obj)
                return str, ()  # what it holds is not searched
            return NotImplemented

    try:
        Finder(io.BytesIO(), protocol=5, buffer_callback=lambda _: None).dump(value)
    except Exception:  # not picklable: it could not travel to a worker either
        return []
    return found


#: Argument types that hold no source (most of every graph): skipped at once.
_LEAVES = frozenset({TaskRef, int, float, bool, bytes, type(None), slice, Alias})


def _path_version(path: str) -> str | None:
    """The fingerprint of the local file a task argument names (``from_map`` over paths,
    ``from_npy_stack``, a delayed function given a path), None if it names no regular
    file: directories change as outputs are written into them, and are not sources."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return _digest(path, {path: _stat_info(st)})


def _held_sources(node: Any, types: tuple[type, ...]) -> list[Any]:
    """Sources in a graph node: a data node's value, or a task's arguments, those of the
    tasks fused into it included (an open file, a zarr array with ``inline_array=True``,
    an absolute path: a string)."""
    found: list[Any] = []
    pending = [node]
    while pending:
        node = pending.pop()
        kind = type(node)
        if kind in _LEAVES:
            continue
        if kind is str:
            if node.startswith("/"):
                found.append(node)
        elif isinstance(node, Task):  # a nested container is one too
            pending += node.args
            if node.kwargs:
                pending += node.kwargs.values()
        elif kind is tuple or kind is list:
            pending += node
        elif kind is dict:  # a fused task's subgraph
            pending += node.values()
        elif kind is DataNode:
            if type(node.value) is str:
                pending.append(node.value)
            else:
                found += _sources_in(node.value, types)
        elif isinstance(node, types):
            found.append(node)
    return found


def annotate_sources(
    dsk: Mapping[Any, Any],
    annotations: MutableMapping[str, Any],
    existing: Callable[[Any], Iterable[str] | None],
) -> int:
    """Annotate the tasks of a materialized graph with the fingerprints of the sources
    upstream of them; return how many were annotated.

    ``existing`` gives the fingerprints of a task the scheduler already has (from an
    earlier graph), None for a key it does not have. Such a task keeps its own: it is not
    computed again for this graph, and its result (in memory, or to come) is from the data
    it was submitted with.
    """
    types = _source_types()
    held: dict[Any, list[Any]] = {}
    outside: dict[Any, frozenset[str]] = {}
    for key, node in dsk.items():  # one pass, ~1.5 us a task
        before = existing(key)
        if before is not None:
            outside[key] = frozenset(before)
            continue
        found = _held_sources(node, types)
        if found:
            held[key] = found
        for dep in node.dependencies:
            if dep not in dsk and dep not in outside:
                outside[dep] = frozenset(existing(dep) or ())
    sources = [s for found in held.values() for s in found]
    ids = fingerprints(s for s in sources if type(s) is not str)
    paths = {p: _path_version(p) for p in {s for s in sources if type(s) is str}}
    seeds: dict[Any, frozenset[str]] = {}
    for key, found in held.items():
        each = (paths[s] if type(s) is str else ids[id(s)] for s in found)
        versions = frozenset(v for v in each if v is not None)
        if versions:
            seeds[key] = versions
    if not seeds and not any(outside.values()):
        return 0
    upstream = _propagate(dsk, seeds, outside)
    target = annotations.setdefault(SOURCES_ANNOTATION, {})
    interned: dict[frozenset[str], tuple[str, ...]] = {}
    annotated = 0
    for key in dsk:
        fps = upstream[key]
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
