"""Every use of distributed's private internals, each behind a named function.

distributed is pinned to a tested range (``pyproject.toml``). This is the one file to
audit on an upgrade: nothing else in the package touches a private attribute, method or
module of distributed, or relies on an undocumented convention. Each function here has a
case in ``tests/test_private_hooks.py`` that fails loudly when an upgrade changes what it
relies on.

Scheduler side: lanes are scheduler ``WorkerState`` objects that are never added to
``scheduler.workers``; replicas are added and removed with ``add_replica`` /
``remove_replica``; graph surgery sets task state, run specs and dependencies directly;
the worker plugin is pushed with the raw ``plugin-add`` broadcast; AMM policies are
swapped in the extension's policy set.

Dashboard: the storage views are added to Dask's running Bokeh server, its menu and its
"More..." list (the module-level ``applications`` of ``distributed.dashboard.scheduler``
are read when the scheduler is built, before any preload or plugin starts).

Worker side: ``worker.execute`` is wrapped on the instance (``BaseWorker`` looks it up per
task); the worker state's class is swapped for a layout-compatible subclass overriding
``_update_who_has``; a finished task's thread slot is freed with a ``SecedeEvent``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from dask._task_spec import Alias
from distributed.active_memory_manager import ActiveMemoryManagerPolicy
from distributed.core import Status
from distributed.scheduler import TaskState, WorkerState
from distributed.shuffle._core import P2PBarrierTask
from distributed.spill import SpillBuffer
from distributed.worker_state_machine import (
    ExecuteSuccessEvent,
    RescheduleEvent,
    SecedeEvent,
    StateMachineEvent,
)
from distributed.worker_state_machine import TaskState as WorkerTaskState
from distributed.worker_state_machine import WorkerState as _WorkerState

from storage_scheduler._compat.conventions import is_finalize_key, runs_for_effect
from storage_scheduler._compat.dashboard import (
    add_bokeh_applications,
    bokeh_server,
    dashboard_look,
    dashboard_menus,
)
from storage_scheduler._compat.graphs import watch_graphs
from storage_scheduler._protocol import is_lane

if TYPE_CHECKING:
    from distributed import Scheduler, Worker

__all__ = [
    "PeerFirstWorkerState",
    "StoreFirstWorkerState",
    "add_bokeh_applications",
    "add_replica",
    "adopt_spill_buffer",
    "amm_policies",
    "annotate",
    "attach_dependencies",
    "bokeh_server",
    "broadcast_worker_plugin",
    "clear_lane",
    "dashboard_look",
    "dashboard_menus",
    "detach_dependencies",
    "execute_succeeded",
    "finished_metadata",
    "is_finalize_key",
    "is_p2p_barrier",
    "is_p2p_step_alias",
    "live_servers",
    "make_lane",
    "put_in_memory",
    "release_thread_slot",
    "remove_replica",
    "replace_amm_policy",
    "reschedule_event",
    "restore_execute",
    "restore_handler",
    "restore_spill_buffer",
    "runs_for_effect",
    "send_to_worker",
    "set_comm_addresses",
    "set_run_spec",
    "spilled_to_disk",
    "swap_state_class",
    "task_run_id",
    "undo_put_in_memory",
    "unwant_keys",
    "want_keys",
    "watch_graphs",
    "worker_task",
    "wrap_execute",
    "wrap_handler",
]

Execute = Callable[..., Awaitable[StateMachineEvent]]


# ------------------------------------------------------------------ scheduler: lanes


def make_lane(scheduler: Scheduler, address: str) -> WorkerState:
    """A scheduler ``WorkerState`` for a lane: paused and without threads, so that the
    scheduler never chooses it to run anything. The caller never adds it to
    ``scheduler.workers``, so broadcasts, heartbeats and dashboards never see it."""
    return WorkerState(
        address=address,
        status=Status.paused,
        pid=0,
        name=address,
        nthreads=0,
        memory_limit=0,
        local_directory="",
        nanny=None,
        server_id=address,
        scheduler=scheduler,
    )


def add_replica(scheduler: Scheduler, ts: TaskState, ws: WorkerState) -> None:
    """Record ``ws`` (a lane) as a holder of ``ts``."""
    scheduler.add_replica(ts, ws)


def remove_replica(scheduler: Scheduler, ts: TaskState, ws: WorkerState) -> None:
    scheduler.remove_replica(ts, ws)


def clear_lane(ws: WorkerState) -> None:
    """Forget every key a lane holds, without transitions (``Scheduler.restart`` forgets
    all tasks but only clears the real workers)."""
    ws._has_what.clear()
    ws.nbytes = 0


# ------------------------------------------------------------- scheduler: graph surgery


def put_in_memory(scheduler: Scheduler, ts: TaskState, nbytes: int, ws: WorkerState) -> None:
    """Make a released task ``memory``, held by ``ws`` only, without running it.

    Only from ``SchedulerPlugin.update_graph``, for a task that no transition has touched
    yet (state ``released``, no holders): its dependents then see it as a finished input.
    """
    ts.state = "memory"
    ts.set_nbytes(nbytes)
    scheduler.add_replica(ts, ws)


def undo_put_in_memory(scheduler: Scheduler, ts: TaskState, ws: WorkerState) -> None:
    """Undo :func:`put_in_memory`."""
    if ws in (ts.who_has or ()):
        scheduler.remove_replica(ts, ws)
    ts.state = "released"


def detach_dependencies(ts: TaskState) -> list[TaskState]:
    """Cut ``ts`` off from its dependencies; return them (to re-attach on failure)."""
    deps = list(ts.dependencies)
    for dts in deps:
        dts.dependents.discard(ts)
        if dts.waiters:
            dts.waiters.discard(ts)
    ts.dependencies.clear()
    return deps


def attach_dependencies(ts: TaskState, deps: Iterable[TaskState]) -> None:
    for dts in deps:
        ts.add_dependency(dts)


def set_run_spec(ts: TaskState, spec: Any) -> None:
    """Give a task that has not started another body (only from ``update_graph``, or after
    the body failed)."""
    ts.run_spec = spec


def task_run_id(ts: TaskState) -> int | None:
    """Which run of ``ts`` the scheduler waits for or holds: the ``run_id`` it sent with
    the task and that workers send back with its result."""
    return ts.run_id


def annotate(ts: TaskState, **annotations: Any) -> None:
    """Add annotations to a task the scheduler knows (workers see them with the task)."""
    ts.annotations = {**(ts.annotations or {}), **annotations}


def is_p2p_barrier(ts: TaskState) -> bool:
    """Whether ``ts`` is the barrier of a P2P shuffle (a private class of distributed)."""
    return isinstance(ts.run_spec, P2PBarrierTask)


def is_p2p_step_alias(ts: TaskState) -> bool:
    """Whether ``ts`` is an alias that graph fusion left between shuffle steps."""
    return isinstance(ts.run_spec, Alias)


def want_keys(scheduler: Scheduler, keys: Collection[Any], client: str) -> None:
    """Make ``client`` (a pseudo-client, created if needed, as ``fire_and_forget``'s)
    want ``keys``: the scheduler keeps them in memory until it releases them."""
    scheduler.client_desires_keys(keys, client)


def unwant_keys(scheduler: Scheduler, keys: Collection[Any], client: str, stimulus_id: str) -> None:
    """Undo :func:`want_keys` (runs transitions: never from a transition hook)."""
    if client in scheduler.clients:
        scheduler.client_releases_keys(list(keys), client, stimulus_id)


# ----------------------------------------------------------- scheduler: worker plugin


async def broadcast_worker_plugin(scheduler: Scheduler, name: str, data: bytes) -> dict[str, Any]:
    """What ``Scheduler.register_worker_plugin`` does, returning each worker's error
    instead of raising the first, so that a message can name every worker that failed."""
    scheduler.worker_plugins[name] = data  # for workers that join later
    responses: dict[str, Any] = await scheduler.broadcast(
        msg={"op": "plugin-add", "plugin": data, "name": name}, on_error="return"
    )
    return responses


def send_to_worker(scheduler: Scheduler, address: str, msg: dict[str, Any]) -> None:
    """Queue a stream message to a worker; sent with (and before) the messages the
    current transitions produce, which are queued once they are over."""
    stream = scheduler.stream_comms.get(address)
    if stream is not None:
        stream.send(msg)


# ------------------------------------------------------------------ scheduler: AMM


def amm_policies(scheduler: Scheduler) -> set[ActiveMemoryManagerPolicy] | None:
    """The active memory manager's policy set, or None without an AMM."""
    amm = scheduler.extensions.get("amm")
    return None if amm is None else amm.policies


def replace_amm_policy(
    scheduler: Scheduler,
    old: type[ActiveMemoryManagerPolicy],
    new: Callable[[], ActiveMemoryManagerPolicy] | None,
) -> None:
    """Replace every policy of exactly type ``old`` by ``new()`` (or just remove it)."""
    amm = scheduler.extensions.get("amm")
    if amm is None:
        return
    for policy in list(amm.policies):
        if type(policy) is old:
            amm.policies.discard(policy)
            if new is not None:
                amm.add_policy(new())


# ----------------------------------------------------------------------- worker


def wrap_execute(worker: Worker, wrapper: Callable[[Execute], Execute]) -> Execute:
    """Replace ``worker.execute`` by ``wrapper(original)``; return the original."""
    original: Execute = worker.execute
    worker.execute = wrapper(original)  # type: ignore[method-assign,assignment]
    return original


def restore_execute(worker: Worker, original: Execute) -> None:
    worker.execute = original  # type: ignore[method-assign,assignment]


def wrap_handler(
    worker: Worker, op: str, wrapper: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> Callable[..., Any]:
    """Replace the worker's RPC handler ``op`` (e.g. ``get_data``) by ``wrapper(original)``;
    ``Server`` looks handlers up in ``handlers`` per request. Return the original."""
    original: Callable[..., Any] = worker.handlers[op]
    worker.handlers[op] = wrapper(original)
    return original


def restore_handler(worker: Worker, op: str, original: Callable[..., Any]) -> None:
    worker.handlers[op] = original


def reschedule_event(key: Any, stimulus_id: str) -> StateMachineEvent:
    """What ``execute`` returns for a task that raised ``Reschedule``: the worker forgets
    the task and the scheduler assigns it again."""
    return RescheduleEvent(key=key, stimulus_id=stimulus_id)


def adopt_spill_buffer(worker: Worker, cls: type[SpillBuffer]) -> SpillBuffer | None:
    """Turn the worker's stock ``SpillBuffer`` into an instance of ``cls`` (a subclass
    adding no slots), in place: the worker, its state machine and its memory manager hold
    the same object. None if the worker has no ``SpillBuffer`` (no memory limit, or a
    ``data=`` of its own, as dask-cuda's)."""
    data = worker.memory_manager.data
    if type(data) is not SpillBuffer:
        return None
    data.__class__ = cls
    _rebind_eviction(data)
    return data


def restore_spill_buffer(data: SpillBuffer) -> None:
    """Undo :func:`adopt_spill_buffer`."""
    data.__class__ = SpillBuffer
    _rebind_eviction(data)


def spilled_to_disk(worker: Worker | None) -> tuple[int, int]:
    """Bytes (pickled) the worker's ``SpillBuffer`` holds on local disk now, and has
    written there since the worker started (its ``disk-write`` metric); zeros without one."""
    data = worker.data if worker is not None else None
    if not isinstance(data, SpillBuffer):
        return 0, 0
    now = SpillBuffer.spilled_total.fget(data).disk  # type: ignore[attr-defined]
    return int(now), int(data.cumulative_metrics.get(("disk-write", "bytes"), 0))


def _rebind_eviction(data: SpillBuffer) -> None:
    # zict's LRU calls the ``fast_to_slow`` bound when the Buffer was built: rebind it to
    # the new class's method.
    data.fast.on_evict = [data.fast_to_slow]


def execute_succeeded(event: StateMachineEvent) -> bool:
    return isinstance(event, ExecuteSuccessEvent)


def worker_task(worker: Worker, key: Any) -> WorkerTaskState | None:
    """The worker state machine's task for ``key``, unless it is an actor (actors live on
    their worker, as in stock Dask)."""
    if key in worker.state.actors:
        return None
    return worker.state.tasks.get(key)


def release_thread_slot(
    worker: Worker, ts: WorkerTaskState, duration: float, stimulus_id: str
) -> bool:
    """Let the next task compute while ``ts``'s result is written.

    Dask's own ``secede`` mechanism: the worker moves the task to ``long-running``, which
    frees its thread slot without reporting it finished. False if it is not executing.
    """
    if ts.state != "executing":
        return False
    worker.handle_stimulus(
        SecedeEvent(key=ts.key, compute_duration=duration, stimulus_id=stimulus_id)
    )
    return True


def finished_metadata(ts: WorkerTaskState) -> dict[str, Any]:
    """The metadata that travels with ``ts``'s task-finished message to the scheduler's
    ``SchedulerPlugin.transition(..., metadata=...)`` (``Scheduler.stimulus_task_finished``)."""
    return ts.metadata


class StoreFirstWorkerState(_WorkerState):
    """Fetch an input from a storage lane whenever one holds it and is not busy.

    A lane answers ``busy`` while the store does not answer (see
    :mod:`storage_scheduler.comm`); the worker then asks the scheduler for the key's
    holders again, and the peers among them are kept, so that the input comes from a
    peer instead of waiting for the store.
    """

    __slots__ = ()  # layout-compatible: installed by swapping ``__class__``

    def _update_who_has(self, who_has: Mapping[Any, Collection[str]]) -> None:
        busy = self.busy_workers
        super()._update_who_has(
            {k: [w for w in ws if is_lane(w) and w not in busy] or ws for k, ws in who_has.items()}
        )


class PeerFirstWorkerState(_WorkerState):
    """Fetch an input from a worker that holds it; from the store only if none does."""

    __slots__ = ()

    def _update_who_has(self, who_has: Mapping[Any, Collection[str]]) -> None:
        super()._update_who_has(
            {k: [w for w in ws if not is_lane(w)] or ws for k, ws in who_has.items()}
        )


def swap_state_class(worker: Worker, cls: type) -> type:
    """Give ``worker.state`` the class ``cls`` (same slots); return its former class."""
    original = type(worker.state)
    worker.state.__class__ = cls
    return original


def live_servers() -> tuple[list[Scheduler], list[Worker]]:
    """The schedulers and workers alive in this process (distributed's own weak sets),
    for the one Prometheus collector a process can register."""
    from distributed import Scheduler, Worker

    return list(Scheduler._instances), list(Worker._instances)


# ----------------------------------------------------------------------- comm


def set_comm_addresses(comm: Any, peer: str, local: str) -> None:
    """``distributed.comm.core.connect`` reads these two after the handshake."""
    comm._peer_addr = peer
    comm._local_addr = local
