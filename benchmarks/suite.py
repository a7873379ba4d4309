"""storage_scheduler against stock peer-to-peer Dask, side by side.

Every workload runs on a stock cluster and on a cluster with storage_scheduler (a local
directory store, or S3 for the ``s3`` workload), one after the other in this process
tree, on the same data, ``--repeat`` times, alternating. Clusters are ``LocalCluster``
with processes: 2 workers with nannies, one thread each. Each run is one JSON line
(versions, machine, parameters, every figure) in ``<out>/<workload>.jsonl``;
``benchmarks/report.py`` turns them into a table and plots::

    python -m benchmarks.suite [--smoke] [--repeat 3] [--workloads transfer ...] [--out DIR]

``--smoke`` runs every workload at a tiny size, once: it checks that the suite works
and that the results are correct, not how fast anything is.

Workloads (see :data:`WORKLOADS`):

* ``transfer``: producers pinned to one worker make numpy arrays, consumers pinned to
  the other reduce them; end-to-end wall time and throughput (array bytes / second).
* ``overhead``: a tree reduction of 10,000 tasks of ~1 ms and ~1 KiB results.
* ``scale``: 16 one-thread workers run ~50,000 tasks that sleep 1 ms; the scheduler's CPU
  time per task and its memory per held key (see :mod:`benchmarks.scale`).
* ``rerun``: a ~2,000-task graph of ~30 s, then a whole new cluster runs it again.
* ``worker-loss``: one of the two workers is SIGKILLed when half the tasks have run;
  tasks re-executed, and wall time against the same graph without the fault.
* ``retire``: retire a worker that holds 4 GiB of results.
* ``s3``: the transfer workload with the store on an S3 API (the moto server that
  ``ci/bench.sh`` starts on 127.0.0.1); stock moves the same data peer-to-peer.
* ``s3-latency``: a tree of tiny tasks and the transfer, with every S3 request delayed
  20 and 50 ms by a proxy (see :mod:`benchmarks.s3_latency`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

import dask.config
from dask import delayed
from dask.utils import format_bytes, parse_bytes
from distributed import Client, LocalCluster, wait

from benchmarks.common import bench_cluster, cluster_figures, environment
from benchmarks.scale import scale

MODES = ("stock", "storage")
#: With ``--signed``: storage with a signing key, to show what signing costs.
SIGNED = "signed"
#: The key of the ``signed`` mode (a benchmark's: nothing is protected by it).
SIGNING_KEY = "benchmark-signing-key"
RESULTS = Path(__file__).parent / "results"


# ------------------------------------------------------------------------- task bodies


def make_array(i: int, nbytes: int, token: str) -> np.ndarray:
    """A producer: ``nbytes`` of float64 (``token`` makes every run's keys new)."""
    return np.full(nbytes // 8, float(i))


def reduce_array(x: np.ndarray) -> float:
    return float(x[::4096].sum())


def busy(seconds: float) -> None:
    """Hold the CPU (and the GIL) for ``seconds``: a task's computation."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def leaf(i: int, seconds: float, token: str) -> bytes:
    busy(seconds)
    return np.random.default_rng(i).bytes(1024)


def combine(a: bytes, b: bytes, seconds: float) -> bytes:
    busy(seconds)
    return (np.frombuffer(a, np.uint8) ^ np.frombuffer(b, np.uint8)).tobytes()


def sleepy(i: int, seconds: float, token: str) -> float:
    time.sleep(seconds)
    return float(i)


def add(a: float, b: float, seconds: float) -> float:
    time.sleep(seconds)
    return a + b


def marked(
    directory: str, name: str, seconds: float, nbytes: int, *inputs: np.ndarray
) -> np.ndarray:
    """A task that leaves a file behind for each of its executions (worker-loss)."""
    Path(directory, f"{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}").touch()
    time.sleep(seconds)
    base = float(sum(float(x[0]) for x in inputs))
    return np.full(nbytes // 8, base + 1.0)


# --------------------------------------------------------------------------- helpers


def tree(items: list[Any], func: Callable[..., Any], *args: Any) -> Any:
    """Reduce ``items`` pairwise with ``func(a, b, *args)`` down to one delayed value."""
    while len(items) > 1:
        pairs = [delayed(func)(items[i], items[i + 1], *args) for i in range(0, len(items) - 1, 2)]
        items = pairs + ([items[-1]] if len(items) % 2 else [])
    return items[0]


def executed(client: Client) -> int:
    """Tasks the workers executed so far (their state machines' count)."""
    counts = client.run(lambda dask_worker: dask_worker.state.executed_count)
    return int(sum(counts.values()))


@contextmanager
def cluster(
    mode: str, store: str | None, **kwargs: Any
) -> Iterator[tuple[LocalCluster, Client, Any]]:
    if mode == SIGNED:
        kwargs["signing_key"] = SIGNING_KEY
    with bench_cluster(None, None if mode == "stock" else store, relief=None, **kwargs) as c:
        yield c


def token_seconds(graph: Any) -> float:
    """Time to compute the token of every task of ``graph`` (a Dask collection), as
    the scheduler does once per task it plans and each worker once per result it stores:
    what code tokens cost a run of the graph."""
    from storage_scheduler._protocol import result_token

    specs = list(dict(graph.__dask_graph__()).values())
    start = time.perf_counter()
    for spec in specs:
        result_token(spec, None, None)
    return time.perf_counter() - start


def managed_bytes(dask_worker: Any) -> int:
    """Bytes of results in the worker's memory (what a retirement copies to it)."""
    return int(dask_worker.state.nbytes)


def workers(client: Client) -> tuple[str, str]:
    a, b = sorted(client.scheduler_info()["workers"])
    return a, b


# ------------------------------------------------------------------------- workloads


def transfer(
    mode: str, store: str, params: dict[str, Any], **cluster_kwargs: Any
) -> dict[str, Any]:
    nbytes, count = params["array_bytes"], params["arrays"]
    token = uuid.uuid4().hex
    with cluster(mode, store, **cluster_kwargs) as (lc, client, sampler):
        a, b = workers(client)
        start = time.perf_counter()
        made = [
            client.submit(
                make_array, i, nbytes, token, workers=[a], allow_other_workers=False, pure=False
            )
            for i in range(count)
        ]
        sums = client.map(reduce_array, made, workers=[b], allow_other_workers=False, pure=False)
        got = client.gather(sums)
        wall = time.perf_counter() - start
        del made, sums
        figures = cluster_figures(lc, client, sampler)
    expected = [reduce_array(np.full(nbytes // 8, float(i))) for i in range(count)]
    return {
        "correct": got == expected,
        "wall_seconds": wall,
        "bytes": nbytes * count,
        "throughput": nbytes * count / wall,
        **figures,
    }


def overhead(mode: str, store: str, params: dict[str, Any]) -> dict[str, Any]:
    leaves, seconds = params["leaves"], params["task_seconds"]
    token = uuid.uuid4().hex
    graph = tree([delayed(leaf)(i, seconds, token) for i in range(leaves)], combine, seconds)
    # XOR is associative and commutative: the tree's result is the XOR of all leaves.
    expected = np.bitwise_xor.reduce(
        [np.frombuffer(np.random.default_rng(i).bytes(1024), np.uint8) for i in range(leaves)]
    )
    with cluster(mode, store) as (lc, client, sampler):
        start = time.perf_counter()
        got = client.compute(graph).result()
        wall = time.perf_counter() - start
        tasks = executed(client)
        figures = cluster_figures(lc, client, sampler)
    return {
        "correct": got == expected.tobytes(),
        "wall_seconds": wall,
        "tasks": 2 * leaves - 1,
        "executed": tasks,
        "token_seconds": token_seconds(graph),
        **figures,
    }


def rerun(mode: str, store: str, params: dict[str, Any]) -> dict[str, Any]:
    leaves, seconds = params["leaves"], params["task_seconds"]
    token = uuid.uuid4().hex
    graph = tree([delayed(sleepy)(i, seconds, token) for i in range(leaves)], add, seconds)
    runs = []
    for _ in range(2):  # the same graph, on a whole new cluster each time, same store
        with cluster(mode, store) as (lc, client, sampler):
            start = time.perf_counter()
            value = client.compute(graph).result()
            runs.append(
                {
                    "seconds": time.perf_counter() - start,
                    "value": value,
                    "executed": executed(client),
                }
            )
            figures = cluster_figures(lc, client, sampler)
    return {
        "correct": runs[0]["value"] == runs[1]["value"] == float(sum(range(leaves))),
        "wall_seconds": runs[1]["seconds"],
        "first_seconds": runs[0]["seconds"],
        "rerun_ratio": runs[1]["seconds"] / runs[0]["seconds"],
        "tasks": 2 * leaves - 1,
        "executed_first": runs[0]["executed"],
        "executed_rerun": runs[1]["executed"],
        **figures,
    }


def worker_loss(mode: str, store: str, params: dict[str, Any]) -> dict[str, Any]:
    width, seconds, nbytes = params["width"], params["task_seconds"], params["result_bytes"]
    out: dict[str, Any] = {"tasks": 2 * width + 1}
    with cluster(mode, store) as (lc, client, sampler):
        pids = client.run(os.getpid)
        victim = workers(client)[0]
        out["killed_worker_threads"] = client.nthreads()[victim]
        # The documented bound: its threads' tasks and its results awaiting upload.
        pending = int(dask.config.get("storage-scheduler.max-concurrency"))
        out["reexecution_bound"] = out["killed_worker_threads"] + (
            0 if mode == "stock" else pending
        )
        for fault in (False, True):
            marks = tempfile.mkdtemp(prefix="worker-loss-")
            try:
                # Two stages and a total; every second-stage task needs two first-stage
                # results, one of them usually computed on the other worker.
                run = uuid.uuid4().hex[:8]
                first = [
                    delayed(marked)(marks, f"a{i}", seconds, nbytes, dask_key_name=f"a-{run}-{i}")
                    for i in range(width)
                ]
                second = [
                    delayed(marked)(
                        marks,
                        f"b{i}",
                        seconds,
                        nbytes,
                        first[i],
                        first[(i + 1) % width],
                        dask_key_name=f"b-{run}-{i}",
                    )
                    for i in range(width)
                ]
                total = delayed(marked)(marks, "total", 0, 8, *second, dask_key_name=f"total-{run}")
                start = time.perf_counter()
                future = client.compute(total)
                if fault:
                    while len(os.listdir(marks)) < out["tasks"] // 2:
                        time.sleep(0.005)
                    os.kill(pids[victim], signal.SIGKILL)
                value = future.result()
                wall = time.perf_counter() - start
                executions = len(os.listdir(marks))
                del future
            finally:
                shutil.rmtree(marks, ignore_errors=True)
            out["correct" if fault else "correct_no_fault"] = float(value[0]) == 3.0 * width + 1.0
            out["wall_seconds" if fault else "no_fault_seconds"] = wall
            if fault:
                out["reexecuted"] = executions - out["tasks"]
        out["correct"] = out["correct"] and out.pop("correct_no_fault")
        out["fault_ratio"] = out["wall_seconds"] / out["no_fault_seconds"]
        out.update(cluster_figures(lc, client, sampler))
    return out


def retire(mode: str, store: str, params: dict[str, Any]) -> dict[str, Any]:
    nbytes, count = params["array_bytes"], params["arrays"]
    token = uuid.uuid4().hex
    with cluster(mode, store) as (lc, client, sampler):
        a, b = workers(client)
        held = [
            client.submit(make_array, i, nbytes, token, workers=[a], pure=False)
            for i in range(count)
        ]
        wait(held)
        before = client.run(managed_bytes, workers=[b])[b]
        start = time.perf_counter()
        client.retire_workers([a])
        seconds = time.perf_counter() - start
        copied = client.run(managed_bytes, workers=[b])[b] - before
        sums = client.gather(client.map(reduce_array, held, pure=False))
        del held
        figures = cluster_figures(lc, client, sampler)
    expected = [reduce_array(np.full(nbytes // 8, float(i))) for i in range(count)]
    return {
        "correct": sums == expected,
        "wall_seconds": seconds,
        "bytes_held": nbytes * count,
        "bytes_copied": int(copied),
        **figures,
    }


def s3(mode: str, store: str, params: dict[str, Any]) -> dict[str, Any]:
    endpoint = params["endpoint"]
    return transfer(mode, store, params, storage_options={"endpoint_url": endpoint})


def s3_latency(mode: str, store: str, params: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.s3_latency import s3_latency as run

    return run(mode, store, params)


#: name -> (function, full-size parameters, smoke parameters, target)
WORKLOADS: dict[str, tuple[Callable[..., dict[str, Any]], dict[str, Any], dict[str, Any], str]] = {
    "transfer": (
        transfer,
        {"array_bytes": parse_bytes("64MiB"), "arrays": 32},
        {"array_bytes": parse_bytes("1MiB"), "arrays": 4},
        "store-routed throughput >= 1.0x stock peer-to-peer",
    ),
    "overhead": (
        overhead,
        {"leaves": 5000, "task_seconds": 0.001},
        {"leaves": 32, "task_seconds": 0.001},
        "wall time <= 1.05x stock",
    ),
    "scale": (
        scale,
        {"leaves": 25_000, "task_seconds": 0.001, "workers": 16},
        {"leaves": 200, "task_seconds": 0.001, "workers": 2},
        "scheduler CPU per task <= 1.10x stock",
    ),
    "rerun": (
        rerun,
        {"leaves": 1000, "task_seconds": 0.03},
        {"leaves": 10, "task_seconds": 0.001},
        "rerun <= 0.05x first run (stock ~1.0x)",
    ),
    "worker-loss": (
        worker_loss,
        {"width": 200, "task_seconds": 0.05, "result_bytes": parse_bytes("1MiB")},
        {"width": 10, "task_seconds": 0.02, "result_bytes": parse_bytes("64KiB")},
        "tasks re-executed <= the killed worker's threads (1) + its results awaiting upload",
    ),
    "retire": (
        retire,
        {"array_bytes": parse_bytes("64MiB"), "arrays": 64},
        {"array_bytes": parse_bytes("1MiB"), "arrays": 4},
        "retire time <= 0.1x stock",
    ),
    "s3": (
        s3,
        {"array_bytes": parse_bytes("16MiB"), "arrays": 16},
        {"array_bytes": parse_bytes("1MiB"), "arrays": 2},
        "runs and reports (moto, an in-memory test server, is the limit)",
    ),
    "s3-latency": (
        s3_latency,
        {
            "leaves": 1000,
            "chain": 50,
            "task_seconds": 0.001,
            "array_bytes": parse_bytes("16MiB"),
            "arrays": 16,
            "delays": [0.02, 0.05],
        },
        {
            "leaves": 16,
            "chain": 4,
            "task_seconds": 0.001,
            "array_bytes": parse_bytes("1MiB"),
            "arrays": 2,
            "delays": [0.02],
        },
        "at 20 ms: tree <= 1.5x stock (50 ms: 2.0x), transfer >= 0.8x s3fs, <= 0.5 requests/task",
    ),
}


def store_for(workload: str, work: str, endpoint: str | None) -> str:
    if workload not in ("s3", "s3-latency"):
        return f"file://{work}/store"
    import fsspec

    assert endpoint is not None
    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3", endpoint_url=endpoint, skip_instance_cache=True).mkdir(bucket)
    return f"s3://{bucket}/results"


def run_workload(
    name: str, repeat: int, smoke: bool, endpoint: str | None, modes: tuple[str, ...] = MODES
) -> list[dict[str, Any]]:
    func, full, tiny, target = WORKLOADS[name]
    params = dict(tiny if smoke else full)
    if name in ("s3", "s3-latency"):
        params["endpoint"] = endpoint
    if name in ("scale", "s3-latency"):  # clusters of their own, never signed
        modes = tuple(m for m in modes if m != SIGNED)
    rows = []
    for rep in range(repeat):
        for mode in modes:
            work = tempfile.mkdtemp(prefix=f"bench-{name}-")
            try:
                row = func(mode, store_for(name, work, endpoint), params)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            row = {
                "workload": name,
                "mode": mode,
                "rep": rep,
                "smoke": smoke,
                "params": params,
                "target": target,
                **row,
            }
            row.update(environment())
            rows.append(row)
            print(line(row), flush=True)
    return rows


def line(row: dict[str, Any]) -> str:
    extra = ", ".join(
        f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
        for k, v in row.items()
        if k
        in (
            "throughput",
            "reexecuted",
            "rerun_ratio",
            "fault_ratio",
            "bytes_copied",
            "executed_rerun",
            "scheduler_cpu_per_task_us",
            "scheduler_bytes_per_held_key",
        )
    )
    return (
        f"{row['workload']:>11} {row['mode']:>7} #{row['rep']}: {'ok' if row['correct'] else 'WRONG'} "
        f"{row['wall_seconds']:.2f} s; {extra}; peer-to-peer {format_bytes(row['peer_bytes'])}, "
        f"store {format_bytes(row['store_bytes_written'])} written / {format_bytes(row['store_bytes_read'])} read"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, one repetition: checks, no timings"
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help=f"directory of the JSON lines (default {RESULTS})"
    )
    parser.add_argument(
        "--signed",
        action="store_true",
        help=f"also run storage with a signing key (mode {SIGNED!r}): what signing costs",
    )
    parser.add_argument(
        "--s3-endpoint",
        default=os.environ.get("STORAGE_SCHEDULER_TEST_S3_ENDPOINT"),
        help="S3 API for the s3 workload (default: $STORAGE_SCHEDULER_TEST_S3_ENDPOINT)",
    )
    args = parser.parse_args(argv)
    if {"s3", "s3-latency"} & set(args.workloads) and not args.s3_endpoint:
        parser.error("the s3 workloads need --s3-endpoint (ci/bench.sh starts a moto server)")
    for var, value in (
        ("AWS_ACCESS_KEY_ID", "bench"),
        ("AWS_SECRET_ACCESS_KEY", "bench"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        os.environ.setdefault(var, value)  # moto takes any credentials
    repeat = 1 if args.smoke else args.repeat
    modes = (*MODES, SIGNED) if args.signed else MODES
    args.out.mkdir(parents=True, exist_ok=True)
    wrong = []
    for name in args.workloads:
        rows = run_workload(name, repeat, args.smoke, args.s3_endpoint, modes)
        with open(args.out / f"{name}.jsonl", "w") as f:  # one run of the suite per file
            f.writelines(json.dumps(row) + "\n" for row in rows)
        wrong += [f"{r['workload']} {r['mode']} #{r['rep']}" for r in rows if not r["correct"]]
        medians = {
            m: statistics.median(r["wall_seconds"] for r in rows if r["mode"] == m)
            for m in {r["mode"] for r in rows}  # scale and s3-latency are never signed
        }
        print(
            f"{name:>11}: median wall time storage / stock = {medians['storage'] / medians['stock']:.2f}"
            + (
                f", signed / storage = {medians[SIGNED] / medians['storage']:.3f}"
                if SIGNED in medians
                else ""
            ),
            flush=True,
        )
    if wrong:
        print(f"WRONG results: {', '.join(wrong)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
