"""Progress of ``dask storage verify``, ``rebuild-catalog`` and ``gc`` on a store of 10,000
objects: one line redrawn in place on a terminal, nothing in scripts or with ``--quiet``."""

from __future__ import annotations

import asyncio
import fcntl
import io
import os
import re
import shutil
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest

from storage_scheduler import Store
from storage_scheduler.progress import ProgressLine, Tally
from storage_scheduler.store import serialize
from storage_scheduler.store.catalog import Catalog

N = 10_000


def fill(url: str) -> None:
    """N small real objects (they verify) and a catalog that lists them."""

    async def go() -> None:
        store = Store.from_url(url)
        catalog = Catalog(store)

        def write_all() -> None:
            # Written here in one thread: Store.put would take several seconds for this
            # many objects on two cores, and only their bytes matter to the commands.
            for i in range(N):
                key, path = f"obj-{i}", store.path(f"obj-{i}", "t")
                frames = serialize.encode(key, i * 1.5, token="t")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.writelines(frames)
                catalog.add(key, "t", os.path.getsize(path))

        await asyncio.to_thread(write_all)
        await catalog.flush()
        store.close()

    asyncio.run(go())


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("progress") / "store"
    fill(str(path))
    return path


@pytest.fixture
def store_dir(filled: Path, tmp_path: Path) -> str:
    """A copy of the filled store, for this test to change: hard links, since objects are
    only ever replaced by rename and deleted by unlink."""
    return str(shutil.copytree(filled, tmp_path / "store", copy_function=os.link))


def dask_storage(*args: str, terminal: bool) -> tuple[str, str, float]:
    """Run ``dask storage ARGS``; stdout is a pipe, stderr a pseudo-terminal or a pipe.
    Returns stdout, stderr and the wall time."""
    exe = os.path.join(os.path.dirname(sys.executable), "dask")
    start = time.monotonic()
    if not terminal:
        out = subprocess.run([exe, "storage", *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout, out.stderr, time.monotonic() - start
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen(
        [exe, "storage", *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave
    )
    os.close(slave)
    chunks: list[bytes] = []

    def pump() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal's last open end
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=pump)
    reader.start()
    stdout, _ = proc.communicate(timeout=60)
    reader.join(10)
    os.close(master)
    tty = b"".join(chunks).decode()
    assert proc.returncode == 0, tty
    return stdout.decode(), tty, time.monotonic() - start


def progress_lines(tty: str, label: str, elapsed: float) -> list[str]:
    """The successive states of the progress line; checks it was redrawn in place."""
    assert tty.startswith("\r") and tty.endswith("\r\n"), repr(tty[-200:])
    assert tty.count("\n") == 1, "the line is redrawn in place: one newline, at the end"
    lines = [part.rstrip() for part in tty[1:].removesuffix("\r\n").split("\r")]
    assert all(line.startswith(f"{label}: ") for line in lines), lines
    # At most a few redraws a second (every 0.2 s), and the final one.
    assert len(lines) <= elapsed / 0.2 + 2, (len(lines), elapsed)
    return lines


def counts(lines: list[str], verb: str) -> list[int]:
    found = [re.search(rf"{verb} ([\d,]+)/10,000 objects", line) for line in lines]
    return [int(m.group(1).replace(",", "")) for m in found if m]


@pytest.mark.slow
def test_progress_on_a_terminal(store_dir: str) -> None:
    stdout, tty, elapsed = dask_storage("verify", store_dir, terminal=True)
    assert f"{N} objects checked, 0 bad" in stdout
    lines = progress_lines(tty, "verify", elapsed)
    done = counts(lines, "checked")
    assert done == sorted(done) and done[-1] == N, lines
    final = lines[-1]
    assert re.search(r"checked 10,000/10,000 objects \(100%, in [\d.]+ m?s\), ", final), final
    assert re.search(r"B of [\d.]+ [kM]iB, [\d,]+/s, [\d.]+ [kM]?i?B/s$", final), final
    assert any(" left), " in line for line in lines), lines

    stdout, tty, elapsed = dask_storage("gc", store_dir, "--all", terminal=True)
    assert f"Deleted {N} stored results" in stdout
    lines = progress_lines(tty, "gc", elapsed)
    assert "deleted 10,000/10,000 objects (100%, in " in lines[-1], lines
    assert not [f for f in Path(store_dir, "objects").rglob("*") if f.is_file()]


@pytest.mark.slow
def test_quiet_without_a_terminal_or_with_quiet(store_dir: str) -> None:
    stdout, stderr, _ = dask_storage("rebuild-catalog", store_dir, terminal=False)
    assert stdout.strip() == f"Catalog rebuilt: {N} stored results"
    assert stderr == ""

    stdout, tty, _ = dask_storage("verify", store_dir, "--quiet", terminal=True)
    assert f"{N} objects checked, 0 bad" in stdout
    assert tty == ""


def test_rebuild_counts_every_object(store_dir: str) -> None:
    """The rebuild's tally, in process: totals from the listing, every object counted."""

    async def go() -> Tally:
        store = Store.from_url(store_dir)
        tally = Tally()
        assert await Catalog(store).rebuild(tally) == []
        store.close()
        return tally

    tally = asyncio.run(go())
    assert (tally.phase, tally.done, tally.total) == ("catalogued", N, N)
    assert (
        tally.done_bytes
        == tally.total_bytes
        == sum(f.stat().st_size for f in Path(store_dir, "objects").rglob("*") if f.is_file())
    )


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_progress_line_throttles_and_ends_with_a_newline() -> None:
    tally, stream = Tally(), Terminal()
    with ProgressLine(tally, "x", stream, interval=0.05):
        tally.begin("checked", total=1_000_000)
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            tally.add(10)
    text = stream.getvalue()
    assert text.count("\r") <= 0.5 / 0.05 + 2 and text.endswith("\n")
    assert f"checked {tally.done:,}/1,000,000 objects" in text.rsplit("\r", 1)[-1]


def test_nothing_drawn_unless_a_terminal_or_when_quiet() -> None:
    for stream, quiet in [(io.StringIO(), False), (Terminal(), True)]:
        with ProgressLine(Tally(), "x", stream, quiet=quiet, interval=0.01) as line:
            time.sleep(0.05)
        assert not line.enabled and stream.getvalue() == ""


def test_the_line_fits_the_terminal_and_is_drawn_after_an_error() -> None:
    stream = Terminal()
    with pytest.raises(RuntimeError), ProgressLine(Tally(), "x" * 200, stream):
        raise RuntimeError
    # StringIO has no terminal size: 80 columns.
    assert stream.getvalue() == "\r" + ("x" * 200)[:79] + "\n"
