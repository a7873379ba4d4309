"""The storage views on the scheduler's dashboard, and the status report for people.

* :mod:`~storage_scheduler.dashboard.apps` and :mod:`~storage_scheduler.dashboard.plots`:
  Bokeh documents on Dask's own dashboard (``/storage`` in its menu, each plot as an
  ``/individual-storage-*`` page);
* :mod:`~storage_scheduler.dashboard.page`: the plain HTML ``/storage`` page, served
  instead when Dask's Bokeh dashboard does not run (bokeh missing, dashboard off);
* :mod:`~storage_scheduler.dashboard.report`: the ``dask storage status`` table and
  :func:`storage_scheduler.status`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from storage_scheduler import _compat
from storage_scheduler.dashboard.page import add_plain_page, render_page
from storage_scheduler.dashboard.report import StorageReport, format_status, status

if TYPE_CHECKING:
    from distributed import Scheduler

__all__ = ["StorageReport", "add_dashboard_page", "format_status", "render_page", "status"]


def add_dashboard_page(scheduler: Scheduler) -> str:
    """Serve the storage views from ``scheduler``'s dashboard; return which: ``"bokeh"``
    or ``"plain"``.

    Bokeh documents when Dask's Bokeh server runs on the scheduler, the plain page
    otherwise. Safe to call again (the plugin removed and added again): nothing is
    served twice.
    """
    server = _compat.bokeh_server(scheduler)
    if server is not None:
        # Only now: bokeh is importable (the server exists), and importing it is slow.
        from storage_scheduler.dashboard.apps import add_bokeh_pages

        add_bokeh_pages(scheduler, server)
        return "bokeh"
    add_plain_page(scheduler)
    return "plain"
