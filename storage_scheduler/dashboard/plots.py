"""The storage views as Bokeh components, built the way Dask's dashboard builds its own.

Each component has a ``root`` (the Bokeh model shown) and ``update(status)``, which
replaces the data of its ``ColumnDataSource`` from a
:class:`~storage_scheduler._protocol.StorageStatus` (None: storage is not running). The
documents of :mod:`~storage_scheduler.dashboard.apps` call it periodically.

Notes
-----
Everything runs on the scheduler's event loop (Bokeh server sessions live there) and only
formats what the status already holds.
"""

from __future__ import annotations

import html
from typing import Any

from bokeh.models import (
    ColumnDataSource,
    DataRange1d,
    FactorRange,
    HoverTool,
    NumeralTickFormatter,
)
from bokeh.models.annotations import Legend, LegendItem
from bokeh.models.widgets import Div
from bokeh.plotting import figure

from dask.utils import format_bytes

from storage_scheduler._protocol import StorageStatus
from storage_scheduler.dashboard.report import (
    READ_COLOR,
    RESULTS_COLOR,
    STORE_COLOR,
    TASKS_COLOR,
    rates,
)

__all__ = ["COMPONENTS", "StorageHoldings", "StorageMemory", "StorageThroughput", "StorageWorkers"]

#: Bokeh's byte format (numbro), as on Dask's memory plots.
BYTES = "0.0 b"
#: The row of the memory plot that stands for the store itself.
STORE_ROW = "store (this cluster)"


def _tooltip(rows: list[tuple[str, str]]) -> str:
    """Tooltip HTML in the style of Dask's (bold label, monospace value)."""
    return "".join(
        f'<div><span style="font-size: 12px; font-weight: bold;">{label}:</span>&nbsp;'
        f'<span style="font-size: 10px; font-family: Monaco, monospace;">{value}</span></div>'
        for label, value in rows
    )


def _replace(source: ColumnDataSource, data: dict[str, list[Any]]) -> None:
    if dict(source.data) != data:  # an unchanged plot sends nothing to the browser
        source.data.update(data)


class StorageMemory:
    """Per worker, a stacked bar: RAM of running tasks and the process, results held in
    RAM, and results the worker wrote to the store (the store's colour); and a row for
    the store, with the results this cluster holds there."""

    SEGMENTS = ("tasks", "results", "stored")

    def __init__(self, **kwargs: Any):
        self.source = ColumnDataSource({k: [] for k in ("worker", "address", *self.SEGMENTS)})
        self.workers = FactorRange()
        self.root = figure(
            title="Task RAM and result storage per worker",
            x_range=DataRange1d(start=0),
            y_range=self.workers,
            x_axis_label="bytes",
            tools="",
            toolbar_location=None,
            name="storage_memory",
            min_border_bottom=50,
            **kwargs,
        )
        renderers = self.root.hbar_stack(
            list(self.SEGMENTS),
            y="worker",
            height=0.8,
            color=[TASKS_COLOR, RESULTS_COLOR, STORE_COLOR],
            line_width=0,
            source=self.source,
        )
        labels = ["RAM: running tasks, process", "RAM: results", "in the store"]
        self.root.add_layout(
            Legend(
                items=[
                    LegendItem(label=t, renderers=list[Any]([r]))
                    for t, r in zip(labels, renderers, strict=True)
                ],
                orientation="horizontal",
                location="center",
            ),
            "below",
        )
        self.root.xaxis.formatter = NumeralTickFormatter(format=BYTES)
        self.root.ygrid.visible = False
        self.root.add_tools(
            HoverTool(
                renderers=list[Any](renderers),
                point_policy="follow_mouse",
                tooltips=_tooltip(
                    [
                        ("Worker", "@worker"),
                        ("RAM: running tasks and the process", "@tasks{0.00 b}"),
                        ("RAM: results", "@results{0.00 b}"),
                        ("In the store (written by this worker)", "@stored{0.00 b}"),
                    ]
                ),
            )
        )

    def update(self, status: StorageStatus | None) -> None:
        workers = status["workers"] if status else []
        data: dict[str, list[Any]] = {
            "worker": [w["name"] for w in workers],
            "address": [w["address"] for w in workers],
            "tasks": [w["tasks_ram"] for w in workers],
            "results": [w["results_ram"] for w in workers],
            "stored": [w["bytes_written"] for w in workers],
        }
        if status:
            for k, v in zip(
                data, [STORE_ROW, status["url"], 0, 0, status["bytes_in_lanes"]], strict=True
            ):
                data[k].append(v)
        # Workers top down in address order, the store last.
        self.workers.factors = data["worker"][::-1]
        _replace(self.source, data)


class StorageThroughput:
    """Bytes per second written to and read from the store, over the last minutes."""

    def __init__(self, **kwargs: Any):
        self.source = ColumnDataSource({"time": [], "written": [], "read": []})
        self.root = figure(
            title="Store throughput",
            x_axis_type="datetime",
            y_range=DataRange1d(start=0),
            x_axis_label="time",
            y_axis_label="bytes / second",
            tools="",
            toolbar_location=None,
            name="storage_throughput",
            **kwargs,
        )
        lines = [
            self.root.line(
                "time", field, source=self.source, color=color, line_width=2, legend_label=label
            )
            for field, color, label in [
                ("written", STORE_COLOR, "written to the store"),
                ("read", READ_COLOR, "read from the store"),
            ]
        ]
        self.root.legend.location = "top_left"
        self.root.legend.background_fill_alpha = 0.5
        self.root.yaxis.formatter = NumeralTickFormatter(format=BYTES)
        self.root.add_tools(
            HoverTool(
                renderers=list[Any](lines[:1]),
                mode="vline",
                formatters={"@time": "datetime"},
                tooltips=_tooltip(
                    [
                        ("Time", "@time{%H:%M:%S}"),
                        ("Written", "@written{0.00 b}/s"),
                        ("Read", "@read{0.00 b}/s"),
                    ]
                ),
            )
        )

    def update(self, status: StorageStatus | None) -> None:
        points = rates(status["history"]) if status else []
        _replace(
            self.source,
            {
                "time": [t * 1000 for t, _, _ in points],  # Bokeh's datetimes are in ms
                "written": [w for _, w, _ in points],
                "read": [r for _, _, r in points],
            },
        )


#: Tables in the dashboard's look (Bokeh's fonts and table colours).
TABLE_STYLE = (
    "border-collapse: collapse; font-size: 12px; font-family: var(--base-font, sans-serif);"
)
TH_STYLE = "padding: 4px 6px; border-bottom: 1px solid #bbb; font-weight: normal; color: #555;"
TD_STYLE = "padding: 3px 6px; border-bottom: 1px solid #eee; white-space: nowrap;"


def html_table(header: list[str], rows: list[list[str]]) -> str:
    """An HTML table, the first column left-aligned and the others right-aligned.

    A table of text in a ``Div`` rather than Bokeh's ``DataTable``: BokehJS 3.9 redraws a
    ``DataTable`` only when its number of rows changes, and these keep theirs.
    """
    e = html.escape

    def cells(tag: str, style: str, values: list[str]) -> str:
        return "".join(
            f'<{tag} style="{style} text-align: {"left" if i == 0 else "right"};">{e(v)}</{tag}>'
            for i, v in enumerate(values)
        )

    body = "".join(f"<tr>{cells('td', TD_STYLE, row)}</tr>" for row in rows)
    return f'<table style="{TABLE_STYLE}"><tr>{cells("th", TH_STYLE, header)}</tr>{body}</table>'


class StorageHoldings:
    """What this cluster holds in the store, what the store holds, and what was reused."""

    def __init__(self, **kwargs: Any):
        self.root = Div(text="", name="storage_holdings", **kwargs)

    def update(self, status: StorageStatus | None) -> None:
        if status is None:
            self.root.text = "<b>storage_scheduler is not running on this scheduler</b>"
            return
        b = format_bytes
        rows = [
            ["held by this cluster", str(status["keys_in_lanes"]), b(status["bytes_in_lanes"])],
            ["in the store (catalog)", str(status["catalog_keys"]), b(status["catalog_bytes"])],
            ["stored since start", str(status["stored_total"]), b(status["stored_bytes_total"])],
            ["reused instead of computed", str(status["reused_total"]), ""],
            ["recomputed: missing or corrupt", str(status["unreadable_total"]), ""],
            ["deleted (lifecycle)", str(status["deleted_total"]), ""],
        ]
        writing = "writing new results" if status["writing"] else "not writing new results"
        self.root.text = (
            f"<p><b>Store</b> <code>{html.escape(status['url'])}</code> ({writing})</p>"
            + html_table(["Results", "Keys", "Bytes"], rows)
        )


class StorageWorkers:
    """Per worker: RAM, store traffic and write failures, as a table."""

    COLUMNS = (
        ("name", "Worker"),
        ("results_ram", "RAM: results"),
        ("tasks_ram", "RAM: tasks"),
        ("bytes_written", "Written"),
        ("objects_written", "Objects"),
        ("bytes_read", "Read"),
        ("write_failures", "Write failures"),
        ("not_stored", "Peer fallbacks"),
        ("writes_in_flight", "Uploading"),
    )
    BYTES = frozenset({"results_ram", "tasks_ram", "bytes_written", "bytes_read"})

    def __init__(self, **kwargs: Any):
        self.root = Div(text="", name="storage_workers", **kwargs)

    def update(self, status: StorageStatus | None) -> None:
        rows = [
            [
                format_bytes(value) if field in self.BYTES else str(value)
                for field, _ in self.COLUMNS
                for value in [w[field]]  # type: ignore[literal-required]
            ]
            for w in (status["workers"] if status else [])
        ]
        self.root.text = html_table([title for _, title in self.COLUMNS], rows)


#: The individual plots by URL, as Dask names its own (``/individual-<name>``).
COMPONENTS: dict[str, type[StorageMemory | StorageThroughput | StorageHoldings | StorageWorkers]]
COMPONENTS = {
    "/individual-storage-memory": StorageMemory,
    "/individual-storage-throughput": StorageThroughput,
    "/individual-storage-holdings": StorageHoldings,
    "/individual-storage-workers": StorageWorkers,
}
