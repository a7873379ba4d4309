"""Turn the suite's JSON lines into ``RESULTS.md``: a table of medians and ratios, and plots.

    python -m benchmarks.report [--results benchmarks/results] [--out benchmarks/RESULTS.md]

Reads ``<results>/<workload>.jsonl`` as written by ``benchmarks.suite``, and the memory
relief benchmarks' files (``persist_larger_than_memory.jsonl``, ``rechunk.jsonl``) when
present; writes the Markdown file, and two PNG plots into the results directory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dask.utils import format_bytes

from benchmarks.suite import MODES, RESULTS, SIGNED, WORKLOADS

Rows = list[dict[str, Any]]


def load(path: Path) -> Rows:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def median(rows: Rows, mode: str, figure: Callable[[dict[str, Any]], float]) -> float:
    return statistics.median(figure(r) for r in rows if r["mode"] == mode)


def mb_s(v: float) -> str:
    return f"{v / 1e6:,.0f} MB/s"


def secs(v: float) -> str:
    return f"{v:.3g} s"


#: workload -> (what is compared, figure of a run, format, ratio's target, smaller is better)
HEADLINES: dict[
    str, tuple[str, Callable[[dict[str, Any]], float], Callable[[float], str], float, bool]
] = {
    "transfer": ("throughput, end to end", lambda r: r["throughput"], mb_s, 1.0, False),
    "overhead": ("wall time", lambda r: r["wall_seconds"], secs, 1.05, True),
    "scale": (
        "scheduler CPU per task",
        lambda r: r["scheduler_cpu_per_task_us"],
        lambda v: f"{v:.0f} µs",
        1.10,
        True,
    ),
    "rerun": ("rerun / first run", lambda r: r["rerun_ratio"], lambda v: f"{v:.3f}x", 0.05, True),
    "worker-loss": ("tasks re-executed", lambda r: r["reexecuted"], lambda v: f"{v:g}", 1.0, True),
    "retire": ("retire_workers time", lambda r: r["wall_seconds"], secs, 0.1, True),
    "s3": ("throughput, end to end", lambda r: r["throughput"], mb_s, 0.0, False),
    "s3-latency": ("tree wall time at 20 ms", lambda r: r["wall_seconds"], secs, 1.5, True),
}


def verdict(name: str, rows: Rows) -> tuple[str, str]:
    """The compared figure's ratio (or storage's own figure) and whether the target holds."""
    _, figure, fmt, target, smaller = HEADLINES[name]
    stock, storage = (median(rows, m, figure) for m in MODES)
    if name == "rerun":  # the target is on storage's own ratio
        return fmt(storage), "met" if storage <= target else "missed"
    if name == "worker-loss":  # the target is on a count: the documented bound
        bounds = [r.get("reexecution_bound") for r in rows if r["mode"] == "storage"]
        target = min(bounds) if all(isinstance(b, int) for b in bounds) and bounds else target
        return f"{storage:g} vs {stock:g}", "met" if storage <= target else "missed"
    if name == "s3":
        return f"{storage / stock:.2f}", "reported"
    ratio = storage / stock
    met = ratio <= target if smaller else ratio >= target
    return f"{ratio:.3g}", "met" if met else "missed"


def table(results: dict[str, Rows]) -> list[str]:
    lines = [
        "| workload | compared | stock Dask | storage_scheduler | storage / stock | target | |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        what, figure, fmt, _, _ = HEADLINES[name]
        stock, storage = (median(rows, m, figure) for m in MODES)
        ratio, met = verdict(name, rows)
        lines.append(
            f"| {name} | {what} | {fmt(stock)} | {fmt(storage)} | {ratio} | {WORKLOADS[name][3]} | {met} |"
        )
    return lines


def details(results: dict[str, Rows]) -> list[str]:
    lines = [
        "| workload | mode | runs | wall time (median) | peak RSS per worker (max) | peer-to-peer | store written / read | correct |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        for mode in [m for m in (*MODES, SIGNED) if any(r["mode"] == m for r in rows)]:
            mine = [r for r in rows if r["mode"] == mode]
            rss = max((max(r["peak_rss"] or [0]) for r in mine), default=0)
            lines.append(
                f"| {name} | {mode} | {len(mine)} | {secs(median(rows, mode, lambda r: r['wall_seconds']))} "
                f"| {format_bytes(rss)} | {format_bytes(median(rows, mode, lambda r: r['peer_bytes']))} "
                f"| {format_bytes(median(rows, mode, lambda r: r['store_bytes_written']))} / "
                f"{format_bytes(median(rows, mode, lambda r: r['store_bytes_read']))} "
                f"| {sum(r['correct'] for r in mine)}/{len(mine)} |"
            )
    return lines


def trust_costs(results: dict[str, Rows]) -> list[str]:
    """What signing and code tokens cost, where the run measured them."""
    out = []
    for name, rows in results.items():
        if any(r["mode"] == SIGNED for r in rows):
            what, figure, fmt, _, smaller = HEADLINES[name]
            signed, storage = (median(rows, m, figure) for m in (SIGNED, "storage"))
            cost = signed / storage - 1 if smaller else storage / signed - 1
            out.append(
                f"- {name}: {what} {fmt(signed)} signed, {fmt(storage)} unsigned: "
                f"signing costs {cost:+.1%}."
            )
        tokens = [r["token_seconds"] for r in rows if "token_seconds" in r]
        if tokens:
            wall = median(rows, "storage", lambda r: r["wall_seconds"])
            out.append(
                f"- {name}: computing the tokens of its {rows[0]['tasks']:,} tasks once takes "
                f"{statistics.median(tokens) * 1e3:.0f} ms, {statistics.median(tokens) / wall:.2%} "
                "of its wall time with storage (the scheduler computes each once, and so does "
                "the worker that stores the result)."
            )
    return out


def extra_figures(results: dict[str, Rows]) -> list[str]:
    out = trust_costs(results)
    if "rerun" in results:
        rows = results["rerun"]
        out.append(
            "- rerun: first run {} (stock) and {} (storage); tasks executed on the rerun: {} (stock), {} (storage).".format(
                secs(median(rows, "stock", lambda r: r["first_seconds"])),
                secs(median(rows, "storage", lambda r: r["first_seconds"])),
                f"{median(rows, 'stock', lambda r: r['executed_rerun']):g}",
                f"{median(rows, 'storage', lambda r: r['executed_rerun']):g}",
            )
        )
    if "worker-loss" in results:
        rows = results["worker-loss"]
        out.append(
            "- worker-loss: wall time with the fault / without it: {:.2f} (stock), {:.2f} (storage).".format(
                median(rows, "stock", lambda r: r["fault_ratio"]),
                median(rows, "storage", lambda r: r["fault_ratio"]),
            )
        )
    if "scale" in results:
        rows = results["scale"]
        out.append(
            "- scale: scheduler memory growth per held key {} (stock), {} (storage); {} keys stored.".format(
                format_bytes(median(rows, "stock", lambda r: r["scheduler_bytes_per_held_key"])),
                format_bytes(median(rows, "storage", lambda r: r["scheduler_bytes_per_held_key"])),
                f"{median(rows, 'storage', lambda r: r['stored_keys']):g}",
            )
        )
    if "retire" in results:
        rows = results["retire"]
        out.append(
            "- retire: {} held by the retired worker; copied to the other one: {} (stock), {} (storage).".format(
                format_bytes(rows[0]["bytes_held"]),
                format_bytes(median(rows, "stock", lambda r: r["bytes_copied"])),
                format_bytes(median(rows, "storage", lambda r: r["bytes_copied"])),
            )
        )
    return out


def memory_relief(results_dir: Path) -> list[str]:
    """The last run of each memory relief benchmark, as one table."""
    lines = []
    for name, label in (("persist_larger_than_memory", "mode"), ("rechunk", "method")):
        rows = load(results_dir / f"{name}.jsonl")
        if not rows:
            continue
        last = rows[-len({r[label] for r in rows}) :]
        for r in last:
            lines.append(
                f"| {name} | {r[label]} | {'yes' if r['completed'] else 'no'} | {secs(r['wall_seconds'])} "
                f"| {r['worker_restarts']} | {', '.join(format_bytes(x) for x in r['peak_rss'])} "
                f"| {format_bytes(r['memory_limit'])} |"
            )
    if not lines:
        return []
    return [
        "| benchmark | run | completed | wall time | worker restarts | peak RSS per worker | memory limit |",
        "|---|---|---|---|---|---|---|",
        *lines,
    ]


def plots(results: dict[str, Rows], directory: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(3 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        what, figure, _, _, _ = HEADLINES[name]
        for x, mode in enumerate(MODES):
            values = [figure(r) for r in results[name] if r["mode"] == mode]
            ax.bar(x, statistics.median(values), color=("tab:gray", "tab:blue")[x], width=0.6)
            ax.plot([x] * len(values), values, "k.", markersize=4)
        ax.set_xticks(range(len(MODES)), ["stock", "storage"])
        ax.set_title(f"{name}\n{what}", fontsize=9)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(directory / "suite.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.4))
    width = 0.4
    for i, name in enumerate(names):
        for j, mode in enumerate(MODES):
            peer = median(results[name], mode, lambda r: r["peer_bytes"]) / 2**20
            store = median(results[name], mode, lambda r: r["store_bytes_read"]) / 2**20
            x = i + (j - 0.5) * width
            ax.bar(
                x, peer, width * 0.9, color="tab:red", label="peer-to-peer" if i == j == 0 else None
            )
            ax.bar(
                x,
                store,
                width * 0.9,
                bottom=peer,
                color="tab:blue",
                label="read from the store" if i == j == 0 else None,
            )
    ax.set_xticks(range(len(names)), [f"{n}\nstock | storage" for n in names], fontsize=7)
    ax.set_ylabel("MiB moved to task inputs (median)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(directory / "traffic.png", dpi=100)
    plt.close(fig)
    return ["suite.png", "traffic.png"]


def environment(results: dict[str, Rows]) -> str:
    row = next(r for rows in results.values() for r in rows)
    return (
        f"Python {row['python']}, dask {row['dask']}, distributed {row['distributed']}, {row['machine']}; "
        + ("smoke sizes (not timings)" if row.get("smoke") else "full sizes")
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=RESULTS.parent / "RESULTS.md")
    args = parser.parse_args(argv)
    results = {name: rows for name in WORKLOADS if (rows := load(args.results / f"{name}.jsonl"))}
    if not results:
        parser.error(f"no suite results in {args.results}; run ci/bench.sh first")
    images = [
        os.path.relpath(args.results / image, args.out.parent)
        for image in plots(results, args.results)
    ]
    text = [
        "# Benchmarks: storage_scheduler against stock Dask",
        "",
        "Generated by `benchmarks/report.py` from `benchmarks/results/*.jsonl` (written by",
        "`ci/bench.sh`). Every workload ran on a stock cluster and on one with storage_scheduler",
        "(local-directory store; S3 for `s3`), one after the other, on the same data; medians of",
        f"the repetitions. {environment(results)}. LocalCluster with processes: 2 workers, one",
        "thread each.",
        "",
        *table(results),
        "",
        *extra_figures(results),
        "",
        "## Every run",
        "",
        *details(results),
        "",
        "Peer-to-peer counts task inputs sent between workers; the store columns what the",
        "workers wrote to and read from the store.",
        "",
        *(f"![{image}]({image})" for image in images),
        "",
    ]
    relief = memory_relief(args.results)
    if relief:
        text += [
            "## Memory relief (larger than memory; 16 GiB rechunk)",
            "",
            "Last runs of `benchmarks/persist_larger_than_memory.py` and `benchmarks/rechunk.py`",
            "(2 workers with a memory limit each; see the README's Memory relief section).",
            "",
            *relief,
            "",
        ]
    args.out.write_text("\n".join(text))
    print(f"wrote {args.out} and {', '.join(images)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
