"""Errors raised by storage_scheduler.

The hierarchy::

    * StorageSchedulerError
      + StorageConfigError      (also a ValueError)   bad URL, option or setting
      + StoreError              (also an OSError)     the store failed an operation
        - StoreUnavailableError                       unreachable, missing bucket, not writable
        - MissingObjectError    (also FileNotFoundError)  no object for a key
          - StaleObjectError                          the object holds another token
        - IntegrityError                              object truncated or corrupted
          - UntrustedObjectError                      not signed with the signing key

Storage backends raise the stdlib ``OSError`` family; :class:`~storage_scheduler.store.Store`
translates whatever else they raise into :class:`StoreError` at one boundary, so callers
never import backend-specific exceptions.
"""

from __future__ import annotations

__all__ = [
    "IntegrityError",
    "MissingObjectError",
    "StaleObjectError",
    "StorageConfigError",
    "StorageSchedulerError",
    "StoreError",
    "StoreUnavailableError",
    "UntrustedObjectError",
]


class StorageSchedulerError(Exception):
    """Base class of every error raised by storage_scheduler."""


class StorageConfigError(StorageSchedulerError, ValueError):
    """A setting, storage URL or storage option is invalid."""


class StoreError(StorageSchedulerError, OSError):
    """The store could not complete an operation."""


class StoreUnavailableError(StoreError):
    """The store cannot be reached, does not exist, or refuses writes."""


class MissingObjectError(StoreError, FileNotFoundError):
    """The store holds no object for a key (never written, or deleted)."""


class IntegrityError(StoreError):
    """A stored object is truncated or corrupted; it must not be deserialized."""


class UntrustedObjectError(IntegrityError):
    """A stored object, catalog segment or lease is not signed with the configured
    signing key (forged, or written by a cluster without the key): never unpickled."""


class StaleObjectError(MissingObjectError):
    """The object stored for a key was produced by other code (another token): for the
    reader, the result it wants is missing."""
