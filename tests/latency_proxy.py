"""A TCP proxy that adds latency to every HTTP response, for S3 at real-world latency.

Real object stores answer a request in 10 to 100 ms; the moto server on loopback in well
under one. Put :class:`LatencyProxy` between s3fs and moto and every response's first
byte is held back ``delay`` seconds, as a distant store would hold it. Connections and
keep-alive work as usual: the proxy only forwards bytes, each direction in order.

It also reads the requests it forwards (just their request lines and framing), to count
them by method: ``PUT``, ``GET``, ``HEAD``, ``POST``, ``DELETE``, and ``LIST`` (a ``GET``
with ``list-type`` in its query, S3's ListObjectsV2), so that benchmarks can report
requests per task.

Used by the tests and by ``benchmarks/suite.py`` (the ``s3-latency`` workload)::

    with LatencyProxy(moto_endpoint, delay=0.02) as proxy:
        fs = s3fs.S3FileSystem(endpoint_url=proxy.endpoint)
        ...
        proxy.counts  # Counter({'PUT': 12, 'GET': 3, ...})

It runs its own event loop in a daemon thread, so that any process (a test, a benchmark
driving a ``LocalCluster``) can use it without an event loop of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from urllib.parse import urlsplit

__all__ = ["LatencyProxy", "RequestParser"]

#: Bytes read from a socket at once.
_CHUNK = 256 * 1024


class RequestParser:
    """Splits a stream of HTTP/1.1 requests into requests, to count them.

    Only framing is read: request line, ``Content-Length`` or chunked bodies. Feed it
    the bytes a client sends, in any pieces; :meth:`feed` returns the methods (``LIST``
    for S3 listings) of the requests whose heads arrived.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        #: Body bytes still to skip (Content-Length), or None while reading a head.
        self._body = 0
        #: Inside a chunked body: "size" (a chunk-size line), "data", "trailer".
        self._chunked: str | None = None
        #: The request target of the last request head read.
        self.last_target = ""

    def feed(self, data: bytes) -> list[str]:
        return [method for method, _ in self.feed_targets(data)]

    def feed_targets(self, data: bytes) -> list[tuple[str, str]]:
        """As :meth:`feed`, with each request's target (path and query)."""
        self._buf += data
        out: list[tuple[str, str]] = []
        while True:
            if self._body:
                take = min(self._body, len(self._buf))
                del self._buf[:take]
                self._body -= take
                if self._body:
                    return out
                continue
            if self._chunked is not None:
                if not self._chunk_step():
                    return out
                continue
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return out
            head = bytes(self._buf[:end]).decode("latin-1")
            del self._buf[: end + 4]
            method = self._start(head)
            out.append((method, self.last_target))

    def _start(self, head: str) -> str:
        lines = head.split("\r\n")
        method, _, rest = lines[0].partition(" ")
        target = rest.rpartition(" ")[0]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._chunked = "size"
        else:
            self._body = int(headers.get("content-length", "0") or 0)
        self.last_target = target
        query = urlsplit(target).query
        if method == "GET" and "list-type" in query:
            return "LIST"
        return method

    def _chunk_step(self) -> bool:
        """Consume one piece of a chunked body; False if more bytes are needed."""
        if self._chunked == "data":  # the chunk's data was skipped; its CRLF follows
            if len(self._buf) < 2:
                return False
            del self._buf[:2]
            self._chunked = "size"
            return True
        end = self._buf.find(b"\r\n")
        if end < 0:
            return False
        line = bytes(self._buf[:end])
        del self._buf[: end + 2]
        if self._chunked == "trailer":
            if not line:  # the empty line that ends the request
                self._chunked = None
            return True
        size = int(line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            self._chunked = "trailer"
        else:
            self._body = size
            self._chunked = "data"
        return True


class LatencyProxy:
    """Forwards 127.0.0.1:<port> to ``upstream``, delaying each response by ``delay``.

    Parameters
    ----------
    upstream
        ``http://host:port`` of the server (the moto server).
    delay
        Seconds each response's first byte is held back. May be changed while running.

    Notes
    -----
    The moto server closes its connection after every response (``Connection: close``),
    so each request comes on a new connection; the proxy adds no delay to connecting,
    which is what a connection kept alive to a real store costs. Servers that keep
    connections alive are reached over one connection per client connection.

    A response starts when the server sends bytes after the client sent some: HTTP/1.1
    clients (aiohttp, urllib3) do not pipeline, so that is the next response on the
    connection. An interim ``100 Continue`` counts as a response too, as it costs a
    round trip on a real store.
    """

    def __init__(self, upstream: str, delay: float = 0.0):
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.delay = delay
        self.counts: Counter[str] = Counter()
        #: Requests by method and by what they touch in a store's layout ("PUT objects").
        self.kinds: Counter[str] = Counter()
        self.connections = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self.port = 0
        self._pumps: set[asyncio.Future[None]] = set()
        self._handlers: set[asyncio.Task[object]] = set()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests(self) -> dict[str, int]:
        """Requests forwarded so far, by method (a copy)."""
        with self._lock:
            return dict(self.counts)

    def requests_by_kind(self) -> dict[str, int]:
        """Requests by method and part of the store: objects, catalog, leases, probes."""
        with self._lock:
            return dict(self.kinds)

    def reset(self) -> None:
        with self._lock:
            self.counts.clear()
            self.kinds.clear()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> LatencyProxy:
        started = threading.Event()

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            self._server = loop.run_until_complete(
                asyncio.start_server(self._handle, "127.0.0.1", 0)
            )
            self.port = self._server.sockets[0].getsockname()[1]
            started.set()
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
            loop.close()

        self._thread = threading.Thread(target=run, name="latency-proxy", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("the latency proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = self._thread = None

    def __enter__(self) -> LatencyProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        # Connections still open: stop their pumps; their handlers then close them.
        for task in list(self._pumps):
            task.cancel()
        handlers = list(self._handlers)
        if handlers:
            await asyncio.wait(handlers, timeout=5)

    # ------------------------------------------------------------------ forwarding

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.close()
            return
        # Set when the client sends: the server's next bytes start a response.
        turn = asyncio.Event()
        to_server = asyncio.ensure_future(self._requests(reader, up_writer, turn))
        to_client = asyncio.ensure_future(self._responses(up_reader, writer, turn))
        pumps = {to_server, to_client}
        self._pumps |= pumps
        me = asyncio.current_task()
        if me is not None:
            self._handlers.add(me)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._pumps -= pumps
            self._handlers.discard(me)  # type: ignore[arg-type]
            for w in (writer, up_writer):
                with contextlib.suppress(Exception):
                    w.close()

    async def _requests(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, turn: asyncio.Event
    ) -> None:
        parser = RequestParser()
        while data := await _read(reader):
            requests = parser.feed_targets(data)
            if requests:
                with self._lock:
                    self.counts.update(method for method, _ in requests)
                    self.kinds.update(f"{method} {_kind(target)}" for method, target in requests)
            turn.set()
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(Exception):
            writer.write_eof()

    async def _responses(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, turn: asyncio.Event
    ) -> None:
        while data := await _read(reader):
            if turn.is_set():
                turn.clear()
                if self.delay > 0:
                    await asyncio.sleep(self.delay)
            writer.write(data)
            await writer.drain()


#: The parts of a store's layout that requests are counted by.
_KINDS = ("objects", "catalog", "manifest", "leases", "probes")


def _kind(target: str) -> str:
    parts = urlsplit(target)
    words = parts.path.split("/") + parts.query.replace("%2F", "/").replace("=", "/").split("/")
    return next((w for w in words if w in _KINDS), "other")


async def _read(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.read(_CHUNK)
    except ConnectionError:  # reset by the other side: as good as closed
        return b""


def _main(argv: list[str]) -> None:  # pragma: no cover - manual use
    """``python -m tests.latency_proxy UPSTREAM DELAY_MS``: serve until interrupted."""
    proxy = LatencyProxy(argv[0], float(argv[1]) / 1000).start()
    print(proxy.endpoint, flush=True)
    try:
        while True:
            time.sleep(5)
            print(proxy.requests(), flush=True)
    except KeyboardInterrupt:
        proxy.stop()


if __name__ == "__main__":  # pragma: no cover
    import sys

    _main(sys.argv[1:])
