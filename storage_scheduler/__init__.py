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
)
from storage_scheduler.config import StoreSettings
from storage_scheduler.store import Store

__all__ = [
    "IntegrityError",
    "MissingObjectError",
    "StorageConfigError",
    "StorageSchedulerError",
    "Store",
    "StoreError",
    "StoreSettings",
    "StoreUnavailableError",
]
