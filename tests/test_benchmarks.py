"""Every benchmark runs, at a tiny size (correctness only; no timing is asserted)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster_cli import ROOT, cluster_env

pytestmark = [pytest.mark.slow]

PYTHON_M = [sys.executable, "-m"]


def bench(args: list[str], out: Path) -> list[dict[str, object]]:
    proc = subprocess.run(
        [sys.executable, "-m", *args, "--json", str(out)],
        cwd=ROOT,
        env=cluster_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_store_roundtrip(tmp_path: Path) -> None:
    rows = bench(
        ["benchmarks.store_roundtrip", "--sizes", "1KiB", "1MiB", "--repeat", "3"],
        tmp_path / "r.jsonl",
    )
    assert [r["nbytes"] for r in rows] == [1024, 2**20] and all(r["ratio"] > 0 for r in rows)


def test_catalog_load(tmp_path: Path) -> None:
    (row,) = bench(
        ["benchmarks.catalog_load", "--entries", "20000", "--segments", "3"], tmp_path / "r.jsonl"
    )
    assert row["entries"] == 20000 and row["load_seconds"] > 0


def test_persist_larger_than_memory(tmp_path: Path) -> None:
    rows = bench(
        ["benchmarks.persist_larger_than_memory", "--size-gib", "0.3", "--memory-limit", "1GiB"],
        tmp_path / "r.jsonl",
    )
    assert [r["mode"] for r in rows] == ["stock", "storage"]
    assert all(r["completed"] for r in rows)
    # Equal up to rounding: numpy's pairwise sums depend on buffer alignment, and a result
    # read back from the store is a different buffer from the one computed.
    assert math.isclose(rows[0]["sum"], rows[1]["sum"], rel_tol=1e-12)


def test_rechunk(tmp_path: Path) -> None:
    rows = bench(
        [
            "benchmarks.rechunk",
            "--size-gib",
            "0.2",
            "--memory-limit",
            "1GiB",
            "--methods",
            "p2p",
            "storage-tasks",
            "storage-p2p",
        ],
        tmp_path / "r.jsonl",
    )
    assert [r["method"] for r in rows] == ["p2p", "storage-tasks", "storage-p2p"]
    assert all(r["completed"] and r["checked"] for r in rows)


def test_suite_smoke(tmp_path: Path) -> None:
    """``ci/bench.sh --smoke``: every workload of the suite at a tiny size, and the report."""
    env = {**cluster_env(), "BENCH_RESULTS": str(tmp_path)}
    proc = subprocess.run(
        ["bash", str(ROOT / "ci" / "bench.sh"), "--smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from benchmarks.suite import WORKLOADS

    for name in WORKLOADS:
        rows = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        assert [r["mode"] for r in rows] == ["stock", "storage"], name
        assert all(r["correct"] for r in rows), name
    loss = {
        r["mode"]: r
        for r in map(json.loads, (tmp_path / "worker-loss.jsonl").read_text().splitlines())
    }
    assert loss["storage"]["worker_restarts"] >= 1  # the SIGKILL happened
    transfer = {
        r["mode"]: r
        for r in map(json.loads, (tmp_path / "transfer.jsonl").read_text().splitlines())
    }
    assert (
        transfer["stock"]["store_bytes_written"] == 0 < transfer["storage"]["store_bytes_written"]
    )
    report = (tmp_path / "RESULTS.md").read_text()
    assert all(f"| {name} |" in report for name in WORKLOADS)
    assert (tmp_path / "suite.png").stat().st_size > 0 and (
        tmp_path / "traffic.png"
    ).stat().st_size > 0


def test_suite_signed_mode(tmp_path: Path) -> None:
    """``--signed``: the same workload with a signing key, in the same run, and what
    signing and code tokens cost in the report."""
    suite = ["benchmarks.suite", "--smoke", "--signed", "--workloads", "overhead", "scale"]
    subprocess.run(
        [*PYTHON_M, *suite, "--out", str(tmp_path)],
        cwd=ROOT,
        env=cluster_env(),
        check=True,
        capture_output=True,
        timeout=300,
    )
    rows = {
        r["mode"]: r
        for r in map(json.loads, (tmp_path / "overhead.jsonl").read_text().splitlines())
    }
    assert list(rows) == ["stock", "storage", "signed"]
    assert all(r["correct"] for r in rows.values())
    # Every object of the signed run carries a MAC the unsigned one lacks.
    assert rows["signed"]["store_bytes_written"] > rows["storage"]["store_bytes_written"] > 0
    assert rows["storage"]["token_seconds"] > 0
    scale = [json.loads(line) for line in (tmp_path / "scale.jsonl").read_text().splitlines()]
    assert [r["mode"] for r in scale] == ["stock", "storage"]  # its own clusters: unsigned
    report_path = str(tmp_path / "RESULTS.md")
    subprocess.run(
        [*PYTHON_M, "benchmarks.report", "--results", str(tmp_path), "--out", report_path],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )
    report = Path(report_path).read_text()
    assert "signing costs" in report and "computing the tokens of its 63 tasks" in report
    assert "| overhead | signed | 1 |" in report
