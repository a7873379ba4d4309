"""The worker side of storage_scheduler: the write path, the read path, their wiring."""

from __future__ import annotations

from storage_scheduler.worker.plugin import StorageWorkerPlugin, WorkerStoreOverride

__all__ = ["StorageWorkerPlugin", "WorkerStoreOverride"]
