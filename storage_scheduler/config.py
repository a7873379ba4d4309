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
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import dask.config
import yaml
from dask.utils import parse_timedelta

from storage_scheduler._exceptions import StorageConfigError

__all__ = [
    "RetryPolicy",
    "RoutingSettings",
    "StoreSettings",
    "default_store_url",
    "parse_storage_options",
]

_HERE = pathlib.Path(__file__).parent


with open(_HERE / "storage-scheduler.yaml") as _f:
    _DEFAULTS: dict[str, Any] = yaml.safe_load(_f)


def _load_defaults() -> None:
    dask.config.update_defaults(_DEFAULTS)


def _settings() -> dict[str, Any]:
    """``storage-scheduler.*`` over the package defaults.

    Merged here rather than trusted to dask's defaults alone: code that resets dask
    config to a snapshot (distributed's test harness, for one) drops them.
    """
    return dask.config.merge(_DEFAULTS["storage-scheduler"], dask.config.get("storage-scheduler", {}))  # type: ignore[no-any-return]


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

    def __repr__(self) -> str:
        # Storage options may hold credentials: name them, never show their values.
        return f"StoreSettings(url={self.url!r}, storage_options=<{', '.join(self.storage_options)}>)"

    @classmethod
    def from_config(
        cls, url: str | None = None, storage_options: Mapping[str, Any] | None = None
    ) -> StoreSettings:
        """Read ``storage-scheduler.*`` from dask config; arguments override it."""
        cfg = _settings()
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


@dataclass(frozen=True)
class RoutingSettings:
    """How a cluster routes results through the store; decided by the scheduler.

    Examples
    --------
    >>> RoutingSettings.from_config().results
    'all'
    """

    #: ``"all"``: store every result except keys annotated ``storage=False``;
    #: ``"annotated"``: store only keys annotated ``storage=True``.
    results: str = "all"
    #: ``"store"`` or ``"peer"``: the source a worker prefers for an input both hold.
    prefer: str = "store"
    #: Number of storage lanes (pseudo-workers holding stored keys).
    lanes: int = 8
    #: Version salt of every task token: change it to invalidate all stored results.
    version: str | None = None
    #: ``"intermediates"``: delete results no client asked for once they are forgotten;
    #: ``"never"``: keep everything until ``dask storage gc``.
    gc: str = "intermediates"
    #: How often (seconds) the scheduler writes catalog changes to the store.
    flush_interval: float = 0.5
    #: Also require the tokens of every upstream task to match before reusing a result.
    lineage: bool = False
    #: When workers drop in-memory copies of stored results: never, pressure, always.
    memory_relief: str = "pressure"
    #: Managed memory, as a fraction of the memory limit, above which ``pressure`` drops.
    relief_threshold: float = 0.5

    @classmethod
    def from_config(cls, lanes: int | None = None) -> RoutingSettings:
        cfg = _settings()
        out = cls(
            results=str(cfg.get("results", "all")),
            prefer=str(cfg.get("prefer", "store")),
            lanes=lanes if lanes is not None else cfg.get("lanes", 8),
            version=None if cfg.get("version") is None else str(cfg["version"]),
            gc=str(cfg.get("gc", "intermediates")),
            flush_interval=float(parse_timedelta(cfg.get("flush-interval", "500ms"))),
            lineage=bool(cfg.get("lineage", False)),
            memory_relief=str(cfg.get("memory-relief", "pressure")),
            relief_threshold=float(cfg.get("relief-threshold", 0.5)),
        )
        if out.memory_relief not in ("never", "pressure", "always"):
            raise StorageConfigError(
                "storage-scheduler.memory-relief must be 'never', 'pressure' or 'always', "
                f"got {out.memory_relief!r}"
            )
        if not 0 <= out.relief_threshold <= 1:
            raise StorageConfigError(
                f"storage-scheduler.relief-threshold must be in [0, 1], got {out.relief_threshold!r}"
            )
        if out.gc not in ("intermediates", "never"):
            raise StorageConfigError(
                f"storage-scheduler.gc must be 'intermediates' or 'never', got {out.gc!r}"
            )
        if out.results not in ("all", "annotated"):
            raise StorageConfigError(
                f"storage-scheduler.results must be 'all' or 'annotated', got {out.results!r}"
            )
        if out.prefer not in ("store", "peer"):
            raise StorageConfigError(
                f"storage-scheduler.prefer must be 'store' or 'peer', got {out.prefer!r}"
            )
        if not isinstance(out.lanes, int) or isinstance(out.lanes, bool) or out.lanes < 1:
            raise StorageConfigError(
                f"storage-scheduler.lanes must be a positive integer, got {out.lanes!r}"
            )
        return out


def parse_storage_options(items: Iterable[str]) -> dict[str, Any]:
    """Parse ``key=value`` command-line options; values are read as YAML scalars.

    Examples
    --------
    >>> parse_storage_options(["anon=true", "endpoint_url=http://127.0.0.1:9000"])
    {'anon': True, 'endpoint_url': 'http://127.0.0.1:9000'}
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise StorageConfigError(f"--storage-option takes key=value, got {shlex.quote(item)}")
        out[key.strip()] = yaml.safe_load(value) if value else ""
    return out


_load_defaults()
