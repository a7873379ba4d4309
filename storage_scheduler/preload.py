"""``--preload storage_scheduler`` for ``dask scheduler`` and ``dask worker``.

Scheduler::

    dask scheduler --preload storage_scheduler --storage-url s3://bucket/prefix \\
        --storage-option endpoint_url=http://127.0.0.1:9000

Workers need nothing: the scheduler installs the worker side on every worker, with its
store settings. ``dask worker ADDRESS --preload storage_scheduler --storage-url URL``
makes a worker open the store at its own URL (another mount point of the same
directory, say). Without command-line options the settings come from dask config
(``storage-scheduler.url`` etc.), so the preload can also be given as
``distributed.scheduler.preload: [storage_scheduler]``.

Stock Dask logs a preload that fails and starts anyway. So this preload only records
the options: the scheduler plugin validates them and probes the store in its ``start``,
whose failure does stop the scheduler, with the URL in the error.
"""

from __future__ import annotations

import logging
from typing import Any

import click

from storage_scheduler._protocol import PLUGIN_NAME
from storage_scheduler.config import StoreSettings, parse_storage_options, redact_url
from storage_scheduler.scheduler.plugin import StorageSchedulerPlugin
from storage_scheduler.worker.plugin import WorkerStoreOverride

__all__ = ["dask_setup", "dask_teardown"]

logger = logging.getLogger(__name__)


@click.command()
@click.option("--storage-url", default=None, help="fsspec URL of the store (default: dask config)")
@click.option(
    "--storage-option",
    multiple=True,
    help="Filesystem option as key=value, e.g. endpoint_url=http://host:9000 (repeatable)",
)
@click.option("--storage-lanes", type=int, default=None, help="Number of storage lanes")
def dask_setup(
    server: Any, storage_url: str | None, storage_option: tuple[str, ...], storage_lanes: int | None
) -> None:
    from distributed import Scheduler, Worker

    if isinstance(server, Scheduler):
        server.add_plugin(
            StorageSchedulerPlugin(storage_url, list(storage_option), storage_lanes),
            name=PLUGIN_NAME,
        )
    elif isinstance(server, Worker):
        if storage_url is not None or storage_option:
            settings = StoreSettings.from_config(storage_url, parse_storage_options(storage_option))
            # Found by the worker plugin when the scheduler pushes it.
            server.extensions[PLUGIN_NAME] = WorkerStoreOverride(settings)
            logger.info("Worker %s will use the store at %s", server.name, redact_url(settings.url))


def dask_teardown(server: Any) -> None:
    """Nothing to undo: the plugins clean up after themselves when the server closes."""
