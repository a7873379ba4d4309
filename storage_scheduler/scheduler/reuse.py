"""Reuse: a stored result stands in for the task that produced it.

When a graph arrives, the walk down from the requested keys stops at keys whose stored
result was produced by the same task (equal tokens, see
:func:`~storage_scheduler._protocol.result_token`): their upstream subgraph never runs.

Planning is a pure function (:func:`plan_reuse`) of the tasks, the requested keys, the
catalog and a token function, tested without a cluster. Applying a plan is graph surgery
through :mod:`storage_scheduler._compat`, done in one step that is undone if any part of
it fails (``update_graph`` exceptions are only logged by distributed: a half-applied
rewrite would otherwise fail silently):

* a stored key nobody asked for is put in memory at once, held by its lane;
* a requested stored key gets a small task that loads it from the store (the stock code
  has already recommended it for computation before the hook runs, so it cannot be put
  in memory here). If loading fails, the original task and its dependencies come back.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import (
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
    MutableMapping,
    Sequence,
)
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Protocol

from dask._task_spec import Task
from distributed.scheduler import TaskState

from storage_scheduler import _compat
from storage_scheduler._protocol import result_token
from storage_scheduler._threads import in_slices
from storage_scheduler.scheduler.sources import SOURCES_ANNOTATION, annotate_sources
from storage_scheduler.store.catalog import Catalog, Entry
from storage_scheduler.tokens import task_token
from storage_scheduler.worker.reader import load_stored

if TYPE_CHECKING:
    from distributed import Scheduler

    from storage_scheduler.scheduler.lanes import Lanes

__all__ = ["PlannedTask", "Reuse", "ReusePlan", "TaskTokens", "mark_p2p_steps", "plan_reuse"]

logger = logging.getLogger(__name__)

#: Seconds a token computed ahead waits for its graph to be planned: materializing and
#: ordering a graph happen between the two.
AHEAD_KEPT = 300.0


class PlannedTask(Protocol):
    """What planning reads of a scheduler ``TaskState``."""

    @property
    def key(self) -> Any: ...
    @property
    def state(self) -> str: ...
    @property
    def run_spec(self) -> Any: ...
    @property
    def annotations(self) -> Mapping[str, Any] | None: ...
    @property
    def dependencies(self) -> Collection[PlannedTask]: ...


@dataclass
class ReusePlan:
    """What to take from the store instead of computing."""

    #: Stored keys no client asked for: put in memory with their object size, never run.
    in_memory: dict[Any, int] = field(default_factory=dict)
    #: Requested stored keys: each gets a task that loads its result.
    loaders: list[Any] = field(default_factory=list)
    #: Stored keys whose results were all produced by other code: computed.
    stale: list[Any] = field(default_factory=list)
    #: The token of the stored result chosen for each reused key: it names the object.
    tokens: dict[Any, str | None] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.in_memory) + len(self.loaders)


def plan_reuse(
    keys: Iterable[Any],
    tasks: Mapping[Any, PlannedTask],
    stored: Callable[[Any], Sequence[Entry]],
    token: Callable[[PlannedTask], str],
    compared: Callable[[Entry], str | None] = attrgetter("token"),
) -> ReusePlan:
    """Which stored results can stand in for tasks of a new graph.

    Parameters
    ----------
    keys
        The keys a client asked for.
    tasks
        Every task the scheduler knows, by key.
    stored
        The stored results (catalog entries) of a key: one per token it was stored with.
    token
        The token a stored result of a task must carry to be reused.
    compared
        The token of an entry that ``token`` is compared with.

    Tasks the cluster already knows (not ``released``) and scattered data follow the stock
    rules; so do tasks annotated ``storage=False``.
    """
    requested = set(keys)
    plan = ReusePlan()
    seen: set[Any] = set()
    stack = list(requested)
    while stack:
        key = stack.pop()
        if key in seen:
            continue
        seen.add(key)
        ts = tasks.get(key)
        if ts is None or ts.state != "released" or ts.run_spec is None:
            continue
        versions = stored(key)
        if versions and (ts.annotations or {}).get("storage") is not False:
            wanted = token(ts)
            entry = next((e for e in versions if compared(e) == wanted), None)
            if entry is not None:
                if key in requested:
                    plan.loaders.append(key)
                else:
                    plan.in_memory[key] = entry.nbytes
                plan.tokens[key] = entry.token
                continue
            plan.stale.append(key)
        stack.extend(dts.key for dts in ts.dependencies)
    return plan


class TaskTokens:
    """The tokens the scheduler compares and records.

    Parameters
    ----------
    version
        ``storage-scheduler.version``.
    lineage
        Whether a token also covers the tokens of everything upstream.
    catalog
        Where the tokens of stored dependencies are found when a result is recorded.
    held
        The token of the stored result of a key the cluster holds, if any.
    sources
        The ``storage_sources`` annotation of a key the scheduler has, if any.
    """

    def __init__(
        self,
        version: str | None,
        lineage: bool,
        catalog: Catalog,
        held: Callable[[Any], str | None] = lambda key: None,
        sources: Callable[[Any], Iterable[str] | None] = lambda key: None,
    ):
        self.version = version
        self.lineage = lineage
        self.catalog = catalog
        self.held = held
        self.sources = sources
        #: Tokens computed ahead, by ``id`` of the spec: the spec (kept alive, so that its
        #: id stays its own), the annotations assumed (see ``_salt_of``), the token, and
        #: when.
        self._ahead: dict[int, tuple[Any, Any, str, float]] = {}

    def own(self, ts: PlannedTask) -> str:
        spec, salt = ts.run_spec, _salt_of(ts.annotations)
        ahead = self._ahead.pop(id(spec), None)
        if ahead is not None and ahead[0] is spec and ahead[1] == salt:
            return ahead[2]
        return result_token(spec, self.version, ts.annotations)

    def ahead(self, dsk: Mapping[Any, Any], annotations: MutableMapping[str, Any]) -> None:
        """Compute the tokens of a new graph's stored keys before its tasks exist, in the
        thread that materialized it (see :func:`storage_scheduler._compat.watch_graphs`):
        planning on the event loop then only compares them.

        The ``storage_version`` annotations known here are the graph's own; a task that
        ends up with another (set for the whole computation) is tokenized again.
        ``storage_sources`` are added here first (see :mod:`.sources`).
        """
        annotate_sources(dsk, annotations, self.sources)
        if not len(self.catalog):
            return
        now = time.monotonic()
        stored = [(key, spec) for key, spec in dsk.items() if key in self.catalog]
        for part in in_slices(stored, 64):  # ~10 us per token
            for key, spec in part:
                own = {a: annotations[a][key] for a in _SALTS if key in annotations.get(a, {})}
                token = result_token(spec, self.version, own)
                self._ahead[id(spec)] = (spec, _salt_of(own), token, now)

    def forget_ahead(self, older_than: float = AHEAD_KEPT) -> None:
        """Drop tokens computed ahead for tasks never planned (graphs cancelled, culled,
        or another scheduler's in this process)."""
        if self._ahead:
            cutoff = time.monotonic() - older_than
            for spec_id, ahead in list(self._ahead.items()):
                if ahead[3] < cutoff:
                    self._ahead.pop(spec_id, None)

    def wanted(self, ts: PlannedTask, memo: dict[Any, str]) -> str:
        """The token a stored result of ``ts`` must carry to be reused (kept in ``memo``)."""
        if self.lineage:
            return self._lineage(ts, memo)
        token = memo.get(ts.key)
        if token is None:
            token = memo[ts.key] = self.own(ts)
        return token

    def compared(self, entry: Entry) -> str | None:
        """The token of a stored result that :meth:`wanted` is compared with."""
        return entry.lineage if self.lineage else entry.token

    def recorded(self, ts: PlannedTask, worker_token: str) -> str | None:
        """The lineage token to record for a result a worker stored with ``worker_token``
        (None without ``lineage``)."""
        if not self.lineage:
            return None
        return self._lineage(ts, {}, own=worker_token, use_catalog=True)

    def _lineage(
        self,
        root: PlannedTask,
        memo: dict[Any, str],
        own: str | None = None,
        use_catalog: bool = False,
    ) -> str:
        """The token of ``root`` combined with those of everything upstream of it.

        When a graph asks to reuse a result, it is computed from the new graph's specs.
        When a result is stored (``use_catalog``), the dependencies that were stored carry
        theirs in the catalog already, and ``own`` is the token the worker computed.
        Iterative, not recursive: graphs can be deeper than Python's recursion limit.
        """

        def known(dts: PlannedTask) -> str | None:
            if use_catalog:
                entry = self.catalog.get(dts.key, self.held(dts.key))
                if entry is not None and entry.lineage is not None:
                    return entry.lineage
            if dts.run_spec is None:
                return f"data:{dts.key!r}"  # scattered data: known by its key only
            return memo.get(dts.key)

        stack = [root]
        while stack:
            ts = stack[-1]
            pending = [dts for dts in ts.dependencies if known(dts) is None]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            parts = tuple(known(dts) for dts in sorted(ts.dependencies, key=lambda d: str(d.key)))
            base = own if ts is root and own is not None else self.own(ts)
            memo[ts.key] = task_token(None, (base, parts))
        return memo[root.key]


#: The annotations that are part of a token (see :func:`result_token`).
_SALTS = ("storage_version", SOURCES_ANNOTATION)


def _salt_of(annotations: Mapping[str, Any] | None) -> tuple[Any, ...]:
    """What of a task's annotations its token depends on, to compare (per stored key
    planned: no loop)."""
    if not annotations:
        return _NO_SALT
    return (annotations.get("storage_version"), annotations.get(SOURCES_ANNOTATION))


_NO_SALT = (None, None)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """No garbage collection while a plan is made and applied.

    Both allocate a few objects per stored key (the token walk, replica sets), which on a
    scheduler holding millions of objects triggers full collections of the whole heap:
    a third of the time of planning 100k keys. Refcounting frees what the step drops;
    the collector runs once afterwards, as it would have.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def mark_p2p_steps(tasks: Mapping[Any, TaskState], keys: Iterable[Any]) -> None:
    """Annotate the transfers and barrier of every new P2P shuffle ``storage=False``.

    They are steps of distributed's shuffle service, not results: a transfer hands its
    input to the service and returns a run id, the barrier waits for every transfer.
    "Reused" on their own, without the run they fed, they would leave the shuffle's
    outputs incomplete. The outputs themselves are ordinary results, stored and reused;
    reusing them makes the whole shuffle unnecessary. Transfers are found as the
    barrier's dependencies, through the aliases that graph fusion leaves in between.
    """
    for key in keys:
        ts = tasks.get(key)
        if ts is None or not _compat.is_p2p_barrier(ts):
            continue
        steps = [ts]
        while steps:
            step = steps.pop()
            _compat.annotate(step, storage=False)
            if step is ts or _compat.is_p2p_step_alias(step):
                steps.extend(step.dependencies)


class Reuse:
    """Applies reuse plans to the scheduler and looks after the loader tasks.

    Notes
    -----
    Runs on the scheduler's event loop, inside plugin hooks; no I/O.
    """

    scheduler: Scheduler
    lanes: Lanes
    catalog: Catalog
    tokens: TaskTokens
    #: Keys taken from the store instead of being computed, since start.
    reused_total: int
    #: Requested keys running as loaders: their own spec and dependencies, kept so that
    #: they can be computed after all if loading fails, and the token they load.
    loaders: dict[Any, tuple[Any, list[TaskState], str | None]]
    #: Loaders whose store did not answer: rescheduled as loaders, not computed.
    retrying: set[Any]

    def __init__(self, scheduler: Scheduler, lanes: Lanes, catalog: Catalog, tokens: TaskTokens):
        self.scheduler = scheduler
        self.lanes = lanes
        self.catalog = catalog
        self.tokens = tokens
        self.reused_total = 0
        self.loaders = {}
        self.retrying = set()

    def on_update_graph(self, keys: Collection[Any]) -> dict[Any, str | None]:
        """Reuse what can be reused for a new graph; return the tokens of the stored
        results that stand in for tasks, by key."""
        self.tokens.forget_ahead()
        if not len(self.catalog):
            return {}
        memo: dict[Any, str] = {}
        token: Callable[[PlannedTask], str] = self.tokens.own  # each key is planned once
        if self.tokens.lineage:
            token = partial(self.tokens.wanted, memo=memo)
        with _gc_paused():
            plan = plan_reuse(
                keys, self.scheduler.tasks, self.catalog.versions, token, self.tokens.compared
            )
            # Stale results (other code's) stay: they are other versions, other objects.
            if plan and self.apply(plan):
                return plan.tokens
        return {}

    def apply(self, plan: ReusePlan) -> bool:
        """Apply ``plan`` entirely, or not at all (then everything is computed)."""
        tasks, in_memory, loaders = self.scheduler.tasks, [], []
        try:
            for key, nbytes in plan.in_memory.items():
                ts, lane = tasks[key], self.lanes.lane_for(key)
                _compat.put_in_memory(self.scheduler, ts, nbytes, lane)
                in_memory.append((ts, lane))
                # Readers must find the object this task would write now, nothing else.
                self.lanes.remember(key, plan.tokens[key])
            for key in plan.loaders:
                self._make_loader(tasks[key], plan.tokens[key])
                loaders.append(key)
        except Exception:
            for key in reversed(loaders):
                self._restore(key)
            for ts, lane in reversed(in_memory):
                self.lanes.remember(ts.key, None)
                _compat.undo_put_in_memory(self.scheduler, ts, lane)
            logger.exception("Could not reuse %d stored results; computing them instead", len(plan))
            return False
        self.reused_total += len(plan)
        logger.info("Reusing %d stored results instead of computing them", len(plan))
        return True

    def _make_loader(self, ts: TaskState, token: str | None) -> None:
        """Give a requested stored key a body that loads it, and no dependencies."""
        self.loaders[ts.key] = (ts.run_spec, _compat.detach_dependencies(ts), token)
        _compat.set_run_spec(ts, Task(ts.key, load_stored, ts.key, token))

    def _restore(self, key: Any) -> None:
        spec, deps, _ = self.loaders.pop(key)
        ts = self.scheduler.tasks[key]
        _compat.set_run_spec(ts, spec)
        _compat.attach_dependencies(ts, [d for d in deps if d.key in self.scheduler.tasks])

    def load_again(self, keys: Iterable[Any]) -> None:
        """These loaders are about to fail because the store did not answer: keep them
        (rescheduled, they load again) rather than computing what the store holds."""
        self.retrying.update(k for k in keys if k in self.loaders)

    def loader_failed(self, key: Any) -> None:
        """Loading failed (or its worker died): make the key a normal task again, unless
        the store merely did not answer. The catalog entry stays either way: an object
        found missing or damaged was reported (and discarded) before the failure."""
        if key in self.retrying:
            self.retrying.discard(key)
            logger.debug("Loading %r again: the store did not answer", key)
        elif key in self.loaders:
            self._restore(key)
            logger.info("Computing %r: its stored result could not be loaded", key)

    def forgotten(self, key: Any) -> None:
        self.loaders.pop(key, None)
        self.retrying.discard(key)

    def loader_finished(self, key: Any) -> None:
        """The result is loaded: the key becomes its original task again, in memory, like
        a stored key reused unloaded. If its object is lost later, it is computed."""
        if key in self.loaders:
            self._restore(key)
