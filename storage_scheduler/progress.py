"""Progress of long store operations, drawn on one terminal line.

``dask storage verify``, ``rebuild-catalog`` and ``gc`` walk every object of a store that
may hold millions. The work counts what it did in a :class:`Tally` (two integer additions
per object, on the event loop; nothing else), and a :class:`ProgressLine` redraws one
line of stderr in place (``\\r``) from a thread of its own a few times a second: objects
and bytes done, the rate and, once a listing gave the totals, the time left. A terminal
write that stalls (a paused terminal) stalls that thread, never the event loop. Nothing is
drawn when stderr is not a terminal, or with ``quiet``.

Why not ``click.progressbar``: it counts one quantity, redraws from the thread that
updates it (here the event loop) and writes its label even when the output is not a
terminal. ``dask.diagnostics.ProgressBar`` follows the tasks of Dask's local schedulers,
not store operations.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from types import TracebackType
from typing import TextIO

from dask.utils import format_bytes, format_time

__all__ = ["ProgressLine", "Tally"]


class Tally:
    """What a long operation has done so far, in its current phase.

    Updated by the operation (any thread, usually the event loop) and read by a
    :class:`ProgressLine`. Without locks: a line drawn between two updates may be one
    object behind, which nobody can see.

    Examples
    --------
    >>> tally = Tally()
    >>> tally.begin("checked", total=2, total_bytes=300)
    >>> tally.add(100)
    >>> tally.done, tally.done_bytes
    (1, 100)
    """

    __slots__ = ("done", "done_bytes", "phase", "started", "total", "total_bytes")

    #: What is being done, as a past participle ("checked") or an activity ("listing").
    phase: str
    #: Objects in this phase, if known (a listing came first).
    total: int | None
    total_bytes: int | None
    done: int
    done_bytes: int
    #: ``time.monotonic()`` at the start of the phase.
    started: float

    def __init__(self) -> None:
        self.begin("starting")

    def begin(self, phase: str, total: int | None = None, total_bytes: int | None = None) -> None:
        """Start a phase: counts back to zero, totals as given."""
        self.done = self.done_bytes = 0
        self.total, self.total_bytes = total, total_bytes
        self.started = time.monotonic()
        self.phase = phase

    def add(self, nbytes: int = 0, n: int = 1) -> None:
        """Count ``n`` more objects of ``nbytes`` bytes in all."""
        self.done += n
        self.done_bytes += nbytes

    def line(self, now: float | None = None, final: bool = False) -> str:
        """The progress line: the time left comes early, so that a narrow terminal cuts
        the rates rather than it.

        >>> t = Tally()
        >>> t.begin("checked", total=4, total_bytes=4096)
        >>> t.add(1024, 2)
        >>> t.line(now=t.started + 2.0)
        'checked 2/4 objects (50%, 2.00 s left), 1.00 kiB of 4.00 kiB, 1/s, 512 B/s'
        >>> t.line(now=t.started + 2.0, final=True)
        'checked 2/4 objects (50%, in 2.00 s), 1.00 kiB of 4.00 kiB, 1/s, 512 B/s'
        """
        elapsed = max((time.monotonic() if now is None else now) - self.started, 1e-9)
        done, total = self.done, self.total
        if not done and total is None:
            return f"{self.phase}... {format_time(elapsed)}"
        rate = done / elapsed
        notes = [f"{100 * done // total}%"] if total else []
        if final:
            notes.append(f"in {format_time(elapsed)}")
        elif total is not None and rate > 0:
            notes.append(f"{format_time(max(total - done, 0) / rate)} left")
        head = f"{self.phase} {done:,}" + (f"/{total:,}" if total is not None else "")
        head += " objects" + (f" ({', '.join(notes)})" if notes else "")
        nbytes = format_bytes(self.done_bytes)
        if self.total_bytes is not None:
            nbytes += f" of {format_bytes(self.total_bytes)}"
        return ", ".join(
            [head, nbytes, f"{rate:,.0f}/s", f"{format_bytes(int(self.done_bytes / elapsed))}/s"]
        )


class ProgressLine:
    """Draw a :class:`Tally` on one line of ``stream`` (stderr) while a block runs.

    Parameters
    ----------
    tally
        What to draw.
    label
        Put before the line (the command's name).
    stream
        Where to draw; default ``sys.stderr``. Nothing is drawn unless it is a terminal.
    quiet
        Draw nothing.
    interval
        Seconds between redraws.

    Notes
    -----
    A daemon thread redraws the line; leaving the block stops it and draws the final
    line, ended by a newline (also when the block raised: the error message then starts
    on a line of its own).
    """

    def __init__(
        self,
        tally: Tally,
        label: str,
        stream: TextIO | None = None,
        *,
        quiet: bool = False,
        interval: float = 0.2,
    ):
        self.tally = tally
        self.label = label
        self.stream = sys.stderr if stream is None else stream
        self.interval = interval
        self.enabled = not quiet and _isatty(self.stream)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._drawn = 0  # length of the line on screen, to blank what a shorter one leaves

    def __enter__(self) -> ProgressLine:
        if self.enabled:
            self._thread = threading.Thread(
                target=self._run, name="dask-storage-progress", daemon=True
            )
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._draw(final=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._draw()

    def _draw(self, final: bool = False) -> None:
        line = f"{self.label}: {self.tally.line(final=final)}"
        try:
            width = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError):
            width = 80
        if width > 1:
            line = line[: width - 1]  # a wrapped line cannot be redrawn in place
        try:
            self.stream.write("\r" + line.ljust(self._drawn) + ("\n" if final else ""))
            self.stream.flush()
        except (OSError, ValueError):  # the terminal went away: the work goes on
            self._stop.set()
        self._drawn = len(line)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
