"""CPU-bound Python work in a thread beside an event loop.

A thread computing in Python keeps the GIL until the switch interval (5 ms) runs out.
Each time the event loop's thread lets go of the GIL for a system call (distributed's
system monitor makes dozens per tick, reading ``/proc``), the computing thread takes it,
and the loop waits up to 5 ms to get it back: one loop step of a few dozen system calls
then stalls for 100 ms or more. Work in threads therefore lets go of the GIL on its own
every few hundred microseconds, for long enough that a waiting thread takes it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

__all__ = ["free_in_slices", "in_slices"]

T = TypeVar("T")

#: Items per slice: a few hundred microseconds of work on small items.
SLICE = 1024
#: How long the thread lets go of the GIL: ``sleep(0)`` releases it, but this thread
#: usually takes it back before the waiting one wakes up.
HAND_OVER = 1e-4


def in_slices(items: Sequence[T], size: int = SLICE) -> Iterator[Sequence[T]]:
    """``items`` in slices of ``size``, handing the GIL to any thread waiting for it
    before each (call it from a thread, never from the event loop)."""
    for i in range(0, len(items), size):
        time.sleep(HAND_OVER)
        yield items[i : i + size]


def free_in_slices(items: list[Any], size: int = SLICE) -> None:
    """Empty ``items``, a slice at a time: freeing a big list touches every object it
    holds (~70 ms per million) in one call."""
    while items:
        del items[-size:]
        time.sleep(HAND_OVER)
