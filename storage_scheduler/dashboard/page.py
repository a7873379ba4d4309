"""The plain ``/storage`` page: the fallback when Dask's Bokeh dashboard is not running
(bokeh, an optional dependency of distributed, is not installed, or the dashboard is off).

Task RAM against stored bytes per worker, store throughput over time, and what the
cluster reused. Served by the same HTTP server as Dask's dashboard (next to ``/status``),
rendered on the server from the scheduler plugin's state, refreshed every two seconds;
no JavaScript.
"""

from __future__ import annotations

import html
import itertools
import time
from typing import TYPE_CHECKING

from tornado import web

from dask.utils import format_bytes

from storage_scheduler._protocol import PLUGIN_NAME, StorageStatus

if TYPE_CHECKING:
    from distributed import Scheduler

__all__ = ["add_plain_page", "render_page"]

STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.5em; }
table { border-collapse: collapse; } td, th { padding: 0.3em 0.8em; text-align: right; }
th { background: #eee; } td:first-child, th:first-child { text-align: left; }
tr.total td { font-weight: bold; border-top: 1px solid #888; }
.bar { display: inline-block; height: 0.8em; }
.ram { background: #1f77b4; } .stored { background: #ff7f0e; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dt { color: #555; } dd { margin: 0; }
"""


class StoragePage(web.RequestHandler):
    def initialize(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def get(self) -> None:
        from storage_scheduler.scheduler.plugin import StorageSchedulerPlugin

        plugin = self.scheduler.plugins.get(PLUGIN_NAME)
        if not isinstance(plugin, StorageSchedulerPlugin) or not plugin.started:
            self.set_status(404)
            self.write("storage_scheduler is not running on this scheduler")
            return
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.write(render_page(plugin.storage_status()))


def add_plain_page(scheduler: Scheduler) -> None:
    """Serve the plain ``/storage`` page from the scheduler's HTTP server.

    The page finds the plugin in ``scheduler.plugins`` at each request, so a second
    registration on the same server (the plugin removed and added again) is harmless:
    the first matching route wins.
    """
    app = getattr(scheduler, "http_application", None)
    if app is not None:
        app.add_handlers(r".*$", [(r"/storage", StoragePage, {"scheduler": scheduler})])


def _throughput_svg(
    history: list[tuple[float, int, int]], width: int = 600, height: int = 120
) -> str:
    rates = []
    for (t0, w0, r0), (t1, w1, r1) in itertools.pairwise(history):
        dt = max(t1 - t0, 1e-6)
        rates.append((t1, max(0, w1 - w0) / dt, max(0, r1 - r0) / dt))
    if not rates:
        return "<p>No samples yet.</p>"
    peak = max(max(w, r) for _, w, r in rates) or 1.0
    t_first, t_last = rates[0][0], rates[-1][0]
    span = max(t_last - t_first, 1e-6)

    def line(index: int, color: str) -> str:
        points = " ".join(
            f"{(t - t_first) / span * width:.1f},{height - row[index] / peak * (height - 10):.1f}"
            for row in rates
            for t in [row[0]]
        )
        return f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{points}"/>'

    return (
        f'<svg width="{width}" height="{height}" style="background:#fafafa;border:1px solid #ddd">'
        f"{line(1, '#ff7f0e')}{line(2, '#2ca02c')}</svg>"
        f"<p>peak {format_bytes(int(peak))}/s over the last {span:.0f} s — "
        '<span style="color:#ff7f0e">written</span>, <span style="color:#2ca02c">read</span></p>'
    )


def render_page(status: StorageStatus) -> str:
    """The page's HTML for a ``storage_status()`` snapshot."""
    e = html.escape
    b = format_bytes
    workers = status["workers"]
    scale = max(
        [1]
        + [w["results_ram"] + w["tasks_ram"] for w in workers]
        + [w["bytes_written"] for w in workers]
    )
    rows = []
    for w in workers:
        ram_px = int(200 * (w["results_ram"] + w["tasks_ram"]) / scale)
        stored_px = int(200 * w["bytes_written"] / scale)
        rows.append(
            "<tr>"
            f"<td>{e(w['name'])}"
            + (f"<br><small>{e(w['address'])}</small>" if w["name"] != w["address"] else "")
            + "</td>"
            f"<td>{b(w['results_ram'])}</td><td>{b(w['tasks_ram'])}</td>"
            f"<td>{b(w['bytes_written'])}</td><td>{w['objects_written']}</td>"
            f"<td>{b(w['bytes_read'])}</td><td>{w['write_failures']}</td>"
            f"<td>{w['not_stored']}</td><td>{w['writes_in_flight']}</td>"
            f'<td><span class="bar ram" style="width:{ram_px}px"></span><br>'
            f'<span class="bar stored" style="width:{stored_px}px"></span></td>'
            "</tr>"
        )

    def total(field: str) -> int:
        return sum(int(w[field]) for w in workers)  # type: ignore[literal-required,misc]

    rows.append(
        '<tr class="total"><td>total</td>'
        f"<td>{b(total('results_ram'))}</td><td>{b(total('tasks_ram'))}</td>"
        f"<td>{b(total('bytes_written'))}</td><td>{total('objects_written')}</td>"
        f"<td>{b(total('bytes_read'))}</td><td>{total('write_failures')}</td>"
        f"<td>{total('not_stored')}</td><td>{total('writes_in_flight')}</td><td></td></tr>"
    )
    facts = [
        ("store", e(status["url"])),
        ("writing new results", "yes" if status["writing"] else "no (disabled)"),
        (
            "keys held in the store by this cluster",
            f"{status['keys_in_lanes']} ({b(status['bytes_in_lanes'])})",
        ),
        ("keys in the store (catalog)", f"{status['catalog_keys']} ({b(status['catalog_bytes'])})"),
        (
            "results stored since start",
            f"{status['stored_total']} ({b(status['stored_bytes_total'])})",
        ),
        ("keys reused instead of computed", str(status["reused_total"])),
        ("missing or corrupt objects recomputed", str(status["unreadable_total"])),
        ("objects deleted (lifecycle)", str(status["deleted_total"])),
        ("storage lanes", str(len(status["lanes"]))),
    ]
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="2">
<link rel="icon" href="data:,">
<title>Storage — storage_scheduler</title><style>{STYLE}</style></head>
<body>
<h1>Storage</h1>
<dl>{"".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)}</dl>
<h2>Workers: task RAM and result storage</h2>
<table>
<tr><th>worker</th><th>RAM: results</th><th>RAM: tasks &amp; rest</th><th>written to store</th>
<th>objects</th><th>read from store</th><th>write failures</th><th>peer fallbacks</th>
<th>uploading</th><th><span class="bar ram" style="width:1em"></span> RAM
<span class="bar stored" style="width:1em"></span> stored</th></tr>
{"".join(rows)}
</table>
<h2>Store throughput</h2>
{_throughput_svg(status["history"])}
<p><small>Updated {time.strftime("%H:%M:%S")}. Dask dashboard: <a href="status">status</a>.</small></p>
</body></html>
"""
