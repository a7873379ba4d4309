"""A Hypothesis state machine over the lifecycle: two real clusters share one store; they
compute, hold, release, maintain (catalog flush, lease, deletions), crash and restart, in
any order, closing mid-round too. Invariant: every result a run asked for, and every
result a live cluster holds, has its object in the store; so has every result the store's
catalog lists.

Each rule drives a real in-process scheduler, worker and client on one event loop that
runs only inside the rules: background maintenance happens at ``maintain`` (and while a
computation runs), never behind the machine's back.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from typing import Any

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import dask
from dask import delayed
from distributed import Client, Scheduler, Worker

from storage_scheduler import Store
from storage_scheduler.comm import registry
from storage_scheduler.scheduler.plugin import StorageSchedulerPlugin
from storage_scheduler.store.catalog import Catalog
from tests.utils import async_poll_until, enable_storage


def inc(x: int) -> int:
    return x + 1


def neg(x: int) -> int:
    return -x


def double(x: int) -> int:
    return 2 * x


def triple(x: int) -> int:
    return 3 * x


CODE = {"double": double, "triple": triple}
KEYS = [0, 1, 2]


class Cluster:
    """One in-process cluster: scheduler, one worker, a client."""

    def __init__(self, url: str):
        self.url = url
        self.stack = contextlib.AsyncExitStack()
        #: Futures the client holds, with the (key, token) of their stored results.
        self.held: dict[str, tuple[Any, str | None]] = {}
        self.codes: dict[str, str] = {}

    async def start(self) -> Cluster:
        s = await self.stack.enter_async_context(Scheduler(dashboard_address=":0"))
        self.scheduler = s
        self.plugin: StorageSchedulerPlugin = await enable_storage(s, self.url)
        await self.stack.enter_async_context(Worker(s.address, nthreads=1))
        # Not a context manager: each rule runs in a task of its own (a context of its own).
        self.client = await Client(s.address, asynchronous=True, set_as_default=False)
        self.stack.push_async_callback(self.client.close)
        return self

    def graph(self, k: int, code: str) -> Any:
        x = delayed(inc)(k, dask_key_name=f"x-{k}")
        return delayed(CODE[code])(x, dask_key_name=f"y-{k}")

    async def compute_on_top(self, k: int, code: str) -> tuple[str, str | None]:
        """z = -y: here y, which another run may have asked for, is an intermediate."""
        if f"y-{k}" in self.held:
            return await self.compute(k, code, hold=False)  # see compute
        # z's token names y by key (lineage: false): z of other code is another key.
        z = delayed(neg)(self.graph(k, code), dask_key_name=f"z-{k}-{code}")
        future = self.client.compute(z)
        assert await future == -CODE[code](k + 1)
        token = self.plugin.lanes.tokens.get(future.key)
        await self.forget([future])
        return z.key, token

    async def compute(self, k: int, code: str, hold: bool) -> tuple[str, str | None]:
        # A key in memory is its value, whatever the graph says (stock Dask): while held,
        # a key is only computed with the code it was computed with.
        code = self.codes.get(f"y-{k}", code) if f"y-{k}" in self.held else code
        self.codes[f"y-{k}"] = code
        future = self.client.compute(self.graph(k, code))
        got = await future
        assert got == CODE[code](k + 1), (k, code, got, self.plugin.reuse.reused_total)
        token = self.plugin.lanes.tokens.get(future.key)
        if hold:
            self.held[future.key] = (future, token)
        elif future.key not in self.held:
            await self.forget([future])
        return f"y-{k}", token

    async def release(self) -> None:
        await self.forget([future for future, _ in self.held.values()])
        self.held.clear()

    async def forget(self, futures: list[Any]) -> None:
        """Release ``futures`` now (not whenever the garbage collector gets to them) and
        wait until the scheduler forgot them: a key still in memory would be the value of
        the next graph with that key, whatever its code (stock Dask)."""
        keys = [f.key for f in futures]
        await self.client.cancel(futures)
        await async_poll_until(
            lambda: not any(k in self.scheduler.tasks for k in keys), what="keys forgotten"
        )

    async def stop(self, crash: bool) -> None:
        if crash:
            # What SIGKILL does: no last flush, no lease removal, nothing more written.
            await self.plugin.retention.stop()
            self.plugin.started = False
            registry.unregister(self.plugin.store_id, self.plugin.store)
        self.held.clear()
        await self.stack.aclose()


@settings(
    max_examples=20,
    stateful_step_count=15,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    # Real clusters: shrinking a failure would take many minutes; report it as found.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
class LifecycleMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = tempfile.TemporaryDirectory()
        self.url = f"{self.tmp.name}/store"
        self.config = dask.config.set(
            {"storage-scheduler.flush-interval": "1h", "distributed.scheduler.validate": True}
        )
        self.config.__enter__()
        self.store = Store.from_url(self.url)
        self.clusters = [self.run(Cluster(self.url).start()) for _ in range(2)]
        #: Every (key, token) a run asked for: never deleted but by ``dask storage gc``.
        #: A request is recorded in the catalog at the cluster's next round: a cluster
        #: killed before then never recorded it (see "Partial writes" in the README).
        self.requested: set[tuple[str, str | None]] = set()
        #: Requests of each cluster since its last round.
        self.unrecorded: list[set[tuple[str, str | None]]] = [set(), set()]

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    @rule(i=st.integers(0, 1), k=st.sampled_from(KEYS), code=st.sampled_from(sorted(CODE)))
    def compute(self, i: int, k: int, code: str) -> None:
        self.unrecorded[i].add(self.run(self.clusters[i].compute(k, code, hold=False)))

    @rule(i=st.integers(0, 1), k=st.sampled_from(KEYS), code=st.sampled_from(sorted(CODE)))
    def persist(self, i: int, k: int, code: str) -> None:
        self.unrecorded[i].add(self.run(self.clusters[i].compute(k, code, hold=True)))

    @rule(i=st.integers(0, 1), k=st.sampled_from(KEYS), code=st.sampled_from(sorted(CODE)))
    def compute_on_top(self, i: int, k: int, code: str) -> None:
        self.unrecorded[i].add(self.run(self.clusters[i].compute_on_top(k, code)))

    def recorded(self, i: int) -> None:
        """Cluster ``i`` wrote its catalog changes: its requests are on record."""
        self.requested |= self.unrecorded[i]
        self.unrecorded[i] = set()

    @rule(i=st.integers(0, 1))
    def release(self, i: int) -> None:
        self.run(self.clusters[i].release())

    @rule()
    def tick(self) -> None:
        """A flush interval passes: every cluster's background round (lease, deletions,
        catalog), in either order."""
        for i, cluster in enumerate(self.clusters):
            self.run(cluster.plugin.retention.update_lease())
            self.run(cluster.plugin.retention.maintain())
            self.recorded(i)

    @rule(i=st.integers(0, 1), crash=st.booleans())
    def restart(self, i: int, crash: bool) -> None:
        if not crash:
            # Closing waits for the other clusters' next round before its last deletions.
            self.clusters[i].plugin.retention.close_wait = 0
            other = self.clusters[1 - i]
            self.run(other.plugin.retention.update_lease())
            self.run(other.plugin.retention.maintain())
            self.recorded(1 - i)
            self.recorded(i)  # by the close
        self.unrecorded[i] = set()  # killed: never recorded
        self.run(self.clusters[i].stop(crash))
        self.clusters[i] = self.run(Cluster(self.url).start())

    @rule(i=st.integers(0, 1), steps=st.integers(0, 12))
    def restart_mid_round(self, i: int, steps: int) -> None:
        """Close a scheduler while a background round is under way: closing stops it
        wherever it is (``steps`` passes of the event loop after it began)."""
        cluster, other = self.clusters[i], self.clusters[1 - i]
        # What closing waits for (close_wait): the other cluster's next round.
        cluster.plugin.retention.close_wait = 0
        self.run(other.plugin.retention.update_lease())
        self.run(other.plugin.retention.maintain())
        self.recorded(1 - i)

        async def stop_mid_round() -> None:
            round_ = asyncio.ensure_future(cluster.plugin.retention.maintain())
            cluster.plugin.retention._tasks.append(round_)  # stopped by the close
            for _ in range(steps):
                await asyncio.sleep(0)
            await cluster.stop(crash=False)

        self.run(stop_mid_round())
        self.recorded(i)  # by the close
        self.clusters[i] = self.run(Cluster(self.url).start())

    @invariant()
    def results_have_objects(self) -> None:
        paths = set(self.run(self.store.find("objects")))
        for key, token in self.requested.union(*self.unrecorded):
            assert self.store.path(key, token) in paths, f"asked for {key} lost"
        for i, cluster in enumerate(self.clusters):
            for key, (_, token) in cluster.held.items():
                assert self.store.path(key, token) in paths, f"held by cluster {i}: {key} lost"
        catalog = Catalog(self.store)
        self.run(catalog.load(compact=False))
        for key, entry in catalog.items():
            # Never listed without its object: a later run would plan to read it.
            assert self.store.path(key, entry.token) in paths, f"catalogued {key} missing"

    def teardown(self) -> None:
        for cluster in self.clusters:
            cluster.plugin.retention.close_wait = 0
            self.run(cluster.stop(crash=False))
        self.store.close()
        self.loop.close()
        self.config.__exit__(None, None, None)
        self.tmp.cleanup()


TestLifecycle = LifecycleMachine.TestCase
