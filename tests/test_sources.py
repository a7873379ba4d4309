"""Results computed from a zarr array are not reused once the array has changed."""

from __future__ import annotations

import pickle
import time
import uuid
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest

import dask
import dask.array as da
from dask._task_spec import DataNode, Task, TaskRef, convert_legacy_graph

from storage_scheduler.scheduler import sources
from storage_scheduler.scheduler.sources import SOURCES_ANNOTATION, annotate_sources, fingerprint
from storage_scheduler.tokens import task_token
from tests.conftest import make_bucket, s3_options
from tests.faulty_fs import FaultyFileSystem
from tests.utils import preloaded_cluster

zarr = pytest.importorskip("zarr")
xr = pytest.importorskip("xarray")


def reused_total(client: Any) -> int:
    return int(client.cluster.scheduler.plugins["storage-scheduler"].reuse.reused_total)


def test_zarr_rewritten_in_place_is_computed_again(tmp_path: Path) -> None:
    """A region of the array rewritten between two clusters (keys unchanged) changes what
    is computed from it, whichever way it is read; an unchanged array is reused."""
    url, path, xpath = str(tmp_path / "store"), str(tmp_path / "z.zarr"), str(tmp_path / "x.zarr")
    z = zarr.open(path, mode="w", shape=(100,), chunks=(10,), dtype="i8")
    z[:] = 1
    data = xr.Dataset({"t": (("x", "y"), np.ones((100, 10)))}).chunk({"x": 10})
    data.to_zarr(xpath, mode="w", consolidated=False)

    def compute(client: Any) -> dict[str, int]:
        persisted = da.from_zarr(path).persist()
        return {
            "from_zarr": int(da.from_zarr(path).sum().compute()),
            "inline": int(da.from_zarr(path, inline_array=True).sum().compute()),
            "persisted, then a graph of its own": int((persisted * 2).sum().compute()),
            "xarray": int(xr.open_zarr(xpath, consolidated=False).t.sum().compute()),
        }

    first = {"from_zarr": 100, "inline": 100, "persisted, then a graph of its own": 200}
    for _ in range(2):
        with preloaded_cluster(url) as client:
            assert compute(client) == {**first, "xarray": 1000}
    assert reused_total(client) > 0  # the second cluster reused the unchanged array's

    z[0:10] = 3  # same keys, same shape, same metadata
    region = xr.Dataset({"t": (("x", "y"), np.full((10, 10), 5.0))})
    region.to_zarr(xpath, region={"x": slice(0, 10)}, consolidated=False)
    with preloaded_cluster(url) as client:
        assert compute(client) == {
            "from_zarr": 120,
            "inline": 120,
            "persisted, then a graph of its own": 240,
            "xarray": 1400,
        }


@pytest.mark.parametrize("where", ["local", "memory", pytest.param("s3", marks=pytest.mark.s3)])
def test_fingerprint_follows_the_files(where: str, tmp_path: Path, request: Any) -> None:
    """Same files, same fingerprint; one chunk rewritten with bytes of the same size, a
    new one."""
    options: dict[str, Any] = {}
    if where == "local":
        url = str(tmp_path / "z.zarr")
    elif where == "memory":
        url = f"memory://z-{uuid.uuid4().hex}.zarr"
    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        url, options = f"s3://{make_bucket(endpoint)}/z.zarr", s3_options(endpoint)
    kwargs = {"storage_options": options} if options else {}
    z = zarr.open(url, mode="w", shape=(40,), chunks=(10,), dtype="i8", **kwargs)
    z[:] = 1
    opened = zarr.open_array(url, **kwargs)
    before = fingerprint(opened)
    assert fingerprint(zarr.open_array(url, **kwargs)) == before
    z[10:20] = 2  # the same size compressed as before
    assert fingerprint(opened) != before


@pytest.mark.s3
def test_text_file_rewritten_on_an_object_store_is_read_again(
    tmp_path: Path, s3_endpoint: str
) -> None:
    """``read_text`` names its tasks after the file's path only on S3: rewritten, the
    file is read again by a new cluster; unchanged, what was computed from it is reused."""
    import dask.bag as db

    options = s3_options(s3_endpoint)
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
    path, url = f"{make_bucket(s3_endpoint)}/lines.txt", str(tmp_path / "store")

    def count(client: Any) -> int:
        # Two files: one partition each, its tasks fused into one, stored.
        lines = db.read_text(f"s3://{path}*", storage_options=options)
        return int(lines.map(count_c).sum().compute())

    fs.pipe(path, b"a\nbb\n")
    fs.pipe(path + ".2", b"x\n")
    for _ in range(2):
        with preloaded_cluster(url) as client:
            assert count(client) == 0
    assert reused_total(client) == 2
    fs.pipe(path, b"cc\nd\n")  # same size, other bytes
    with preloaded_cluster(url) as client:
        assert count(client) == 2 and reused_total(client) == 1
    fs.pipe(path, b"cccc\nd\n")
    with preloaded_cluster(url) as client:
        assert count(client) == 4


def test_files_named_by_arguments_are_sources(tmp_path: Path) -> None:
    """``from_npy_stack`` and a pure delayed function given a path name their tasks after
    the path: the file's version is part of the token; a directory is not a source."""
    url, stack, single = str(tmp_path / "store"), str(tmp_path / "stack"), tmp_path / "one.npy"
    load = dask.delayed(np.load, pure=True)

    def compute(client: Any) -> tuple[int, int]:
        return (
            int(da.from_npy_stack(stack).sum().compute()),
            int(load(str(single)).sum().compute()),
        )

    da.to_npy_stack(stack, da.ones(40, chunks=10, dtype="i8"))
    np.save(single, np.arange(4))
    for _ in range(2):
        with preloaded_cluster(url) as client:
            assert compute(client) == (40, 6)
    assert reused_total(client) > 0
    da.to_npy_stack(stack, da.ones(40, chunks=10, dtype="i8") * 2)
    np.save(single, np.arange(5))
    with preloaded_cluster(url) as client:
        assert compute(client) == (80, 10)
    assert sources._path_version(str(tmp_path)) is None
    assert sources._path_version(str(tmp_path / "missing")) is None


def count_c(line: str) -> int:
    return line.count("c")


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_fingerprint_of_an_open_file(where: str, tmp_path: Path, request: Any) -> None:
    if where == "local":
        fs, path = fsspec.filesystem("file"), str(tmp_path / "f.txt")
    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **s3_options(endpoint))
        path = f"{make_bucket(endpoint)}/f.txt"
    fs.pipe(path, b"one")
    fs.pipe(path + ".other", b"two")
    before = fingerprint(fsspec.core.OpenFile(fs, path))
    assert fingerprint(fsspec.core.OpenFile(fs, path)) == before
    fs.pipe(path + ".other", b"2")  # another file of the directory: no change
    assert fingerprint(fsspec.core.OpenFile(fs, path)) == before
    fs.pipe(path, b"eno")
    assert fingerprint(fsspec.core.OpenFile(fs, path)) != before


def test_a_listing_that_hangs_does_not_hold_the_graph(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A source the scheduler cannot reach (its store stalls) is taken as new after
    ``LISTING_TIMEOUT``; sources listed in time keep their fingerprints."""
    monkeypatch.setattr(sources, "LISTING_TIMEOUT", 0.5)
    (tmp_path / "f.txt").write_bytes(b"data")
    stalled = fsspec.core.OpenFile(FaultyFileSystem(latency=30), str(tmp_path / "f.txt"))
    fine = fsspec.core.OpenFile(fsspec.filesystem("file"), str(tmp_path / "f.txt"))
    start = time.monotonic()
    found = sources.fingerprints([stalled, fine])
    assert time.monotonic() - start < 5
    assert found[id(stalled)].startswith("unlisted-")
    assert found[id(fine)] == fingerprint(fine)


def test_a_zarr_array_has_one_token_wherever_it_is_unpickled(tmp_path: Path) -> None:
    """The token of a zarr array is its location and metadata: its pickled state differs
    between the client's, the scheduler's and a worker's copies."""
    path = str(tmp_path / "z.zarr")
    zarr.open(path, mode="w", shape=(40,), chunks=(10,), dtype="i8")[:] = 1
    array = da.from_zarr(path).dask[f"original-{da.from_zarr(path).name}"]
    copy = pickle.loads(pickle.dumps(array))
    assert task_token(DataNode("a", array)) == task_token(DataNode("a", copy))
    other = zarr.open(str(tmp_path / "other.zarr"), mode="w", shape=(40,), chunks=(10,), dtype="i8")
    assert task_token(DataNode("a", array)) != task_token(DataNode("a", other))


def test_lineage_reuses_what_is_computed_from_zarr(tmp_path: Path) -> None:
    """With ``lineage: true``, on clusters whose workers are processes (the tokens of
    the array's data node, recorded on one cluster, wanted on the next)."""
    url, path = str(tmp_path / "store"), str(tmp_path / "z.zarr")
    zarr.open(path, mode="w", shape=(40,), chunks=(10,), dtype="i8")[:] = 1
    reused = []
    with dask.config.set({"storage-scheduler.lineage": True}):
        for _ in range(2):
            with preloaded_cluster(url, processes=True) as client:
                assert int(da.from_zarr(path).sum().compute()) == 40
                reused.append(reused_total(client))
    assert reused[0] == 0 and reused[1] > 0


def test_arrays_that_cannot_be_listed_are_never_reused() -> None:
    array = zarr.create_array(zarr.storage.MemoryStore(), shape=(10,), dtype="i8")
    assert fingerprint(array) != fingerprint(array)


def graph_of(collection: Any) -> dict[Any, Any]:
    return convert_legacy_graph(dict(collection.__dask_graph__()))


def test_every_task_downstream_is_annotated(tmp_path: Path) -> None:
    path = str(tmp_path / "z.zarr")
    zarr.open(path, mode="w", shape=(40,), chunks=(10,), dtype="i8")[:] = 1
    source = da.from_zarr(path)
    unrelated = da.ones(40, chunks=10)
    result = (source + 1).sum() + unrelated.sum()
    dsk = graph_of(result)
    annotations: dict[str, Any] = {}
    assert annotate_sources(dsk, annotations, lambda key: None) > 0
    found = annotations[SOURCES_ANNOTATION]
    assert len(set(found.values())) == 1  # one array: one fingerprint, one shared tuple
    assert (result.name,) in found
    names = {key: key[0] if isinstance(key, tuple) else key for key in dsk}
    assert all(key in found for key, name in names.items() if name.startswith("add"))
    assert not any(names[key].startswith("ones") for key in found)


def test_keys_from_earlier_graphs_pass_their_sources_on() -> None:
    """A graph built on keys the scheduler holds (a persisted collection) is annotated
    with their sources; a graph with no zarr array in or under it, not at all."""

    def inc(x: int) -> int:
        return x + 1

    dsk = {"b": Task("b", inc, TaskRef("a")), "c": Task("c", inc, TaskRef("b"))}
    annotations: dict[str, Any] = {}
    held = {"a": ["f1"]}
    assert annotate_sources(dsk, annotations, held.get) == 2
    assert annotations[SOURCES_ANNOTATION] == {"b": ("f1",), "c": ("f1",)}
    annotations = {}
    assert annotate_sources(dsk, annotations, lambda key: None) == 0
    assert annotations == {}
    plain = {"a": DataNode("a", np.ones(3)), "b": Task("b", inc, TaskRef("a"))}
    assert annotate_sources(plain, annotations, lambda key: None) == 0


def test_a_task_the_scheduler_has_keeps_its_sources(tmp_path: Path) -> None:
    """A key submitted again while the scheduler holds it (persisted) is not computed
    again: what is computed from it in the new graph is from the data it was read with,
    even if its file changed since."""
    (tmp_path / "f.txt").write_bytes(b"new data")
    source = fsspec.core.OpenFile(fsspec.filesystem("file"), str(tmp_path / "f.txt"))
    dsk = {"read": Task("read", len, source), "b": Task("b", len, TaskRef("read"))}
    annotations: dict[str, Any] = {}
    assert annotate_sources(dsk, annotations, {"read": ("when-persisted",)}.get) == 2
    assert annotations[SOURCES_ANNOTATION]["b"] == ("when-persisted",)
    annotations = {}
    annotate_sources(dsk, annotations, lambda key: None)
    assert annotations[SOURCES_ANNOTATION]["b"] == (fingerprint(source),)


def test_a_cycle_ends() -> None:
    """Distributed rejects a cyclic graph later; annotating it must not hang first."""

    def inc(x: int) -> int:
        return x + 1

    dsk = {
        "a": Task("a", inc, TaskRef("b")),
        "b": Task("b", inc, TaskRef("a")),
        "c": Task("c", inc, TaskRef("x")),
    }
    annotations: dict[str, Any] = {}
    assert annotate_sources(dsk, annotations, {"x": ["f"]}.get) == 1
    assert annotations[SOURCES_ANNOTATION] == {"c": ("f",)}
