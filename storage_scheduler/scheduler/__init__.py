"""The scheduler side of storage_scheduler: a thin plugin over lanes, reuse, retention."""

from __future__ import annotations

from storage_scheduler.scheduler.plugin import StorageSchedulerPlugin

__all__ = ["StorageSchedulerPlugin"]
