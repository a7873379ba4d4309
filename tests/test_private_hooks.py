"""The private parts of distributed that storage_scheduler relies on, as it relies on them.

distributed is pinned to a tested range; when an upgrade changes one of these, this test
fails first and names the hook, instead of a cluster misbehaving somewhere later.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from typing import Any

import pytest

from distributed import Scheduler, Worker
from distributed import scheduler as scheduler_module
from distributed import worker_state_machine as wsm
from distributed.active_memory_manager import ActiveMemoryManagerExtension
from distributed.comm.core import Comm
from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin
from distributed.utils_test import async_poll_for, gen_cluster, gen_test, inc

from storage_scheduler import _compat


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
        (
            Scheduler.broadcast,
            ["self", "msg", "workers", "hosts", "nanny", "serializers", "on_error"],
        ),
        (Scheduler.unregister_worker_plugin, ["self", "comm", "name"]),
        # The task-finished metadata reaches SchedulerPlugin.transition through here.
        (
            Scheduler.stimulus_task_finished,
            ["self", "worker", "stimulus_id", "key", "run_id", "metadata", "kwargs"],
        ),
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
    from storage_scheduler._compat import PeerFirstWorkerState, StoreFirstWorkerState

    for cls in (StoreFirstWorkerState, PeerFirstWorkerState):
        assert cls.__slots__ == ()
        assert cls.__mro__[1] is wsm.WorkerState


def test_store_first_falls_back_to_peers_while_lanes_are_busy() -> None:
    """A lane that answered busy (store down) is skipped: the refreshed holders keep the
    peers, and the busy handler asks for that refresh when every known holder is busy."""
    from storage_scheduler._compat import StoreFirstWorkerState

    lane, peer = "storage://s-lane0", "tcp://127.0.0.1:2"
    state = wsm.WorkerState(address="tcp://127.0.0.1:1", validate=True)
    state.__class__ = StoreFirstWorkerState  # what swap_state_class does
    state.handle_stimulus(
        wsm.ComputeTaskEvent.dummy("y", who_has={"x": [lane, peer]}, stimulus_id="a")
    )
    assert state.tasks["x"].who_has == {lane}
    state.busy_workers.add(lane)
    state.handle_stimulus(wsm.RefreshWhoHasEvent(who_has={"x": [lane, peer]}, stimulus_id="b"))
    assert state.tasks["x"].who_has == {lane, peer}
    source = inspect.getsource(wsm.WorkerState._handle_gather_dep_busy)
    assert "busy_workers.add" in source and "RequestRefreshWhoHasMsg" in source


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


# ------------------------------------------- each function of storage_scheduler._compat


def test_every_compat_function_is_tested_here() -> None:
    """The compatibility module is the single door to distributed's internals: each of
    its functions must have a case in this file."""
    from storage_scheduler import _compat

    source = inspect.getsource(__import__(__name__, fromlist=["_"]))
    untested = [name for name in _compat.__all__ if f"_compat.{name}" not in source]
    assert not untested


@gen_cluster(client=True)
async def test_lane_replicas(c: Any, s: Scheduler, a: Worker, b: Worker) -> None:
    lane = _compat.make_lane(s, "storage://abc-lane0")
    assert lane.address not in s.workers and lane.status.name == "paused" and lane.nthreads == 0
    x = c.submit(inc, 1, key="x")
    await x
    ts = s.tasks["x"]
    _compat.add_replica(s, ts, lane)
    assert lane in ts.who_has and ts in lane.has_what and lane.nbytes == ts.nbytes
    _compat.remove_replica(s, ts, lane)
    assert lane not in ts.who_has and not lane.has_what
    _compat.add_replica(s, ts, lane)
    _compat.clear_lane(lane)
    assert not lane.has_what and lane.nbytes == 0
    # clear_lane is for Scheduler.restart, which forgets every task; here x lives on.
    ts.who_has.discard(lane)
    s.replicated_tasks.discard(ts)


@gen_cluster(client=True)
async def test_graph_surgery_in_update_graph(c: Any, s: Scheduler, a: Worker, b: Worker) -> None:
    seen: dict[str, Any] = {}
    lane = _compat.make_lane(s, "storage://abc-lane0")

    class Probe(SchedulerPlugin):
        def update_graph(self, scheduler: Scheduler, *, keys: set[Any], **kwargs: Any) -> None:
            if "top" not in scheduler.tasks:
                return
            dep, top = scheduler.tasks["dep"], scheduler.tasks["top"]
            seen["dep"] = dep.state
            _compat.put_in_memory(scheduler, dep, 8, lane)
            seen["in-memory"] = (dep.state, lane in dep.who_has, dep.nbytes)
            _compat.undo_put_in_memory(scheduler, dep, lane)
            seen["undone"] = (dep.state, bool(dep.who_has))
            spec = top.run_spec
            _compat.set_run_spec(top, None)
            _compat.set_run_spec(top, spec)
            _compat.annotate(top, storage=False)
            seen["annotated"] = top.annotations
            deps = _compat.detach_dependencies(top)
            seen["detached"] = (len(top.dependencies), top in dep.dependents, deps == [dep])
            _compat.attach_dependencies(top, deps)
            seen["attached"] = (top.dependencies == {dep}, top in dep.dependents)

    await s.register_scheduler_plugin(Probe(), name="probe", idempotent=False)
    from dask import delayed

    top = delayed(inc)(delayed(inc)(1, dask_key_name="dep"), dask_key_name="top")
    assert await c.compute(top) == 3
    assert seen == {
        "dep": "released",
        "in-memory": ("memory", True, 8),
        "undone": ("released", False),
        "annotated": {"storage": False},
        "detached": (0, False, True),
        "attached": (True, True),
    }


@gen_cluster(client=True)
async def test_graphs_are_watched_off_the_loop(c: Any, s: Scheduler, a: Worker, b: Worker) -> None:
    """update_graph materializes graphs through the module-level _materialize_graph in
    its offload thread, and the specs it returns become the tasks' run_specs."""
    from dask import annotate, delayed

    seen: dict[Any, Any] = {}
    threads: set[int] = set()

    def watcher(dsk: Any, annotations: Any) -> None:
        threads.add(threading.get_ident())
        seen.update(dsk)
        seen["annotations"] = {k: dict(v) for k, v in annotations.items()}

    unwatch = _compat.watch_graphs(watcher)
    try:
        with annotate(storage_version="v1"):
            dep = delayed(inc)(1, dask_key_name="dep")
        top = delayed(inc)(dep, dask_key_name="top")
        future = c.compute(top, optimize_graph=False)
        assert await future == 3
        assert threads and threading.get_ident() not in threads
        assert seen["annotations"]["storage_version"] == {"dep": "v1"}
        # The specs watched are the very objects the scheduler runs.
        await async_poll_for(lambda: "top" in s.tasks, 5)
        assert s.tasks["top"].run_spec is seen["top"]
    finally:
        unwatch()
    seen.clear()
    assert await c.submit(inc, 5, key="after") == 6
    assert "after" not in seen


@gen_cluster(client=True)
async def test_finalize_key_convention(c: Any, s: Scheduler, a: Worker, b: Worker) -> None:
    import dask.array as da

    await c.compute(da.ones(4, chunks=2))
    assert any(_compat.is_finalize_key(k) for k in s.tasks) or any(
        _compat.is_finalize_key(e) for e in c.futures
    )
    assert not _compat.is_finalize_key(("ones", 0))


def test_dask_writers_exist() -> None:
    """Every writer ``runs_for_effect`` names is where dask keeps it (the dataframe ones
    when dask.dataframe imports), and ``da.store`` runs one."""
    import pkgutil

    import numpy as np

    import dask.array as da

    from storage_scheduler._compat.conventions import DASK_WRITERS

    try:
        import dask.dataframe  # noqa: F401  (needs pyarrow)

        names = set(DASK_WRITERS)
    except ImportError:
        names = {n for n in DASK_WRITERS if not n.startswith("dask.dataframe")}
    assert {"dask.array.core.load_store_chunk", "dask.bag.core._to_textfiles_chunk"} <= names
    for name in names:
        found = pkgutil.resolve_name(name)
        assert f"{found.__module__}.{found.__qualname__}" == name
    stored = da.store(da.arange(4, chunks=2), np.zeros(4), lock=False, compute=False)
    graph = dict(stored.__dask_graph__())
    writes = [t for k, t in graph.items() if str(k[0]).startswith("store-map")]
    assert writes and all(_compat.runs_for_effect(t, ()) for t in writes)
    assert not any(_compat.runs_for_effect(t, ()) for t in graph.values() if t not in writes)


def test_p2p_step_recognition() -> None:
    from types import SimpleNamespace

    from dask._task_spec import Alias
    from distributed.shuffle._core import P2PBarrierTask

    barrier: Any = SimpleNamespace(run_spec=P2PBarrierTask("b", inc, 1, spec=None))
    alias: Any = SimpleNamespace(run_spec=Alias("a", "b"))
    assert _compat.is_p2p_barrier(barrier) and not _compat.is_p2p_barrier(alias)
    assert _compat.is_p2p_step_alias(alias) and not _compat.is_p2p_step_alias(barrier)


class Marker(WorkerPlugin):
    name = "marker"

    def setup(self, worker: Worker) -> None:
        worker.extensions["marker"] = True


@gen_cluster(client=True, nthreads=[("", 1)])
async def test_broadcast_worker_plugin(c: Any, s: Scheduler, a: Worker) -> None:
    from distributed.protocol.pickle import dumps

    responses = await _compat.broadcast_worker_plugin(s, "marker", dumps(Marker()))
    assert responses[a.address]["status"] == "OK" and a.extensions["marker"]
    async with Worker(s.address) as late:  # joins later: gets it too
        assert late.extensions["marker"]


@gen_cluster(config={"distributed.scheduler.active-memory-manager.start": True})
async def test_amm_policy_swap(s: Scheduler, a: Worker, b: Worker) -> None:
    from distributed.active_memory_manager import ReduceReplicas

    from storage_scheduler.scheduler.amm import LaneAwareReduceReplicas

    policies = _compat.amm_policies(s)
    assert policies is not None and {type(p) for p in policies} == {ReduceReplicas}
    _compat.replace_amm_policy(s, ReduceReplicas, LaneAwareReduceReplicas)
    assert {type(p) for p in policies} == {LaneAwareReduceReplicas}
    _compat.replace_amm_policy(s, LaneAwareReduceReplicas, None)
    assert not policies


@gen_cluster(client=True, nthreads=[("", 1)])
async def test_execute_wrapper_and_metadata(c: Any, s: Scheduler, a: Worker) -> None:
    events: list[bool] = []
    received: list[Any] = []

    def wrapper(original: Any) -> Any:
        async def execute(key: Any, *, stimulus_id: str) -> Any:
            event = await original(key, stimulus_id=stimulus_id)
            events.append(_compat.execute_succeeded(event))
            ts = _compat.worker_task(a, key)
            assert ts is not None
            _compat.finished_metadata(ts)["probe"] = key
            return event

        return execute

    class Receiver(SchedulerPlugin):
        def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
            if start == "processing" and finish == "memory":
                received.append((kwargs.get("metadata") or {}).get("probe"))

    await s.register_scheduler_plugin(Receiver(), name="receiver", idempotent=False)
    original = _compat.wrap_execute(a, wrapper)
    assert await c.submit(inc, 1, key="ok") == 2
    with pytest.raises(ZeroDivisionError):
        await c.submit(lambda: 1 / 0, key="bad")
    _compat.restore_execute(a, original)
    assert a.execute == original
    assert events == [True, False] and received == ["ok"]


@gen_cluster(client=True, nthreads=[("", 1)])
async def test_task_run_id_matches_the_workers(c: Any, s: Scheduler, a: Worker) -> None:
    """The scheduler's run id of a task is the one its worker's success event carries
    (write-behind notifications are matched by it), and a new run gets a new one."""
    seen: list[int] = []

    def wrapper(original: Any) -> Any:
        async def execute(key: Any, *, stimulus_id: str) -> Any:
            event = await original(key, stimulus_id=stimulus_id)
            seen.append(event.run_id)
            return event

        return execute

    original = _compat.wrap_execute(a, wrapper)
    x = c.submit(inc, 1, key="x")
    await x
    first = _compat.task_run_id(s.tasks["x"])
    assert seen == [first]
    del x
    await async_poll_for(lambda: "x" not in s.tasks, timeout=5)
    assert await c.submit(inc, 1, key="x") == 2
    assert seen[-1] == _compat.task_run_id(s.tasks["x"]) != first
    _compat.restore_execute(a, original)


@gen_cluster(client=True, nthreads=[("", 1)])
async def test_worker_task_skips_actors(c: Any, s: Scheduler, a: Worker) -> None:
    class Counter:
        n = 0

    actor = c.submit(Counter, actor=True, key="actor")
    await actor
    await c.submit(inc, 1, key="plain")
    assert _compat.worker_task(a, "actor") is None
    task = _compat.worker_task(a, "plain")
    assert task is not None and task.key == "plain"


@gen_cluster(client=True, nthreads=[("", 1)])
async def test_release_thread_slot(c: Any, s: Scheduler, a: Worker) -> None:
    """A task that released its slot is long-running: the next task starts at once."""
    released: list[bool] = []
    go = asyncio.Event()

    def wrapper(original: Any) -> Any:
        async def execute(key: Any, *, stimulus_id: str) -> Any:
            event = await original(key, stimulus_id=stimulus_id)
            if key == "first":
                ts = _compat.worker_task(a, key)
                assert ts is not None
                released.append(_compat.release_thread_slot(a, ts, 0.0, "test"))
                await go.wait()  # like a slow write
            return event

        return execute

    _compat.wrap_execute(a, wrapper)
    first = c.submit(inc, 1, key="first")
    assert await c.submit(inc, 2, key="second") == 3  # ran while "first" was held
    assert released == [True] and a.state.tasks["first"].state == "long-running"
    go.set()
    assert await first == 2


@gen_cluster(nthreads=[("", 1)])
async def test_state_class_swap(s: Scheduler, a: Worker) -> None:
    original = _compat.swap_state_class(a, _compat.StoreFirstWorkerState)
    assert type(a.state) is _compat.StoreFirstWorkerState and original is wsm.WorkerState
    _compat.swap_state_class(a, _compat.PeerFirstWorkerState)
    assert type(a.state) is _compat.PeerFirstWorkerState
    _compat.swap_state_class(a, original)
    assert type(a.state) is wsm.WorkerState


@gen_cluster(client=True)
async def test_comm_addresses_and_live_servers(c: Any, s: Scheduler, a: Worker, b: Worker) -> None:
    schedulers, workers = _compat.live_servers()
    assert s in schedulers and {a, b} <= set(workers)
    # The storage comm sets the two addresses connect() reads after the handshake.
    x = c.submit(inc, 1, key="x", workers=[a.address])
    await x

    class Bare:
        pass

    comm = Bare()
    _compat.set_comm_addresses(comm, peer="storage://p", local="storage://l")
    assert (comm._peer_addr, comm._local_addr) == ("storage://p", "storage://l")  # type: ignore[attr-defined]


RECEIVED: list[Any] = []


def saw_message_first(key: str) -> bool:
    return key in RECEIVED


@gen_cluster(client=True, nthreads=[("", 1)])
async def test_send_to_worker_ahead_of_the_task(c: Any, s: Scheduler, a: Worker) -> None:
    """A message queued from a transition hook reaches the worker before the task."""
    RECEIVED.clear()
    a.stream_handlers["probe-op"] = lambda key: RECEIVED.append(key)

    class Sender(SchedulerPlugin):
        def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
            if finish == "processing":
                ws = s.tasks[key].processing_on
                assert ws is not None
                _compat.send_to_worker(s, ws.address, {"op": "probe-op", "key": key})

    await s.register_scheduler_plugin(Sender(), name="sender", idempotent=False)
    assert await c.submit(saw_message_first, "t", key="t") is True


# ----------------------------------------------------------------------- dashboard


@gen_test()
async def test_bokeh_dashboard_hooks() -> None:
    """Dask's Bokeh server takes documents while it runs, serves them, lists individual
    ones in /individual-plots.json, and renders its pages with the shared menu lists."""
    import json

    from bokeh.models import Div
    from bokeh.themes import Theme
    from tornado.httpclient import AsyncHTTPClient

    def doc(d: Any) -> None:
        d.add_root(Div(text="hook"))
        d.title = "hook-test-title"

    async with Scheduler(dashboard_address="127.0.0.1:0") as s:
        server = _compat.bokeh_server(s)
        assert server is not None and "/status" in server.app_paths
        url = "/individual-hook-test"
        assert _compat.add_bokeh_applications(server, {url: doc}) == [url]
        assert _compat.add_bokeh_applications(server, {url: doc}) == []  # once
        menus = _compat.dashboard_menus(s)
        assert menus["pages"][0] == "status"
        assert {"url": "individual-workers-memory", "name": "Workers Memory"} in menus["plots"]
        menus["pages"].append("hook-page")

        http = AsyncHTTPClient()
        base = f"http://127.0.0.1:{s.http_server.port}"
        assert "hook-test-title" in (await http.fetch(base + url)).body.decode()
        plots = json.loads((await http.fetch(base + "/individual-plots.json")).body)
        assert plots["Individual Hook Test"] == url
        # The menu of Dask's own pages is the list extended above.
        assert 'href="hook-page"' in (await http.fetch(base + "/workers")).body.decode()

    theme, template = _compat.dashboard_look()
    assert isinstance(theme, Theme)
    page = template.render(pages=["a-page"], plots=[{"url": "a-plot", "name": "A"}])
    assert 'href="a-page"' in page and 'href="a-plot"' in page and "plot_div" not in page

    async with Scheduler(dashboard=False, dashboard_address="127.0.0.1:0") as s:
        assert _compat.bokeh_server(s) is None


@gen_cluster(client=True, nthreads=[("", 1)], worker_kwargs={"memory_limit": "1 GiB"})
async def test_spill_buffer_adoption(c: Any, s: Scheduler, a: Worker) -> None:
    """The worker, its state machine and its memory manager share one SpillBuffer, whose
    class can be swapped in place; zict's LRU calls the rebound fast_to_slow."""
    from distributed.spill import SpillBuffer

    from storage_scheduler.worker.spill import StoreSpillBuffer

    data = a.data
    assert type(data) is SpillBuffer and a.state.data is data and a.memory_manager.data is data
    assert _compat.adopt_spill_buffer(a, StoreSpillBuffer) is data
    assert type(a.state.data) is StoreSpillBuffer
    assert data.fast.on_evict == [data.fast_to_slow]
    assert StoreSpillBuffer.fast_to_slow is not SpillBuffer.fast_to_slow
    assert _compat.adopt_spill_buffer(a, StoreSpillBuffer) is None  # not stock any more
    _compat.restore_spill_buffer(data)
    assert type(data) is SpillBuffer and data.fast.on_evict == [data.fast_to_slow]
    # StoreSpillBuffer.spilled_total adds to the stock property.
    assert isinstance(SpillBuffer.__dict__["spilled_total"], property)


@gen_cluster(client=True, nthreads=[("", 1)])
async def test_handler_wrapping_and_reschedule(c: Any, s: Scheduler, a: Worker) -> None:
    """get_data is looked up per request; a task's RescheduleEvent sends it elsewhere."""
    from distributed.utils_test import slowinc

    calls: list[Any] = []

    def wrapper(original: Any) -> Any:
        async def get_data(comm: Any, keys: Any = (), **kwargs: Any) -> Any:
            calls.append(keys)
            return await original(comm, keys=keys, **kwargs)

        return get_data

    assert params(Worker.get_data) == ["self", "comm", "keys", "who", "serializers"]
    original = _compat.wrap_handler(a, "get_data", wrapper)
    x = c.submit(inc, 1, key="x")
    assert await c.gather(x, direct=True) == 2
    assert [list(k) for k in calls] == [["x"]]
    _compat.restore_handler(a, "get_data", original)
    assert a.handlers["get_data"] == original

    rescheduled = []

    def wrap(execute: Any) -> Any:
        async def once(key: Any, *, stimulus_id: str) -> Any:
            if not rescheduled:
                rescheduled.append(key)
                return _compat.reschedule_event(key, "test-reschedule")
            return await execute(key, stimulus_id=stimulus_id)

        return once

    original_execute = _compat.wrap_execute(a, wrap)
    try:
        assert await c.submit(slowinc, 1, delay=0, key="y") == 2
    finally:
        _compat.restore_execute(a, original_execute)
    assert rescheduled == ["y"]


@gen_cluster(client=True, nthreads=[("", 1)], worker_kwargs={"memory_limit": "1 GiB"})
async def test_spilled_to_disk(c: Any, s: Scheduler, a: Worker) -> None:
    """The SpillBuffer's bytes on disk, and its cumulative disk-write metric."""
    assert _compat.spilled_to_disk(a) == (0, 0)
    x = c.submit(bytes, 1000, key="x")
    await x
    assert a.data.evict() > 0  # type: ignore[attr-defined]
    now, written = _compat.spilled_to_disk(a)
    assert now > 0 and written == now
    assert _compat.spilled_to_disk(None) == (0, 0)


@gen_cluster(client=True, nthreads=[("", 1)])
async def test_pseudo_client_keeps_keys(c: Any, s: Scheduler, a: Worker) -> None:
    """A key a pseudo-client wants stays in memory after its dependents are done, until
    the pseudo-client releases it."""
    x = c.submit(inc, 1, key="x")
    await x
    _compat.want_keys(s, ["x"], "pseudo")
    y = c.submit(inc, x, key="y")
    await y
    del x
    await asyncio.sleep(0.1)
    assert s.tasks["x"].state == "memory"
    _compat.unwant_keys(s, ["x"], "pseudo", "test")
    await async_poll_for(lambda: s.tasks["x"].state == "released", timeout=5)
    _compat.unwant_keys(s, ["x"], "unknown-client", "test")  # no such client: nothing
