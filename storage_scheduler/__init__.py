"""Shared storage for Dask task results.

Results of tasks are written to a store given by an fsspec URL, so that they outlive the
worker that computed them and the cluster itself.
"""

from __future__ import annotations

from storage_scheduler import config as _config  # noqa: F401  (loads the config defaults)
from storage_scheduler._exceptions import (
    IntegrityError,
    MissingObjectError,
    StorageConfigError,
    StorageSchedulerError,
    StoreError,
    StoreUnavailableError,
    UntrustedObjectError,
)
from storage_scheduler.config import SchedulerSettings, StoreSettings, WorkerSettings
from storage_scheduler.dashboard import StorageReport, status
from storage_scheduler.enable import disable, enable
from storage_scheduler.preload import dask_setup, dask_teardown
from storage_scheduler.scheduler import StorageSchedulerPlugin
from storage_scheduler.store import Store
from storage_scheduler.worker import StorageWorkerPlugin

__all__ = [
    "IntegrityError",
    "MissingObjectError",
    "SchedulerSettings",
    "StorageConfigError",
    "StorageReport",
    "StorageSchedulerError",
    "StorageSchedulerPlugin",
    "StorageWorkerPlugin",
    "Store",
    "StoreError",
    "StoreSettings",
    "StoreUnavailableError",
    "UntrustedObjectError",
    "WorkerSettings",
    "dask_setup",
    "dask_teardown",
    "disable",
    "enable",
    "status",
]
