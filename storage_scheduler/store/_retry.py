"""Retries of store operations, and outages: a store that does not answer for a while.

Two layers of patience, both with the backoff of ``retry.delay-min`` doubling up to
``retry.delay-max``:

* every operation gets ``retry.attempts`` tries on a transient error (a dropped
  connection, a timeout, throttling; see :func:`~storage_scheduler.store._errors.is_transient`),
  except on filesystems that retry by themselves (s3fs);
* reads of stored results go on until ``retry.outage-window`` has passed since their
  first failure, then raise :class:`~storage_scheduler.StoreUnavailableError`. A store
  that is down must not be taken for one that lost its objects: that would recompute
  intact results, and drop them from a catalog other clusters share. Writes do not wait:
  a writer that cannot store a result keeps it in worker memory instead.

Other errors are raised at once: a missing object, a full or read-only store, a refusal.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from storage_scheduler._exceptions import StoreError, StoreUnavailableError
from storage_scheduler.config import StoreSettings, redact
from storage_scheduler.store._errors import is_transient

__all__ = ["Retrier"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Retrier:
    """The retries of one store, and whether it is in an outage.

    Parameters
    ----------
    settings
        The store's settings: ``retry`` and the URL (to redact from messages).
    url
        The store's URL for messages.
    retries_itself
        Whether the filesystem retries transient errors itself: then only the outage
        window applies.

    Notes
    -----
    Runs on whatever event loop awaits it; waits with ``asyncio.sleep``, so a retrying
    operation neither blocks its loop nor resists cancellation.
    """

    settings: StoreSettings
    url: str
    #: Tries of an operation before the outage window (if any) takes over.
    tries: int
    #: Since when (``time.monotonic``) the store has not answered; None while it does.
    outage_since: float | None

    def __init__(self, settings: StoreSettings, url: str, *, retries_itself: bool):
        self.settings = settings
        self.url = url
        self.tries = 1 if retries_itself else settings.retry.attempts
        self.outage_since = None

    async def run(
        self,
        op: str,
        where: Callable[[], str],
        fn: Callable[[], Awaitable[T]],
        *,
        outage: bool = False,
    ) -> T:
        """Await ``fn()``, retrying transient errors; translate errors that are not
        ``OSError`` into :class:`StoreError`. ``where`` names the path in messages;
        ``outage``: retry for up to ``retry.outage-window``, then raise
        :class:`StoreUnavailableError`."""
        policy = self.settings.retry
        window = policy.outage_window if outage else 0.0
        first_failure = 0.0
        attempt = 0
        while True:
            try:
                result = await fn()
            except Exception as e:
                now = time.monotonic()
                first_failure = first_failure or now
                waited = now - first_failure
                transient = is_transient(e)
                if transient and (attempt + 1 < self.tries or waited < window):
                    delay = policy.delay(attempt)
                    if attempt + 1 >= self.tries:  # the short retries did not do
                        self._outage_began(op, where(), e)
                        delay = min(delay, window - waited)
                    logger.debug("%s %s failed (%r); retrying", op, where(), e)
                    attempt += 1
                    await asyncio.sleep(delay)
                    continue
                if transient and window:
                    message = (
                        f"{op} {where()}: the store has not answered for {waited:.3g}s "
                        f"(retry.outage-window): {e!r}"
                    )
                    raise StoreUnavailableError(redact(message, self.settings.url)) from e
                if isinstance(e, OSError):
                    raise
                message = redact(f"{op} {where()} failed: {e!r}", self.settings.url)
                raise StoreError(message) from e
            # Only a read says the store answers reads again (writes may work meanwhile).
            if outage and self.outage_since is not None:
                self._outage_ended()
            return result

    def _outage_began(self, op: str, where: str, error: Exception) -> None:
        """Warn once per outage, not once per read or attempt."""
        if self.outage_since is None:
            self.outage_since = time.monotonic()
            logger.warning(
                "The store %s does not answer (%s %s: %r); reads wait up to %gs for it",
                self.url,
                op,
                where,
                error,
                self.settings.retry.outage_window,
            )

    def _outage_ended(self) -> None:
        assert self.outage_since is not None
        logger.warning(
            "The store %s answers again, after %.1fs",
            self.url,
            time.monotonic() - self.outage_since,
        )
        self.outage_since = None
