"""The private parts of distributed that storage_scheduler relies on, as it relies on them.

distributed is pinned to a tested range; when an upgrade changes one of these, this test
fails first and names the hook, instead of a cluster misbehaving somewhere later.
"""

from __future__ import annotations

import inspect

import pytest
from distributed import Scheduler, Worker
from distributed import scheduler as scheduler_module
from distributed import worker_state_machine as wsm
from distributed.active_memory_manager import ActiveMemoryManagerExtension
from distributed.comm.core import Comm


def params(func: object) -> list[str]:
    return list(inspect.signature(func).parameters)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "func, expected",
    [
        # worker_plugin wraps the instance's execute; BaseWorker looks it up per task.
        (Worker.execute, ["self", "key", "stimulus_id"]),
        # The store-first/peer-first WorkerState subclasses override this one method.
        (wsm.WorkerState._update_who_has, ["self", "who_has"]),
        # Lanes are added and removed as replicas.
        (Scheduler.add_replica, ["self", "ts", "ws"]),
        (Scheduler.remove_replica, ["self", "ts", "ws"]),
        (Scheduler.register_scheduler_plugin, ["self", "plugin", "name", "idempotent"]),
        (Scheduler.broadcast, ["self", "msg", "workers", "hosts", "nanny", "serializers", "on_error"]),
        (Scheduler.unregister_worker_plugin, ["self", "comm", "name"]),
        # The task-finished metadata reaches SchedulerPlugin.transition through here.
        (Scheduler.stimulus_task_finished, ["self", "worker", "stimulus_id", "key", "run_id", "metadata", "kwargs"]),
        (ActiveMemoryManagerExtension.add_policy, ["self", "policy"]),
    ],
    ids=lambda v: getattr(v, "__qualname__", "") if callable(v) else "",
)
def test_signatures(func: object, expected: list[str]) -> None:
    assert params(func) == expected


def test_lane_worker_state_constructor() -> None:
    expected = {
        "address", "status", "pid", "name", "nthreads", "memory_limit", "local_directory",
        "nanny", "server_id", "scheduler",
    }  # fmt: skip
    assert expected <= set(params(scheduler_module.WorkerState.__init__))


def test_worker_state_swap_is_layout_compatible() -> None:
    from storage_scheduler.worker_plugin import PeerFirstWorkerState, StoreFirstWorkerState

    for cls in (StoreFirstWorkerState, PeerFirstWorkerState):
        assert cls.__slots__ == ()
        assert cls.__mro__[1] is wsm.WorkerState


def test_comm_handshake_attributes() -> None:
    # connect() reads comm._peer_addr and comm._local_addr after the handshake.
    source = inspect.getsource(__import__("distributed.comm.core", fromlist=["connect"]).connect)
    assert "comm._peer_addr" in source and "comm._local_addr" in source
    assert "deserialize" in params(Comm.__init__)


def test_worker_starts_running_before_its_plugins() -> None:
    # Why the worker plugin installs itself before its first await (see its setup()).
    source = inspect.getsource(Worker._register_with_scheduler)
    assert source.index("self.status = Status.running") < source.index("plugin_add")


def test_secede_event_frees_the_thread_slot() -> None:
    # worker_plugin gives a task's slot back during its write with a SecedeEvent: the
    # worker moves it to long-running and starts the next task.
    assert wsm.SecedeEvent.__slots__ == ("key", "compute_duration")
    source = inspect.getsource(wsm.WorkerState._transition_executing_long_running)
    assert "self.executing.discard(ts)" in source and "self._ensure_computing()" in source
    assert ("long-running", "memory") in wsm.WorkerState._TRANSITIONS_TABLE


def test_p2p_barrier_and_fusion_alias() -> None:
    # mark_p2p_steps finds a shuffle's barrier by its run_spec class, and its transfers
    # behind the aliases that graph fusion leaves.
    from dask._task_spec import Alias, Task
    from distributed.shuffle._core import P2PBarrierTask

    assert issubclass(P2PBarrierTask, Task)
    assert "target" in Alias.__slots__ or hasattr(Alias, "target")
