"""examples/climate_anomaly.py, as the README runs it: killed halfway, resumed on a new
cluster that executes only the unfinished tasks."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster_cli import ROOT, cluster_env

pytestmark = [pytest.mark.slow]


def readme_command() -> list[str]:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- readme-test: example -->\n```bash\n(.*?)\n```", text, re.S)
    assert match, "no example command in the README"
    command = shlex.split(match.group(1).split("#")[0])
    assert command[:2] == ["python", "examples/climate_anomaly.py"], command
    return [sys.executable, *command[1:]]


def test_climate_example_resumes_only_unfinished_tasks(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    command = [*readme_command(), "--workdir", str(tmp_path), "--report", str(report)]
    out = subprocess.run(
        command, cwd=ROOT, env=cluster_env(), capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    figures = json.loads(report.read_text())
    total = figures["tasks"]
    executed = figures["executed_on_resume"]  # key -> times it finished on the new cluster
    covered = set(figures["covered"])  # stored after the kill, or needed only by stored results

    # The first cluster was killed halfway and had stored part of the work.
    assert total // 2 <= figures["finished_before_kill"] < total
    assert 0 < figures["stored_before_resume"] <= len(covered) < total
    # The new cluster executed exactly the tasks the store did not cover, each once.
    assert len(executed) == total - len(covered) > 0
    assert not covered & set(executed)
    assert set(executed.values()) == {1}
    assert figures["reused_on_resume"] > 0
    assert figures["identical"]  # equal to a fresh computation without the store
    assert "identical to a fresh computation: yes" in out.stdout
    assert (tmp_path / "warming.zarr").is_dir()
