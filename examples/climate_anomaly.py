"""Warming trends from gridded temperatures with xarray and zarr: killed halfway, resumed.

The workflow is the kind that runs clusters out of memory (a rechunk in the middle):

1. monthly surface temperatures on a lat/lon grid, stored in zarr in *time* chunks (one
   year of the whole grid per chunk), the way model output and reanalyses are written;
2. the anomaly: each month minus its climatology (the mean of that calendar month over
   all years);
3. a rechunk from time chunks to *space* chunks (the whole series of a patch of pixels);
4. a per-pixel reduction: the linear trend of the anomaly, in degrees per decade,
   persisted on the cluster.

With storage_scheduler every result goes to a store. The example runs the workflow on a
cluster, kills that whole cluster (scheduler and workers, SIGKILL) once about half of the
tasks have finished, then starts a **new** cluster on the same store and runs the same
code again: only the tasks whose results the store does not hold run, and the result is
the one a fresh computation gives.

    python examples/climate_anomaly.py --size small      # about half a minute on 2 cores

``--workdir DIR`` keeps the input, the store and the output there (default: a temporary
directory, removed at the end), ``--report FILE`` writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

import dask
import dask.core
from dask.utils import format_bytes
from distributed import Client, LocalCluster, wait
from distributed.diagnostics.plugin import SchedulerPlugin

#: years of monthly data, grid points (lat, lon), pixels per chunk after the rechunk
SIZES = {
    "small": (10, 36, 72, 12, 24),
    "medium": (40, 90, 180, 30, 45),
    "large": (60, 180, 360, 45, 90),
}
COUNTER = "example-execution-counter"


# --------------------------------------------------------------------------- the workflow


def write_input(path: Path, size: str) -> None:
    """Synthetic monthly temperatures (°C): latitude, seasons, a warming trend that is
    stronger over some longitudes, and weather noise; zarr chunks of one year."""
    years, nlat, nlon, _, _ = SIZES[size]
    time = pd.date_range("1991-01-01", periods=12 * years, freq="MS")
    lat = np.linspace(-87.5, 87.5, nlat)
    lon = np.linspace(0.0, 360.0, nlon, endpoint=False)
    rng = np.random.default_rng(0)
    months = np.arange(len(time))
    base = 28 * np.cos(np.deg2rad(lat))[None, :, None] - 5
    seasons = 10 * np.sin(2 * np.pi * (months % 12 - 3) / 12)[:, None, None]
    seasons = seasons * np.sin(np.deg2rad(lat))[None, :, None]
    warming = (0.02 * months / 12)[:, None, None] * (1.5 + np.cos(np.deg2rad(lon)))[None, None, :]
    noise = rng.normal(0.0, 1.5, (len(time), nlat, nlon))
    tas = (base + seasons + warming + noise).astype("float32")
    ds = xr.Dataset(
        {"tas": (("time", "lat", "lon"), tas, {"units": "degC"})},
        coords={"time": time, "lat": lat, "lon": lon},
    )
    ds.to_zarr(path, mode="w", consolidated=False, encoding={"tas": {"chunks": (12, nlat, nlon)}})


def slope_per_decade(y: np.ndarray) -> np.ndarray:
    """Least-squares slope along the last axis (monthly steps), per decade."""
    t = np.arange(y.shape[-1], dtype="float64")
    t -= t.mean()
    return 120 * ((y - y.mean(axis=-1, keepdims=True)) * t).sum(axis=-1) / (t * t).sum()


def workflow(input_path: Path, size: str) -> xr.DataArray:
    """Anomaly → rechunk (time chunks to space chunks) → per-pixel trend; lazily."""
    _, _, _, lat_chunk, lon_chunk = SIZES[size]
    tas = xr.open_zarr(input_path, consolidated=False).tas
    climatology = tas.groupby("time.month").mean()
    anomaly = tas.groupby("time.month") - climatology
    # Dask picks P2P rechunking for large arrays when a distributed client is active: fix
    # the method so that every run builds the same graph (P2P works with storage too).
    with dask.config.set({"array.rechunk.method": "tasks"}):
        by_pixel = anomaly.chunk({"time": -1, "lat": lat_chunk, "lon": lon_chunk})
    trend = xr.apply_ufunc(
        slope_per_decade,
        by_pixel,
        input_core_dims=[["time"]],
        dask="parallelized",
        output_dtypes=["float64"],
    )
    (trend,) = dask.optimize(trend.rename("warming"))  # the graph the scheduler runs
    return trend


# ------------------------------------------------------------------- counting executions


class ExecutionCounter(SchedulerPlugin):
    """Counts the tasks that finished, per key; on the scheduler, apart from
    storage_scheduler. Loader tasks (a stored result read back for the client) are
    counted apart: they read, they do not compute."""

    name = COUNTER

    def __init__(self) -> None:
        self.finished: Counter[str] = Counter()
        self.loaded = 0
        self.scheduler: Any = None

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if start == "processing" and finish == "memory":
            ts = self.scheduler.tasks.get(key)
            func = getattr(getattr(ts, "run_spec", None), "func", None)
            if getattr(func, "__name__", "") == "load_stored":
                self.loaded += 1
            else:
                self.finished[str(key)] += 1


def counts(dask_scheduler: Any) -> tuple[dict[str, int], int]:
    plugin = dask_scheduler.plugins[COUNTER]
    return dict(plugin.finished), plugin.loaded


def start_cluster(store: Path) -> tuple[LocalCluster, Client]:
    cluster = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        dashboard_address=":0",
        scheduler_kwargs={
            "preload": ["storage_scheduler"],
            "preload_argv": ["--storage-url", f"file://{store}"],
        },
    )
    client = Client(cluster)
    client.register_plugin(ExecutionCounter())
    return cluster, client


# ------------------------------------------------------------------------------ the runs


def doomed_run(workdir: Path, size: str) -> None:
    """Run 1, in a process of its own: compute and report progress until killed."""
    trend = workflow(workdir / "input.zarr", size)
    cluster, client = start_cluster(workdir / "store")
    with cluster, client:
        # Kept referenced until the process is killed: released futures are forgotten.
        trend = client.persist(trend, optimize_graph=False)
        while True:
            finished, _ = client.run_on_scheduler(counts)
            print(f"finished {len(finished)}", flush=True)
            time.sleep(0.05)


def covered_by_store(graph: dict[Any, Any], wanted: list[Any], stored: set[Any]) -> set[Any]:
    """Keys that need not run again: walking down from the wanted keys, the walk stops at
    a stored result; what it never reaches is covered."""
    needed: set[Any] = set()
    stack = [k for k in wanted if k not in stored]
    while stack:
        key = stack.pop()
        if key in needed:
            continue
        needed.add(key)
        stack.extend(d for d in graph[key].dependencies if d not in stored and d not in needed)
    return set(graph) - needed


def stored_keys(store: Path) -> set[Any]:
    from storage_scheduler import Store
    from storage_scheduler.store.catalog import Catalog

    async def read() -> set[Any]:
        s = Store.from_url(f"file://{store}")
        try:
            catalog = Catalog(s)
            await catalog.load(compact=False)
            return set(catalog.entries)
        finally:
            s.close()

    return asyncio.run(read())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--workdir", type=Path, help="keep input, store and output here")
    parser.add_argument("--report", type=Path, help="write the figures here as JSON")
    parser.add_argument("--doomed-run", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.doomed_run:
        doomed_run(args.workdir, args.size)
        return 1
    with tempfile.TemporaryDirectory(prefix="climate-") as tmp:
        return run(args.workdir or Path(tmp), args.size, args.report)


def run(workdir: Path, size: str, report: Path | None) -> int:
    workdir.mkdir(parents=True, exist_ok=True)
    store = workdir / "store"
    years, nlat, nlon, _, _ = SIZES[size]
    write_input(workdir / "input.zarr", size)
    trend = workflow(workdir / "input.zarr", size)
    graph = dict(trend.__dask_graph__())
    wanted = list(dask.core.flatten(trend.__dask_keys__()))
    print(f"input  : {workdir / 'input.zarr'}, {years} years x {nlat} x {nlon} monthly, zarr")
    print(f"         chunks of one year; rechunked to {SIZES[size][3]} x {SIZES[size][4]} pixels")
    print(f"store  : {store}")
    print(f"graph  : {len(graph)} tasks, {len(wanted)} results persisted")

    # Run 1: a cluster of its own process group, killed when half of the tasks finished.
    t0 = time.perf_counter()
    with open(workdir / "run1.log", "w") as log:
        child = subprocess.Popen(
            [sys.executable, __file__, "--doomed-run", "--size", size, "--workdir", str(workdir)],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            start_new_session=True,  # its own process group: the cluster's processes too
        )
        assert child.stdout is not None
        done = 0
        for line in child.stdout:
            done = int(line.split()[1])
            if done >= len(graph) // 2:
                break
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    if done < len(graph) // 2:
        print(f"run 1 stopped by itself (exit {child.returncode}) after {done} tasks")
        return 1
    stored = stored_keys(store) & set(graph)
    covered = covered_by_store(graph, wanted, stored)
    print(
        f"\nrun 1  : cluster killed (SIGKILL) after {done} of {len(graph)} tasks "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    print(f"         in the store: {len(stored)} results, covering {len(covered)} tasks")

    # Run 2: a new cluster, the same code, the same store.
    t0 = time.perf_counter()
    cluster, client = start_cluster(store)
    with cluster, client:
        trend = workflow(workdir / "input.zarr", size)
        trend = client.persist(trend, optimize_graph=False)
        wait(trend)
        finished, loaded = client.run_on_scheduler(counts)
        result = trend.compute()  # gathers what the cluster holds
        status = client.sync(client.scheduler.storage_status)
    resumed = time.perf_counter() - t0
    executed = sum(finished.values())
    print(f"\nrun 2  : a new cluster on the same store ({resumed:.1f} s)")
    print(
        f"         executed {executed} tasks; {len(graph)} - {len(covered)} covered = "
        f"{len(graph) - len(covered)} expected"
    )
    print(f"         reused {status['reused_total']} stored results ({loaded} read back)")
    print(
        f"         in the store now: {status['catalog_keys']} results, "
        f"{format_bytes(status['catalog_bytes'])}"
    )

    with dask.config.set(scheduler="threads"):
        fresh = workflow(workdir / "input.zarr", size).compute()
    identical = bool(np.array_equal(result.values, fresh.values))
    result.to_dataset().to_zarr(workdir / "warming.zarr", mode="w", consolidated=False)
    print(
        f"\nresult : {workdir / 'warming.zarr'}: warming {float(result.mean()):.3f} °C/decade "
        f"on average; identical to a fresh computation: {'yes' if identical else 'NO'}"
    )

    figures = {
        "tasks": len(graph),
        "finished_before_kill": done,
        "stored_before_resume": len(stored),
        "covered": sorted(map(str, covered)),
        "executed_on_resume": finished,
        "loaded_on_resume": loaded,
        "reused_on_resume": status["reused_total"],
        "identical": identical,
    }
    if report is not None:
        report.write_text(json.dumps(figures))
    ok = identical and 0 < executed == len(graph) - len(covered)
    ok = ok and not set(finished) & set(map(str, covered))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
