"""What an error from the store means for whoever asked: one place decides.

Backends raise whatever their libraries raise (the ``OSError`` family, botocore errors,
asyncio timeouts). Callers should not have to know those: the scheduler wants to know
whether a result is *missing* (recompute it), *damaged* (recompute it, and the stored
bytes must not be trusted) or whether the store is *unavailable* (recomputing does not
fix the store; retry later or give up). The store's retry layer asks the narrower
question of whether repeating the very same call may succeed (:func:`is_transient`);
readers ask whether the store is down for now (:func:`is_outage`), to wait for it or read
from another holder instead.
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

__all__ = ["Outcome", "classify", "describe", "is_outage", "is_transient"]

#: See :func:`classify`.
Outcome = Literal["missing", "damaged", "unavailable"]

#: Errors worth another try: the operation may succeed if repeated. EBUSY and EREMOTEIO
#: are what s3fs makes of throttling (503 SlowDown) and 500 InternalError.
_TRANSIENT_ERRNOS = frozenset(
    {
        errno.EAGAIN,
        errno.EBUSY,
        errno.ETIMEDOUT,
        errno.ECONNRESET,
        errno.EINTR,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
        errno.EREMOTEIO,
    }
)
#: botocore's connection failures, which s3fs raises as they are once its own retries
#: are spent; matched by name so that botocore need not be installed.
_TRANSIENT_BOTOCORE = frozenset({"HTTPClientError", "ConnectionError"})
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
    """Whether repeating the operation that raised ``exc`` may succeed: the store did
    not answer (connection errors, timeouts, throttling, server errors).

    Examples
    --------
    >>> is_transient(ConnectionResetError())
    True
    >>> is_transient(OSError(errno.ENOSPC, "No space left on device"))
    False
    """
    if isinstance(exc, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    return any(
        cls.__module__ == "botocore.exceptions" and cls.__name__ in _TRANSIENT_BOTOCORE
        for cls in type(exc).__mro__
    )


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says the store is down for now (rather than that an object is
    missing or damaged, or that access is refused): a reader should try another holder
    or try again later, and nobody should treat the stored result as lost."""
    return isinstance(exc, StoreUnavailableError) or is_transient(exc)


def describe(exc: BaseException) -> str:
    """A short account of ``exc`` for an error message (it never holds storage options)."""
    if isinstance(exc, PermissionError):
        return f"permission denied ({exc.filename or exc})"
    if isinstance(exc, FileNotFoundError):
        return f"not found ({exc.filename or exc}): does the bucket or directory exist?"
    return f"{type(exc).__name__}: {exc}"
