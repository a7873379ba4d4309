"""Reuse planning as a pure function: no cluster, no store."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dask._task_spec import Task, TaskRef

from storage_scheduler import Store
from storage_scheduler._protocol import result_token
from storage_scheduler.scheduler.reuse import ReusePlan, TaskTokens, plan_reuse
from storage_scheduler.store.catalog import Catalog, Entry


def inc(x: int) -> int:
    return x + 1


def add(x: int, y: int) -> int:
    return x + y


@dataclass(eq=False)
class FakeTask:
    """What the planner reads of a scheduler TaskState."""

    key: Any
    run_spec: Any
    state: str = "released"
    annotations: Mapping[str, Any] | None = None
    dependencies: list[FakeTask] = field(default_factory=list)


def chain() -> dict[Any, FakeTask]:
    """a -> b -> c, and d = a + c."""
    a = FakeTask("a", Task("a", inc, 1))
    b = FakeTask("b", Task("b", inc, TaskRef("a")), dependencies=[a])
    c = FakeTask("c", Task("c", inc, TaskRef("b")), dependencies=[b])
    d = FakeTask("d", Task("d", add, TaskRef("a"), TaskRef("c")), dependencies=[a, c])
    return {t.key: t for t in (a, b, c, d)}


def token(ts: Any) -> str:
    return result_token(ts.run_spec, None, ts.annotations)


def catalog_of(tasks: Mapping[Any, FakeTask], *keys: Any, tokens: Mapping[Any, str] = {}) -> Any:
    entries = {k: Entry(tokens.get(k, token(tasks[k])), 100 + i, 0.0) for i, k in enumerate(keys)}
    return lambda key: (entries[key],) if key in entries else ()


def test_nothing_stored() -> None:
    tasks = chain()
    plan = plan_reuse(["d"], tasks, catalog_of(tasks), token)
    assert plan == ReusePlan()
    assert len(plan) == 0


def test_everything_stored() -> None:
    tasks = chain()
    plan = plan_reuse(["d"], tasks, catalog_of(tasks, *tasks), token)
    # The requested key is loaded; nothing under it is even looked at.
    assert plan.loaders == ["d"] and plan.in_memory == {} and plan.stale == []


def test_stored_key_under_unstored_one() -> None:
    tasks = chain()
    plan = plan_reuse(["d"], tasks, catalog_of(tasks, "b"), token)
    # d and c are computed; b stands in for its subgraph (a is still needed by d).
    assert plan.in_memory == {"b": 100}
    assert plan.loaders == []


def test_requested_stored_key() -> None:
    tasks = chain()
    plan = plan_reuse(["c", "d"], tasks, catalog_of(tasks, "c"), token)
    assert plan.loaders == ["c"]
    assert plan.in_memory == {}


def test_token_mismatch_is_stale_and_walked_through() -> None:
    tasks = chain()
    stored = catalog_of(tasks, "c", "a", tokens={"c": "someone-else's"})
    plan = plan_reuse(["d"], tasks, stored, token)
    assert plan.stale == ["c"]
    # Below the stale key the walk goes on: a is still reused.
    assert plan.in_memory == {"a": 101}


def test_the_version_with_the_wanted_token_is_chosen() -> None:
    tasks = chain()
    mine = Entry(token(tasks["c"]), 7, 0.0)
    versions = {"c": (Entry("other-code", 5, 0.0), mine)}
    plan = plan_reuse(["d"], tasks, lambda k: versions.get(k, ()), token)
    assert plan.in_memory == {"c": 7} and plan.tokens == {"c": mine.token}


def test_changed_code_does_not_match() -> None:
    tasks = chain()
    stored = catalog_of(tasks, "c")
    tasks["c"].run_spec = Task("c", add, TaskRef("b"), 1)  # edited since it was stored
    plan = plan_reuse(["d"], tasks, stored, token)
    assert plan.stale == ["c"] and plan.in_memory == {}


def test_storage_false_and_known_tasks_follow_stock_rules() -> None:
    tasks = chain()
    tasks["c"].annotations = {"storage": False}
    tasks["a"].state = "memory"  # the cluster already has it
    plan = plan_reuse(["d"], tasks, catalog_of(tasks, "a", "c"), token)
    assert plan == ReusePlan()


def test_scattered_data_is_not_planned() -> None:
    tasks = chain()
    tasks["a"].run_spec = None
    plan = plan_reuse(["d"], tasks, catalog_of(tasks, "b"), token)
    assert plan.in_memory == {"b": 100}
    assert "a" not in plan.in_memory and "a" not in plan.loaders


def test_deep_graph_does_not_recurse() -> None:
    prev = FakeTask(0, Task(0, inc, 0))
    tasks = {0: prev}
    for i in range(1, 5000):
        prev = FakeTask(i, Task(i, inc, TaskRef(i - 1)), dependencies=[prev])
        tasks[i] = prev
    plan = plan_reuse([4999], tasks, catalog_of(tasks, 10), token)
    assert plan.in_memory == {10: 100}


def test_tokens_computed_ahead_are_used_only_for_their_own_spec_and_version() -> None:
    """A token computed as the graph was materialized stands in for the task's own only
    when the task has that very spec and the storage_version it assumed."""
    store = Store.from_url("memory://reuse-plan-ahead")
    try:
        catalog = Catalog(store)
        dsk = {"a": Task("a", inc, 1), "b": Task("b", inc, 2)}
        catalog.add("a", "whatever", 8)  # only stored keys are tokenized ahead
        tokens = TaskTokens(None, False, catalog)
        tokens.ahead(dsk, {"storage_version": {"a": "v1"}})
        assert [spec for spec, *_ in tokens._ahead.values()] == [dsk["a"]]
        v1 = FakeTask("a", dsk["a"], annotations={"storage_version": "v1"})
        assert tokens.own(v1) == result_token(dsk["a"], None, {"storage_version": "v1"})
        assert not tokens._ahead  # used once

        # The computation's annotations gave the task another version: tokenized again.
        tokens.ahead(dsk, {"storage_version": {"a": "v1"}})
        v2 = FakeTask("a", dsk["a"], annotations={"storage_version": "v2"})
        assert tokens.own(v2) == result_token(dsk["a"], None, {"storage_version": "v2"})
        # An equal spec that is another object is tokenized on its own.
        tokens.ahead(dsk, {})
        other = FakeTask("a", Task("a", inc, 1))
        assert tokens.own(other) == token(other)
        assert len(tokens._ahead) == 1
        tokens.forget_ahead(older_than=0.0)
        assert not tokens._ahead
    finally:
        store.close()
