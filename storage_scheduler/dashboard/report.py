"""A cluster's storage status for people: the ``dask storage status`` table, and
:func:`status`, whose result shows as that table in a terminal and as HTML in a notebook.
"""

from __future__ import annotations

import html
import itertools
from typing import TYPE_CHECKING, Any, cast

from dask.utils import format_bytes

from storage_scheduler._exceptions import StorageSchedulerError
from storage_scheduler._protocol import StorageStatus

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["StorageReport", "format_status", "rates", "status"]

#: Dask's memory bars are blue, lighter for the process's unmanaged memory; the store
#: has its own colour, here and in the Bokeh views.
RESULTS_COLOR = "rgba(0, 0, 255, 1.0)"
TASKS_COLOR = "rgba(0, 0, 255, 0.4)"
STORE_COLOR = "#9467bd"
READ_COLOR = "#2ca02c"


def rates(history: list[tuple[float, int, int]]) -> list[tuple[float, float, float]]:
    """(time, bytes written per second, bytes read per second) between history samples.

    >>> rates([(0.0, 0, 0), (2.0, 100, 50), (3.0, 100, 60)])
    [(2.0, 50.0, 25.0), (3.0, 0.0, 10.0)]
    """
    out = []
    for (t0, w0, r0), (t1, w1, r1) in itertools.pairwise(history):
        dt = max(t1 - t0, 1e-6)
        out.append((t1, max(0, w1 - w0) / dt, max(0, r1 - r0) / dt))
    return out


def _summary(st: StorageStatus) -> list[str]:
    b = format_bytes
    return [
        f"store: {st['url']}  ({'writing' if st['writing'] else 'not writing new results'})",
        f"held by this cluster: {st['keys_in_lanes']} keys, {b(st['bytes_in_lanes'])}; "
        f"in the store: {st['catalog_keys']} keys, {b(st['catalog_bytes'])}; "
        f"reused: {st['reused_total']}; recomputed (lost/corrupt): {st['unreadable_total']}",
    ]


def _worker_rows(st: StorageStatus) -> list[tuple[str, ...]]:
    """The per-worker rows of the table and their total, formatted."""
    b = format_bytes
    ws = st["workers"]
    rows: list[tuple[str, ...]] = [
        (
            w["name"],
            b(w["results_ram"]),
            b(w["tasks_ram"]),
            b(w["bytes_written"]),
            b(w["bytes_read"]),
            str(w["write_failures"]),
            str(w["not_stored"]),
        )
        for w in ws
    ]
    rows.append(
        (
            "total",
            b(sum(w["results_ram"] for w in ws)),
            b(sum(w["tasks_ram"] for w in ws)),
            b(sum(w["bytes_written"] for w in ws)),
            b(sum(w["bytes_read"] for w in ws)),
            str(sum(w["write_failures"] for w in ws)),
            str(sum(w["not_stored"] for w in ws)),
        )
    )
    return rows


HEADER = ("worker", "RAM results", "RAM tasks", "written", "read", "failures", "fallbacks")


def format_status(st: StorageStatus) -> str:
    """The ``dask storage status`` text: the store's totals, then a table per worker."""
    rows = [HEADER, *_worker_rows(st)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = _summary(st)
    for row in rows:
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(lines)


_TD = 'style="text-align: right; padding: 0 0.6em;"'


def _bar(w: dict[str, Any], scale: int) -> str:
    """Dask's memory bar in miniature: task RAM, result RAM, then what went to the store."""
    parts = [
        (w["tasks_ram"], TASKS_COLOR, "RAM: running tasks and the process"),
        (w["results_ram"], RESULTS_COLOR, "RAM: results"),
        (w["bytes_written"], STORE_COLOR, "written to the store"),
    ]
    return "".join(
        f'<span title="{t}: {format_bytes(n)}" style="display: inline-block; height: 0.8em; '
        f'width: {100 * n / scale:.1f}px; background: {c};"></span>'
        for n, c, t in parts
        if n
    )


def format_html(st: StorageStatus) -> str:
    """A small, self-contained HTML view (inline styles only), like ``Client``'s repr."""
    e = html.escape
    b = format_bytes
    ws = st["workers"]
    scale = max([1] + [w["results_ram"] + w["tasks_ram"] + w["bytes_written"] for w in ws])
    head = "".join(f"<th {_TD}>{e(h)}</th>" for h in HEADER)
    body = []
    bars = [_bar(cast(dict[str, Any], w), scale) for w in st["workers"]] + [""]
    for row, bar in zip(_worker_rows(st), bars, strict=True):
        cells = "".join(
            f'<td style="text-align: left;">{e(c)}</td>' if i == 0 else f"<td {_TD}>{e(c)}</td>"
            for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}<td>{bar}</td></tr>")
    facts = [
        ("Store", e(st["url"]) + ("" if st["writing"] else " (not writing new results)")),
        ("Held by this cluster", f"{st['keys_in_lanes']} keys, {b(st['bytes_in_lanes'])}"),
        ("In the store (catalog)", f"{st['catalog_keys']} keys, {b(st['catalog_bytes'])}"),
        ("Stored since start", f"{st['stored_total']} results, {b(st['stored_bytes_total'])}"),
        ("Reused instead of computed", f"{st['reused_total']} keys"),
        ("Recomputed (missing or corrupt)", f"{st['unreadable_total']} keys"),
    ]
    legend = " ".join(
        f'<span style="display: inline-block; width: 0.8em; height: 0.8em; background: {c};">'
        f"</span> {t}"
        for c, t in [(TASKS_COLOR, "RAM: tasks"), (RESULTS_COLOR, "RAM: results"),
                     (STORE_COLOR, "written to the store")]
    )  # fmt: skip
    return (
        '<div class="storage-scheduler-status">'
        '<h3 style="margin-bottom: 0.3em;">Storage</h3>'
        '<table style="text-align: left;">'
        + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts)
        + "</table><details open><summary><strong>Workers</strong></summary>"
        f"<table><tr>{head}<th>{legend}</th></tr>{''.join(body)}</table></details></div>"
    )


class StorageReport:
    """A snapshot of a cluster's storage, from :func:`status`.

    Shows as the ``dask storage status`` table (``str``, ``repr``) and as HTML in a
    notebook. The figures themselves are in :attr:`data`.
    """

    #: What the scheduler's ``storage_status`` handler returned.
    data: StorageStatus

    def __init__(self, data: StorageStatus):
        self.data = data

    def __repr__(self) -> str:
        return format_status(self.data)

    __str__ = __repr__

    def _repr_html_(self) -> str:
        return format_html(self.data)


async def _status(client: Client) -> StorageReport:
    scheduler: Any = client.scheduler  # its storage handlers are not in distributed's stubs
    try:
        data = await scheduler.storage_status()
    except Exception as e:
        raise StorageSchedulerError(f"storage is not enabled on this cluster ({e})") from e
    if not isinstance(data, dict):  # no such handler: the scheduler answers None
        raise StorageSchedulerError("storage is not enabled on this cluster")
    return StorageReport(cast(StorageStatus, data))


def status(client: Client) -> Any:
    """The storage of ``client``'s cluster: task RAM and stored bytes per worker, and
    what the store holds and reused.

    Returns
    -------
    StorageReport
        Printed, the ``dask storage status`` table; in a notebook, a rich HTML view. With
        an asynchronous client, an awaitable of it.

    Raises
    ------
    StorageSchedulerError
        If storage is not enabled on the cluster.
    """
    return client.sync(_status, client)  # type: ignore[no-untyped-call]
