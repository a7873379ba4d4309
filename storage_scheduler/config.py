"""Settings of storage_scheduler, read from dask config.

The defaults live only in ``storage-scheduler.yaml``, the rules only in
``storage-scheduler-schema.yaml``: both are loaded when the package is imported, so
``dask.config.set``, YAML files and environment variables such as
``DASK_STORAGE_SCHEDULER__URL`` all work, and a value the schema rejects raises
:class:`~storage_scheduler.StorageConfigError` naming the setting. Settings are read when
stores and plugins are built, never at import, so that ``dask.config.set`` and
``gen_cluster(config=...)`` take effect.

Three groups, by who needs them:

* :class:`StoreSettings`: how to open the store; every process that opens it;
* :class:`WorkerSettings`: which results to store, where to read inputs; sent to workers;
* :class:`SchedulerSettings`: lanes, lifecycle, reuse and memory policy; never leaves the
  scheduler.
"""

from __future__ import annotations

import os
import pathlib
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

import dask.config
from dask.utils import parse_bytes, parse_timedelta

from storage_scheduler._exceptions import StorageConfigError

__all__ = [
    "RetryPolicy",
    "SchedulerSettings",
    "StoreSettings",
    "WorkerSettings",
    "default_store_url",
    "parse_storage_options",
    "redact_url",
]

_HERE = pathlib.Path(__file__).parent

with open(_HERE / "storage-scheduler.yaml") as _f:
    _DEFAULTS: dict[str, Any] = yaml.safe_load(_f)
with open(_HERE / "storage-scheduler-schema.yaml") as _f:
    _SCHEMA: dict[str, Any] = yaml.safe_load(_f)["properties"]["storage-scheduler"]


def _settings() -> dict[str, Any]:
    """``storage-scheduler.*`` over the package defaults, checked against the schema.

    Merged here rather than trusted to dask's defaults alone: code that resets dask
    config to a snapshot (distributed's test harness, for one) drops them.
    """
    cfg: dict[str, Any] = dask.config.merge(
        _DEFAULTS["storage-scheduler"], dask.config.get("storage-scheduler", {})
    )
    _validate(cfg, _SCHEMA, "storage-scheduler")
    return cfg


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "null": (type(None),),
    "array": (list, tuple),
}


def _validate(value: Any, schema: Mapping[str, Any], path: str) -> None:
    """Check ``value`` against the subset of JSON schema our schema file uses.

    Examples
    --------
    >>> _validate(3, {"type": "integer", "minimum": 1}, "lanes")
    >>> _validate(0, {"type": "integer", "minimum": 1}, "lanes")
    Traceback (most recent call last):
    ...
    storage_scheduler._exceptions.StorageConfigError: lanes must be at least 1, got 0
    """
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        ok = any(
            isinstance(value, _JSON_TYPES[t])
            # bool is an int in Python, not in JSON schema
            and not (isinstance(value, bool) and t in ("integer", "number"))
            for t in names
        )
        if not ok:
            raise StorageConfigError(f"{path} must be of type {' or '.join(names)}, got {value!r}")
    if "enum" in schema and value not in schema["enum"]:
        choices = ", ".join(repr(c) for c in schema["enum"])
        raise StorageConfigError(f"{path} must be one of {choices}, got {value!r}")
    if "minimum" in schema and isinstance(value, (int, float)) and value < schema["minimum"]:
        raise StorageConfigError(f"{path} must be at least {schema['minimum']}, got {value!r}")
    if "maximum" in schema and isinstance(value, (int, float)) and value > schema["maximum"]:
        raise StorageConfigError(f"{path} must be at most {schema['maximum']}, got {value!r}")
    if isinstance(value, (list, tuple)) and "items" in schema:
        for i, item in enumerate(value):
            _validate(item, schema["items"], f"{path}[{i}]")
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                _validate(value[key], sub, f"{path}.{key}")


def _seconds(cfg: Mapping[str, Any], name: str, path: str) -> float:
    try:
        return float(parse_timedelta(cfg[name]))
    except (TypeError, ValueError, KeyError) as e:
        raise StorageConfigError(f"{path}.{name}: not a duration: {cfg[name]!r}") from e


def default_store_url() -> str:
    """The store used when none is configured: a directory that outlives the cluster.

    It sits in the user's cache directory rather than a temporary directory, so that
    results survive a restart of the cluster (and of the machine) on this host.
    """
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return "file://" + os.path.join(cache, "dask-storage-scheduler")


def redact_url(url: str) -> str:
    """``url`` for messages, pages and reprs: user info and query string replaced.

    Presigned and SAS URLs carry their credentials in the query string, others in the
    user info; scheme, host and path stay.

    Examples
    --------
    >>> redact_url("http://user:secret@host/path?sig=abc&se=1")
    'http://***@host/path?***'
    >>> redact_url("s3://bucket/prefix")
    's3://bucket/prefix'
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    rest, question, _ = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    _, at, host = netloc.rpartition("@")
    netloc = f"***@{host}" if at else netloc
    return f"{scheme}://{netloc}{slash}{path}" + ("?***" if question else "")


def redact(text: str, url: str) -> str:
    """``text`` (an error message, say) without the secret parts of ``url`` in it.

    Examples
    --------
    >>> redact("GET https://u:pw@h/p?sig=s failed", "https://u:pw@h/p?sig=s")
    'GET https://***@h/p?*** failed'
    """
    text = text.replace(url, redact_url(url))
    _, sep, rest = url.partition("://")
    netloc = rest.partition("/")[0].partition("?")[0]
    secrets = [netloc.rpartition("@")[0], rest.partition("?")[2]] if sep else []
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with capped exponential backoff for transient store errors.

    Examples
    --------
    >>> RetryPolicy(attempts=3, delay_min=0.1, delay_max=1.0).delays()
    [0.1, 0.2]
    """

    attempts: int
    delay_min: float
    delay_max: float
    #: How long (seconds) a read of a stored result keeps retrying while the store does
    #: not answer, counted from its first failure; 0: ``attempts`` tries only.
    outage_window: float = 0.0

    def delay(self, i: int) -> float:
        """Sleep before retry ``i`` (from 0): doubling from ``delay_min``, capped."""
        return min(self.delay_min * 2.0 ** min(i, 62), self.delay_max)

    def delays(self) -> list[float]:
        """Sleep before each retry (one fewer than ``attempts``)."""
        return [self.delay(i) for i in range(self.attempts - 1)]


@dataclass(frozen=True)
class StoreSettings:
    """Everything needed to open a :class:`~storage_scheduler.Store`.

    Build it with :meth:`from_config`, which validates every value and raises
    :class:`~storage_scheduler.StorageConfigError` naming the offending setting.
    """

    url: str
    storage_options: Mapping[str, Any]
    compression: str | bool | None
    max_concurrency: int
    connect_timeout: float
    retry: RetryPolicy
    #: Keys of the objects' MACs: the first signs, any verifies. Never shown.
    signing_keys: tuple[bytes, ...] = ()

    @property
    def signing_key(self) -> bytes | None:
        """The key new objects and files are signed with (the first configured)."""
        return self.signing_keys[0] if self.signing_keys else None

    def __repr__(self) -> str:
        # Storage options may hold credentials: name them, never show their values.
        options = ", ".join(self.storage_options)
        return f"StoreSettings(url={redact_url(self.url)!r}, storage_options=<{options}>)"

    @classmethod
    def from_config(
        cls,
        url: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        signing_key: str | Sequence[str] | None = None,
    ) -> StoreSettings:
        """Read ``storage-scheduler.*`` from dask config; arguments override it."""
        cfg = _settings()
        if signing_key is None:
            signing_key = cfg["signing-key"]
        else:
            _validate(signing_key, _SCHEMA["properties"]["signing-key"], "signing_key")
        keys = [signing_key] if isinstance(signing_key, str) else list(signing_key or ())
        url = url if url is not None else cfg["url"]
        if not url:
            url = default_store_url()
        _validate(url, {"type": "string"}, "storage-scheduler.url")
        retry = cfg["retry"]
        window = _seconds(retry, "outage-window", "storage-scheduler.retry")
        if window < 0:
            raise StorageConfigError(
                f"storage-scheduler.retry.outage-window must not be negative, got {window}"
            )
        return cls(
            url=url,
            storage_options={**cfg["storage-options"], **(storage_options or {})},
            compression=cfg["compression"],
            max_concurrency=cfg["max-concurrency"],
            connect_timeout=_seconds(cfg, "connect-timeout", "storage-scheduler"),
            retry=RetryPolicy(
                attempts=retry["attempts"],
                delay_min=_seconds(retry, "delay-min", "storage-scheduler.retry"),
                delay_max=_seconds(retry, "delay-max", "storage-scheduler.retry"),
                outage_window=window,
            ),
            signing_keys=tuple(k.encode() for k in keys if k),
        )


@dataclass(frozen=True)
class WorkerSettings:
    """What workers need to know to store results and read inputs (sent to them).

    Examples
    --------
    >>> WorkerSettings.from_config().results
    'all'
    """

    #: ``"all"``: store every result except keys annotated ``storage=False``;
    #: ``"annotated"``: store only keys annotated ``storage=True``.
    results: str
    #: ``"store"`` or ``"peer"``: the source a worker prefers for an input both hold.
    prefer: str
    #: Version salt of every task token: change it to invalidate all stored results.
    version: str | None
    #: Whether new results are written (``storage_scheduler.disable`` turns it off;
    #: stored results are still read).
    write: bool = True
    #: Managed memory, as a fraction of the memory limit, above which a worker drops
    #: stored results from RAM (its own spilling then drops them first); None: never.
    relief_threshold: float | None = None
    #: ``"all"``: store every selected result; ``"worth-storing"``: not those cheaper
    #: to recompute from stored inputs than to write and read back.
    policy: str = "all"
    #: Most estimated recompute work (seconds) an unstored result may stand for.
    recompute_limit: float = 1.0
    #: ``"write-through"``: report a task once its result is stored; ``"write-behind"``:
    #: report it at once, record the store as a holder when the write lands.
    durability: str = "write-through"
    #: Bytes of results awaiting upload per worker (with ``max-concurrency`` results).
    write_buffer: int = 128 * 2**20

    @classmethod
    def from_config(cls) -> WorkerSettings:
        cfg = _settings()
        version = cfg["version"]
        relief = None if cfg["memory-relief"] == "never" else float(cfg["relief-threshold"])
        limit = _seconds(cfg, "recompute-limit", "storage-scheduler")
        if limit < 0:
            raise StorageConfigError(
                f"storage-scheduler.recompute-limit must not be negative, got {limit}"
            )
        try:
            buffer = parse_bytes(cfg["write-buffer"])
        except (TypeError, ValueError) as e:
            raise StorageConfigError(
                f"storage-scheduler.write-buffer: not a size: {cfg['write-buffer']!r}"
            ) from e
        if buffer < 1:
            raise StorageConfigError(
                f"storage-scheduler.write-buffer must be positive, got {cfg['write-buffer']!r}"
            )
        return cls(
            results=cfg["results"],
            prefer=cfg["prefer"],
            version=None if version is None else str(version),
            relief_threshold=relief,
            policy=cfg["policy"],
            recompute_limit=limit,
            durability=cfg["durability"],
            write_buffer=buffer,
        )


@dataclass(frozen=True)
class SchedulerSettings:
    """Lanes, lifecycle, reuse and memory policy: only the scheduler reads these."""

    #: Number of storage lanes (pseudo-workers holding stored keys).
    lanes: int
    #: ``"intermediates"``: delete results no client asked for once nothing needs them;
    #: ``"never"``: keep everything until ``dask storage gc``.
    gc: str
    #: How often (seconds) the scheduler writes catalog changes to the store.
    flush_interval: float
    #: Also require the tokens of every upstream task to match before reusing a result.
    lineage: bool
    #: When workers drop in-memory copies of stored results: never, pressure, always.
    memory_relief: str
    #: Managed memory, as a fraction of the memory limit, above which ``pressure`` drops.
    relief_threshold: float
    worker: WorkerSettings = field(default_factory=WorkerSettings.from_config)

    @classmethod
    def from_config(cls, lanes: int | None = None) -> SchedulerSettings:
        cfg = _settings()
        if lanes is not None:
            _validate(lanes, _SCHEMA["properties"]["lanes"], "storage-scheduler.lanes")
        flush_interval = _seconds(cfg, "flush-interval", "storage-scheduler")
        if flush_interval <= 0:  # the maintenance loop would spin
            raise StorageConfigError(
                f"storage-scheduler.flush-interval must be positive, got {cfg['flush-interval']!r}"
            )
        return cls(
            lanes=cfg["lanes"] if lanes is None else lanes,
            gc=cfg["gc"],
            flush_interval=flush_interval,
            lineage=cfg["lineage"],
            memory_relief=cfg["memory-relief"],
            relief_threshold=float(cfg["relief-threshold"]),
            worker=WorkerSettings.from_config(),
        )


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


dask.config.update_defaults(_DEFAULTS)
