"""Dask's Bokeh dashboard, as the storage views use it (see the package's docstring)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distributed import Scheduler

__all__ = ["add_bokeh_applications", "bokeh_server", "dashboard_look", "dashboard_menus"]


def bokeh_server(scheduler: Scheduler) -> Any | None:
    """Dask's Bokeh server (a ``BokehTornado``) on the scheduler's HTTP server, or None
    when bokeh is missing or the dashboard is off.

    ``distributed.dashboard.scheduler.connect`` adds it to ``http_application.applications``
    in ``Scheduler.__init__``; ``/individual-plots.json`` lists the first one found there.
    """
    try:
        from bokeh.server.tornado import BokehTornado
    except ImportError:
        return None
    for app in getattr(getattr(scheduler, "http_application", None), "applications", ()):
        if isinstance(app, BokehTornado):
            return app
    return None


def add_bokeh_applications(server: Any, apps: Mapping[str, Callable[[Any], None]]) -> list[str]:
    """Serve more Bokeh documents from a running ``BokehTornado``; return the URLs added.

    What ``BokehTornado.__init__`` does for each of its applications (a context, the
    per-application routes, a static route), done later; URLs already served are skipped.
    """
    from bokeh.application import Application
    from bokeh.application.handlers.document_lifecycle import DocumentLifecycleHandler
    from bokeh.application.handlers.function import FunctionHandler
    from bokeh.server.contexts import ApplicationContext
    from bokeh.server.tornado import create_static_handler
    from bokeh.server.urls import per_app_patterns
    from bokeh.server.views.ws import WSHandler

    added = []
    for url, func in apps.items():
        if url in server.app_paths:
            continue
        app = Application(FunctionHandler(func), DocumentLifecycleHandler())
        ctx = ApplicationContext(
            app, url=url, io_loop=server.io_loop, logout_url=server.auth_provider.logout_url
        )
        routes: list[Any] = []
        for pattern, handler, *_ in per_app_patterns:
            kwargs: dict[str, Any] = {"application_context": ctx}
            if issubclass(handler, WSHandler):
                kwargs.update(compression_level=None, mem_level=None)
            routes.append((server.prefix + url + pattern, handler, kwargs))
        for route in routes:
            route[2]["bokeh_websocket_path"] = server.prefix + url + "/ws"
        routes.append(create_static_handler(server.prefix, url, app))
        server._applications[url] = ctx
        server.add_handlers(r".*", routes)
        server.io_loop.add_callback(ctx.run_load_hook)
        added.append(url)
    return added


def dashboard_menus(scheduler: Scheduler) -> dict[str, Any]:
    """The variables Dask's dashboard pages are rendered with: ``pages`` (the menu),
    ``plots`` ("More...", dicts of ``url`` and ``name``), ``jupyter``.

    ``template_variables`` is memoized per scheduler, and every page's variables hold its
    ``pages`` and ``plots`` lists themselves: extending them extends every page's menus.
    """
    from distributed.dashboard.scheduler import template_variables

    variables: dict[str, Any] = template_variables(scheduler)
    return variables


def dashboard_look() -> tuple[Any, Any]:
    """Dask's Bokeh theme and the Jinja template of its pages with the menu
    (``simple.html``), so that the storage pages look like the others."""
    from distributed.dashboard.components.scheduler import BOKEH_THEME, env

    return BOKEH_THEME, env.get_template("simple.html")
