"""Memory relief through the active memory manager (``memory-relief: always``), in
process clusters. Relief under pressure is the workers' own: see ``test_spill.py``."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

import dask
from distributed import wait
from distributed.active_memory_manager import ActiveMemoryManagerPolicy, SuggestionGenerator
from distributed.utils_test import gen_cluster

from storage_scheduler._protocol import is_lane
from tests.utils import enable_storage

FAST_AMM = {"distributed.scheduler.active-memory-manager.interval": "50ms"}
MiB = 2**20


async def until(condition, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


class CountRounds(ActiveMemoryManagerPolicy):
    """Counts the rounds of the active memory manager; suggests nothing."""

    def __init__(self) -> None:
        self.rounds = 0

    def run(self) -> SuggestionGenerator:
        self.rounds += 1
        yield from ()


def holders(s, key: str) -> set[str]:  # type: ignore[no-untyped-def]
    return {ws.address for ws in s.tasks[key].who_has}


@gen_cluster(client=True, config={**FAST_AMM, "storage-scheduler.memory-relief": "always"})
async def test_always_drops_stored_results_from_ram(c, s, a, b, tmp_path: Path) -> None:
    plugin = await enable_storage(s, str(tmp_path / "store"))
    x = c.submit(np.full, MiB // 8, 3.0, key="x", workers=[a.address])
    await wait(x)
    await until(lambda: "x" not in a.data)
    assert holders(s, "x") == {plugin.lanes.lane_for("x").address}
    assert s.tasks["x"].state == "memory"
    assert a.state.nbytes == 0  # managed memory counts only what is really in RAM
    # Needed again on the same worker: read back from the store.
    y = c.submit(np.sum, x, key="y", workers=[a.address])
    assert await y == 3.0 * (MiB // 8)
    assert any(is_lane(e["who"]) for e in a.transfer_incoming_log)
    np.testing.assert_array_equal(await c.gather(x), np.full(MiB // 8, 3.0))


@gen_cluster(client=True, config={**FAST_AMM, "storage-scheduler.memory-relief": "always"})
async def test_unstored_results_are_never_dropped(c, s, a, b, tmp_path: Path) -> None:
    await enable_storage(s, str(tmp_path / "store"))
    with dask.annotate(storage=False):
        x = c.compute(dask.delayed(np.ones)(1000, dask_key_name="kept-in-ram"))
    stored = c.submit(np.ones, 1000, key="stored", workers=[a.address])
    await wait([x, stored])
    await until(lambda: "stored" not in a.data and "stored" not in b.data)
    assert "kept-in-ram" in a.data or "kept-in-ram" in b.data
    assert not any(is_lane(h) for h in holders(s, "kept-in-ram"))


@pytest.mark.parametrize("mode", ["never", "pressure"])
@gen_cluster(client=True, config=FAST_AMM)
async def test_no_relief_without_pressure(c, s, a, b, tmp_path: Path, mode: str) -> None:
    with dask.config.set({"storage-scheduler.memory-relief": mode}):
        await enable_storage(s, str(tmp_path / "store"))
    x = c.submit(np.ones, 1000, key="x", workers=[a.address])
    await wait(x)
    # Nothing to wait for: x must stay. Give the policies several AMM rounds in which
    # they could (wrongly) drop it, counted rather than timed.
    rounds = CountRounds()
    s.extensions["amm"].add_policy(rounds)
    await until(lambda: rounds.rounds >= 5)
    assert "x" in a.data


def test_bad_relief_settings() -> None:
    from storage_scheduler import SchedulerSettings, StorageConfigError

    for key, value in [("memory-relief", "sometimes"), ("relief-threshold", 2)]:
        with dask.config.set({f"storage-scheduler.{key}": value}):
            with pytest.raises(StorageConfigError, match=key):
                SchedulerSettings.from_config()
