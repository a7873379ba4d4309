"""What an error from the store means for whoever asked: one place decides.

Backends raise whatever their libraries raise (the ``OSError`` family, botocore errors,
asyncio timeouts). Callers should not have to know those: the scheduler wants to know
whether a result is *missing* (recompute it), *damaged* (recompute it, and the stored
bytes must not be trusted) or whether the store is *unavailable* (recomputing does not
fix the store; retry later or give up). The store's retry layer asks the narrower
question of whether repeating the very same call may succeed (:func:`is_transient`).
"""

from __future__ import annotations

import asyncio
import errno
from typing import Literal

from storage_scheduler._exceptions import (
    IntegrityError,
    MissingObjectError,
    StoreUnavailableError,
)

__all__ = ["Outcome", "classify", "describe", "is_transient"]

#: See :func:`classify`.
Outcome = Literal["missing", "damaged", "unavailable"]

#: Errors worth another try: the operation may succeed if repeated.
_TRANSIENT_ERRNOS = frozenset(
    {errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.EINTR}
)
#: Errnos that say the bytes read are wrong, rather than that reading failed.
_DAMAGED_ERRNOS = frozenset({errno.EBADMSG})


def classify(exc: BaseException) -> Outcome:
    """What an exception raised by a :class:`~storage_scheduler.store.Store` means.

    Parameters
    ----------
    exc
        Any exception a store operation raised.

    Returns
    -------
    ``"missing"``
        No object is stored there (``FileNotFoundError``, :class:`MissingObjectError`).
    ``"damaged"``
        An object is stored but its bytes are wrong (:class:`IntegrityError`).
    ``"unavailable"``
        Everything else: the store could not be asked (connection errors, timeouts,
        permissions, unknown errors). Unknown errors land here because treating them as
        missing or damaged would make callers recompute or overwrite results that may be
        fine.

    Examples
    --------
    >>> classify(FileNotFoundError("k"))
    'missing'
    >>> classify(ConnectionRefusedError())
    'unavailable'
    """
    # An explicit verdict of the store wins over the type it also derives from (a
    # missing bucket is reported as StoreUnavailableError, not as a missing key).
    if isinstance(exc, StoreUnavailableError):
        return "unavailable"
    if isinstance(exc, (FileNotFoundError, MissingObjectError)):
        return "missing"
    if isinstance(exc, IntegrityError):
        return "damaged"
    if isinstance(exc, OSError) and exc.errno in _DAMAGED_ERRNOS:
        return "damaged"
    return "unavailable"


def is_transient(exc: BaseException) -> bool:
    """Whether repeating the operation that raised ``exc`` may succeed."""
    if isinstance(exc, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
        return True
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS


def describe(exc: BaseException) -> str:
    """A short account of ``exc`` for an error message (it never holds storage options)."""
    if isinstance(exc, PermissionError):
        return f"permission denied ({exc.filename or exc})"
    if isinstance(exc, FileNotFoundError):
        return f"not found ({exc.filename or exc}): does the bucket or directory exist?"
    return f"{type(exc).__name__}: {exc}"
