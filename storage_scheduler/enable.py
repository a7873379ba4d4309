"""Turn storage on and off for a running cluster, from a client.

For clusters whose scheduler and workers you cannot start yourself (managed clusters,
dask-gateway, a shared JupyterHub cluster): install ``storage-scheduler`` in the image,
then::

    import storage_scheduler
    storage_scheduler.enable(client, "s3://bucket/prefix", key=..., secret=...)

Computations submitted afterwards store their results; workers that join later get the
worker side automatically.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from distributed.protocol.pickle import dumps

from storage_scheduler._exceptions import StorageSchedulerError
from storage_scheduler.scheduler_plugin import StorageSchedulerPlugin
from storage_scheduler.worker_plugin import PLUGIN_NAME

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["disable", "enable"]


async def _info(client: Client) -> dict[str, Any] | None:
    try:
        return await client.scheduler.storage_info()  # type: ignore[no-any-return]
    except Exception:
        return None  # no such handler: storage is not installed on this scheduler


async def _enable(client: Client, url: str | None, storage_options: dict[str, Any]) -> dict[str, Any]:
    info = await _info(client)
    if info is not None:
        if url is not None and url != info["url"]:
            raise StorageSchedulerError(
                f"storage is already enabled on this cluster with {info['url']!r}, not {url!r}"
            )
        if not info["writing"]:
            return await client.scheduler.storage_set_writing(write=True)  # type: ignore[no-any-return]
        return info
    plugin = StorageSchedulerPlugin(url, storage_options)
    try:
        await client.scheduler.register_scheduler_plugin(
            plugin=dumps(plugin), name=PLUGIN_NAME, idempotent=False
        )
    except (ModuleNotFoundError, ImportError) as e:
        raise StorageSchedulerError(
            f"storage-scheduler is not installed on the scheduler ({e}); install it in the "
            "scheduler's and the workers' environment"
        ) from e
    info = await _info(client)
    assert info is not None
    return info


def enable(client: Client, url: str | None = None, **storage_options: Any) -> Any:
    """Store the results of this cluster's computations at ``url`` from now on.

    Parameters
    ----------
    client
        A client of the running cluster (synchronous or asynchronous).
    url
        fsspec URL of the store; default ``storage-scheduler.url`` in the scheduler's
        dask config.
    **storage_options
        Filesystem options (credentials, ``endpoint_url``, ...). They travel to the
        scheduler and workers with the plugin and are never logged or shown.

    Returns
    -------
    What the scheduler reports of its store (``url``, ``lanes``, key counts, ...); with an
    asynchronous client, an awaitable of it.

    Raises
    ------
    StorageSchedulerError
        If the package is missing on the scheduler or a worker, if the store cannot be
        reached from any of them, or if storage is already enabled with another URL.

    Notes
    -----
    Idempotent: enabling again with the same URL (or none) changes nothing, and re-enables
    writing after :func:`disable`.
    """
    return client.sync(_enable, client, url, storage_options)


async def _disable(client: Client) -> dict[str, Any]:
    if await _info(client) is None:
        raise StorageSchedulerError("storage is not enabled on this cluster")
    return await client.scheduler.storage_set_writing(write=False)  # type: ignore[no-any-return]


def disable(client: Client) -> Any:
    """Stop storing new results; those already stored stay readable and are kept."""
    return client.sync(_disable, client)
