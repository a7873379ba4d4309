"""Settings of storage_scheduler, read from dask config.

The defaults live in ``storage-scheduler.yaml`` and are added to dask's config when the
package is imported, so ``dask.config.set``, YAML files and environment variables such as
``DASK_STORAGE_SCHEDULER__URL`` all work. Settings are read when stores and plugins are
built (:meth:`StoreSettings.from_config`), never at import, so that ``dask.config.set``
and ``gen_cluster(config=...)`` take effect.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import dask.config
import yaml
from dask.utils import parse_timedelta

from storage_scheduler._exceptions import StorageConfigError

__all__ = ["RetryPolicy", "StoreSettings", "default_store_url"]

_HERE = pathlib.Path(__file__).parent


def _load_defaults() -> None:
    with open(_HERE / "storage-scheduler.yaml") as f:
        dask.config.update_defaults(yaml.safe_load(f))


def default_store_url() -> str:
    """The store used when none is configured: a directory that outlives the cluster.

    It sits in the user's cache directory rather than a temporary directory, so that
    results survive a restart of the cluster (and of the machine) on this host.
    """
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return "file://" + os.path.join(cache, "dask-storage-scheduler")


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with capped exponential backoff for transient store errors.

    Examples
    --------
    >>> RetryPolicy(attempts=3, delay_min=0.1, delay_max=1.0).delays()
    [0.1, 0.2]
    """

    attempts: int = 4
    delay_min: float = 0.1
    delay_max: float = 5.0

    def delays(self) -> list[float]:
        """Sleep before each retry (one fewer than ``attempts``)."""
        return [min(self.delay_min * 2**i, self.delay_max) for i in range(self.attempts - 1)]


@dataclass(frozen=True)
class StoreSettings:
    """Everything needed to open a :class:`~storage_scheduler.store.Store`.

    Build it with :meth:`from_config`, which validates every value and raises
    :class:`~storage_scheduler.StorageConfigError` naming the offending setting.
    """

    url: str
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    compression: str | bool | None = "auto"
    max_concurrency: int = 16
    connect_timeout: float = 30.0
    retry: RetryPolicy = RetryPolicy()

    @classmethod
    def from_config(
        cls, url: str | None = None, storage_options: Mapping[str, Any] | None = None
    ) -> StoreSettings:
        """Read ``storage-scheduler.*`` from dask config; arguments override it."""
        cfg = dask.config.get("storage-scheduler")
        url = url if url is not None else cfg.get("url")
        if url is None or url == "":
            url = default_store_url()
        if not isinstance(url, str):
            raise StorageConfigError(f"storage-scheduler.url must be a string, got {url!r}")
        options = dict(cfg.get("storage-options") or {})
        options.update(storage_options or {})
        retry = cfg.get("retry") or {}
        try:
            settings = cls(
                url=url,
                storage_options=options,
                compression=cfg.get("compression", "auto"),
                max_concurrency=int(cfg.get("max-concurrency", 16)),
                connect_timeout=float(parse_timedelta(cfg.get("connect-timeout", "30s"))),
                retry=RetryPolicy(
                    attempts=int(retry.get("attempts", 4)),
                    delay_min=float(parse_timedelta(retry.get("delay-min", "100ms"))),
                    delay_max=float(parse_timedelta(retry.get("delay-max", "5s"))),
                ),
            )
        except (TypeError, ValueError, KeyError) as e:
            raise StorageConfigError(f"invalid storage-scheduler setting: {e}") from e
        if settings.max_concurrency < 1:
            raise StorageConfigError("storage-scheduler.max-concurrency must be at least 1")
        if settings.retry.attempts < 1:
            raise StorageConfigError("storage-scheduler.retry.attempts must be at least 1")
        return settings


_load_defaults()
