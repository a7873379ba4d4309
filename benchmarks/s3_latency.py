"""The ``s3-latency`` workload: the store on S3 at a real object store's latency.

The moto server answers in well under a millisecond on loopback; real object stores in
10 to 100 ms. Here every S3 request goes through :class:`tests.latency_proxy.LatencyProxy`,
which holds each response back ``delay`` seconds and counts requests by method. For each
delay (20 and 50 ms), on one cluster per mode (2 workers x 1 thread):

* ``tree``: a pairwise tree reduction of ~2,000 tasks of ~1 ms with 1 KiB results; wall
  time, and S3 requests per task by method (PUT, GET, HEAD, POST, DELETE, LIST), which
  include the scheduler's own (catalog, lease);
* ``chain``: 50 dependent tasks of ~1 ms, one after the other: the latency on the
  critical path;
* ``transfer``: 16 arrays of 16 MiB made on worker A and reduced on worker B; wall time
  and throughput;
* ``s3fs``: the reference for ``transfer``: plain s3fs writes the same bytes through the
  same proxy, then reads them back, with the same concurrency as the store
  (``storage-scheduler.max-concurrency`` requests in flight); its throughput.

Stock Dask never touches S3: its figures are the peer-to-peer ones at any delay.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import fsspec
import numpy as np
import psutil

import dask.config
from dask import delayed
from distributed import Client

from benchmarks.common import bench_cluster, cluster_figures
from benchmarks.suite import combine, executed, leaf, transfer, tree
from tests.latency_proxy import LatencyProxy

__all__ = ["s3_latency"]


def _tree(client: Client, leaves: int, seconds: float) -> tuple[bool, float, int]:
    token = uuid.uuid4().hex
    graph = tree([delayed(leaf)(i, seconds, token) for i in range(leaves)], combine, seconds)
    expected = np.bitwise_xor.reduce(
        [np.frombuffer(np.random.default_rng(i).bytes(1024), np.uint8) for i in range(leaves)]
    )
    before = executed(client)
    start = time.perf_counter()
    got = client.compute(graph).result()
    wall = time.perf_counter() - start
    return got == expected.tobytes(), wall, executed(client) - before


def _chain(client: Client, length: int, seconds: float) -> tuple[bool, float]:
    """A chain of ``length`` dependent ~1 ms tasks: the store's latency on the critical
    path of every link (write-through), or of none (write-behind)."""
    token = uuid.uuid4().hex
    x = delayed(leaf)(0, seconds, token)
    for _ in range(length - 1):
        x = delayed(combine)(x, x, seconds)
    start = time.perf_counter()
    got = client.compute(x).result()
    wall = time.perf_counter() - start
    # x ^ x: zeros from the second link on.
    expected = np.random.default_rng(0).bytes(1024) if length == 1 else bytes(1024)
    return got == expected, wall


def _cpu_seconds(pid: int | None) -> float | None:
    if pid is None:
        return None
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def _s3fs_reference(endpoint: str, bucket: str, nbytes: int, count: int) -> float:
    """Throughput of plain s3fs writing ``count`` objects of ``nbytes``, then reading
    them back, through the proxy with the store's concurrency."""
    concurrency = int(dask.config.get("storage-scheduler.max-concurrency"))
    fs = fsspec.filesystem(
        "s3",
        endpoint_url=endpoint,
        skip_instance_cache=True,
        config_kwargs={"max_pool_connections": concurrency},
    )
    data = {
        f"{bucket}/s3fs-{uuid.uuid4().hex[:8]}-{i}": np.full(nbytes // 8, float(i)).tobytes()
        for i in range(count)
    }
    start = time.perf_counter()
    fs.pipe(data, batch_size=concurrency)
    got = fs.cat(list(data), batch_size=concurrency)
    seconds = time.perf_counter() - start
    assert all(got[p] == data[p] for p in data)
    fs.rm(list(data))
    return nbytes * count / seconds


def s3_latency(mode: str, store: str, params: dict[str, Any]) -> dict[str, Any]:
    endpoint, delays = params["endpoint"], params["delays"]
    out: dict[str, Any] = {"tasks": 2 * params["leaves"] - 1, "correct": True}
    with LatencyProxy(endpoint) as proxy:
        options = {"endpoint_url": proxy.endpoint}
        with bench_cluster(
            None, store if mode == "storage" else None, relief=None, storage_options=options
        ) as (lc, client, sampler):
            for delay in delays:
                ms = f"{delay * 1000:g}ms"
                proxy.delay = delay
                proxy.reset()
                cpu = _cpu_seconds(params.get("server_pid"))
                ok, wall, ran = _tree(client, params["leaves"], params["task_seconds"])
                requests = proxy.requests()
                after = _cpu_seconds(params.get("server_pid"))
                if cpu is not None and after is not None:  # the S3 server's own CPU time
                    out[f"tree_server_cpu_seconds_{ms}"] = after - cpu
                out["correct"] = out["correct"] and ok
                out[f"tree_seconds_{ms}"] = wall
                out[f"tree_executed_{ms}"] = ran
                out[f"tree_requests_{ms}"] = requests
                out[f"tree_requests_by_kind_{ms}"] = proxy.requests_by_kind()
                out[f"tree_requests_per_task_{ms}"] = sum(requests.values()) / out["tasks"]
                ok, out[f"chain_seconds_{ms}"] = _chain(
                    client, params["chain"], params["task_seconds"]
                )
                out["correct"] = out["correct"] and ok
            figures = cluster_figures(lc, client, sampler)
        for delay in delays:  # a cluster of its own: transfer() starts one
            ms = f"{delay * 1000:g}ms"
            proxy.delay = delay
            proxy.reset()
            moved = transfer(mode, store, params, storage_options=options)
            out["correct"] = out["correct"] and moved["correct"]
            out[f"transfer_seconds_{ms}"] = moved["wall_seconds"]
            out[f"transfer_throughput_{ms}"] = moved["throughput"]
            out[f"transfer_requests_{ms}"] = proxy.requests()
            if mode == "storage":
                bucket = store.removeprefix("s3://").split("/")[0]
                out[f"s3fs_throughput_{ms}"] = _s3fs_reference(
                    proxy.endpoint, bucket, params["array_bytes"], params["arrays"]
                )
    first = f"{delays[0] * 1000:g}ms"
    out["wall_seconds"] = out[f"tree_seconds_{first}"]
    out["throughput"] = out[f"transfer_throughput_{first}"]
    out.update(figures)
    return out
