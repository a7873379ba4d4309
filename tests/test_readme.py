"""The README's runnable examples run as written (with a temporary store)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from storage_scheduler import Store

README = Path(__file__).resolve().parents[1] / "README.md"

pytestmark = [pytest.mark.slow]


def python_block(marker: str) -> str:
    for block in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S):
        if marker in block:
            return block
    raise AssertionError(f"no python block with {marker!r} in the README")


def test_persist_example_runs_twice(tmp_path: Path) -> None:
    code = python_block("persist_demo.py").replace("file:///tmp/dask-results", f"file://{tmp_path}/store")
    script = tmp_path / "persist_demo.py"
    script.write_text(code)
    outputs = []
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path
        )
        assert out.returncode == 0, out.stderr
        outputs.append(float(out.stdout.strip().splitlines()[-1]))
    assert outputs[0] == outputs[1]
    import asyncio

    async def stored() -> int:
        store = Store.from_url(f"file://{tmp_path}/store")
        try:
            return len(await store.list())
        finally:
            store.close()

    assert asyncio.run(stored()) >= 16  # the persisted blocks of y stayed
