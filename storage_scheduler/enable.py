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

from typing import TYPE_CHECKING, Any, cast

from distributed.protocol.pickle import dumps

from storage_scheduler._exceptions import StorageSchedulerError
from storage_scheduler._protocol import PLUGIN_NAME, StorageInfo
from storage_scheduler.config import redact_url
from storage_scheduler.scheduler.plugin import StorageSchedulerPlugin

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["disable", "enable"]


def _scheduler(client: Client) -> Any:
    """The scheduler's RPC: its storage handlers are not in distributed's type stubs."""
    return client.scheduler


async def _info(client: Client) -> StorageInfo | None:
    try:
        return cast(StorageInfo, await _scheduler(client).storage_info())
    except Exception:
        return None  # no such handler: storage is not installed on this scheduler


async def _enable(
    client: Client,
    url: str | None,
    storage_options: dict[str, Any],
    signing_key: str | list[str] | None,
) -> StorageInfo:
    info = await _info(client)
    if info is not None:
        if url is not None and redact_url(url) != info["url"]:
            raise StorageSchedulerError(
                f"storage is already enabled on this cluster with {info['url']!r}, "
                f"not {redact_url(url)!r}"
            )
        if not info["writing"]:
            return cast(StorageInfo, await _scheduler(client).storage_set_writing(write=True))
        return info
    plugin = StorageSchedulerPlugin(url, storage_options, signing_key=signing_key)
    try:
        await _scheduler(client).register_scheduler_plugin(
            plugin=dumps(plugin),  # type: ignore[no-untyped-call]
            name=PLUGIN_NAME,
            idempotent=False,
        )
    except (ModuleNotFoundError, ImportError) as e:
        raise StorageSchedulerError(
            f"storage-scheduler is not installed on the scheduler ({e}); install it in the "
            "scheduler's and the workers' environment"
        ) from e
    info = await _info(client)
    assert info is not None
    return info


def enable(
    client: Client,
    url: str | None = None,
    *,
    signing_key: str | list[str] | None = None,
    **storage_options: Any,
) -> Any:
    """Store the results of this cluster's computations at ``url`` from now on.

    Parameters
    ----------
    client
        A client of the running cluster (synchronous or asynchronous).
    url
        fsspec URL of the store; default ``storage-scheduler.url`` in the scheduler's
        dask config.
    signing_key
        Key of the MACs that sign every stored object, catalog segment and lease (a list
        rotates keys: the first signs, any verifies); default
        ``storage-scheduler.signing-key`` in the scheduler's config. Never shown.
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
    return client.sync(_enable, client, url, storage_options, signing_key)  # type: ignore[no-untyped-call]


async def _disable(client: Client) -> StorageInfo:
    if await _info(client) is None:
        raise StorageSchedulerError("storage is not enabled on this cluster")
    return cast(StorageInfo, await _scheduler(client).storage_set_writing(write=False))


def disable(client: Client) -> Any:
    """Stop storing new results; those already stored stay readable and are kept."""
    return client.sync(_disable, client)  # type: ignore[no-untyped-call]
