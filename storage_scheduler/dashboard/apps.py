"""The storage views as documents of Dask's own Bokeh dashboard.

``/storage`` is a page of the dashboard with an entry in its menu ("Storage"), and each
plot is also an ``/individual-storage-*`` document, listed in ``/individual-plots.json``
and in the "More..." menu: the JupyterLab Dask extension offers those without any
configuration. They use Dask's theme and page template, and refresh every second.

When to register: distributed reads its dashboard's applications
(``distributed.dashboard.scheduler.applications``) once, in ``Scheduler.__init__``, where
it also starts the Bokeh server. Preload modules are imported just before that, but
``dask_setup`` and every scheduler plugin's ``start`` run later, in ``Scheduler.start``;
``enable(client)`` and ``LocalCluster`` plugins later still. So whichever way storage is
turned on, the server is running by then, and :func:`add_bokeh_pages` adds the documents
to it (:func:`storage_scheduler._compat.add_bokeh_applications`), from the plugin's
``start``. The documents look the plugin up at each refresh, so that they outlive a
plugin removed and added again, and registering twice adds nothing.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bokeh.layouts import column, row

from storage_scheduler import _compat
from storage_scheduler._protocol import PLUGIN_NAME, StorageStatus
from storage_scheduler.dashboard.plots import (
    COMPONENTS,
    StorageHoldings,
    StorageMemory,
    StorageThroughput,
    StorageWorkers,
)

if TYPE_CHECKING:
    from bokeh.document import Document

    from distributed import Scheduler

__all__ = ["INTERVAL_MS", "PAGE", "add_bokeh_pages"]

#: Refresh period of every storage document (Dask's own refresh in 100 ms to 1 s).
INTERVAL_MS = 1000
#: The page in the dashboard's menu.
PAGE = "storage"


def storage_status(scheduler: Scheduler) -> StorageStatus | None:
    """The plugin's status, or None when storage is not running on ``scheduler``."""
    from storage_scheduler.scheduler.plugin import StorageSchedulerPlugin

    plugin = scheduler.plugins.get(PLUGIN_NAME)
    if not isinstance(plugin, StorageSchedulerPlugin) or not plugin.started:
        return None
    return plugin.storage_status()


def _refresh(scheduler_ref: weakref.ref[Scheduler], components: list[Any]) -> None:
    scheduler = scheduler_ref()
    status = None if scheduler is None else storage_status(scheduler)
    for component in components:
        component.update(status)


def _periodic(doc: Document, scheduler: Scheduler, components: list[Any]) -> None:
    """Fill the components now and refresh them every :data:`INTERVAL_MS`; one status
    snapshot per refresh serves every component of the document."""
    refresh = functools.partial(_refresh, weakref.ref(scheduler), components)
    refresh()
    doc.add_periodic_callback(refresh, INTERVAL_MS)


def _individual(cls: type, scheduler: Scheduler, doc: Document) -> None:
    theme, _ = _compat.dashboard_look()
    component = cls(sizing_mode="stretch_both")
    _periodic(doc, scheduler, [component])
    doc.add_root(component.root)
    doc.title = f"Dask: {cls.__name__}"
    doc.theme = theme


def storage_doc(scheduler: Scheduler, doc: Document) -> None:
    """The ``/storage`` page: memory bars and throughput side by side, then the store's
    holdings and the per-worker table, under Dask's menu."""
    theme, template = _compat.dashboard_look()
    memory = StorageMemory(height=400, sizing_mode="stretch_width")
    throughput = StorageThroughput(height=400, sizing_mode="stretch_width")
    holdings = StorageHoldings(sizing_mode="stretch_width")
    workers = StorageWorkers(height=300, sizing_mode="stretch_width")
    _periodic(doc, scheduler, [memory, throughput, holdings, workers])
    doc.add_root(
        column(
            row(memory.root, throughput.root, sizing_mode="stretch_width"),
            row(holdings.root, workers.root, sizing_mode="stretch_width"),
            sizing_mode="stretch_width",
        )
    )
    doc.title = "Dask: Storage"
    doc.template = template
    doc.template_variables.update(_compat.dashboard_menus(scheduler))
    doc.theme = theme


def _plot_name(url: str) -> str:
    """As Dask names its individual plots in the "More..." menu."""
    return " ".join(url.strip("/").split("-")[1:]).title()


def add_bokeh_pages(scheduler: Scheduler, server: Any) -> list[str]:
    """Serve the storage documents from Dask's running Bokeh ``server`` and list them in
    its menus; return the URLs newly served."""
    docs: dict[str, Callable[[Document], None]] = {
        "/" + PAGE: functools.partial(storage_doc, scheduler),
        **{url: functools.partial(_individual, cls, scheduler) for url, cls in COMPONENTS.items()},
    }
    added = _compat.add_bokeh_applications(server, docs)
    menus = _compat.dashboard_menus(scheduler)
    pages: list[str] = menus["pages"]
    if PAGE not in pages:
        # After Dask's own pages, before "info" (the last, about the scheduler itself).
        pages.insert(pages.index("info") if "info" in pages else len(pages), PAGE)
    plots: list[dict[str, str]] = menus["plots"]
    listed = {p["url"] for p in plots}
    plots.extend(
        {"url": url.strip("/"), "name": _plot_name(url)}
        for url in COMPONENTS
        if url.strip("/") not in listed
    )
    plots.sort(key=lambda p: p["name"])
    return added
