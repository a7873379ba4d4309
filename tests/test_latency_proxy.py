"""The latency proxy the S3-at-latency tests and benchmarks rely on."""

from __future__ import annotations

import http.client
import http.server
import threading
import time
import uuid
from typing import Any

import fsspec
import pytest

from tests.conftest import s3_options
from tests.latency_proxy import LatencyProxy, RequestParser


def test_parser_splits_requests() -> None:
    parser = RequestParser()
    stream = (
        b"PUT /b/k HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /b?list-type=2&prefix=a HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /b/k?uploads HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n4;ext=1\r\nGET \r\n0\r\nX-Trailer: 1\r\n\r\n"
        b"HEAD /b/k HTTP/1.1\r\n\r\nDELETE /b/k HTTP/1.1\r\n\r\n"
    )
    methods = []
    for i in range(0, len(stream), 7):  # in arbitrary pieces, as sockets deliver them
        methods += parser.feed(stream[i : i + 7])
    # The chunk "GET \r\n" is body, not a request.
    assert methods == ["PUT", "LIST", "POST", "HEAD", "DELETE"]


def fs_through(proxy: LatencyProxy) -> Any:
    options = {**s3_options(proxy.endpoint), "skip_instance_cache": True}
    return fsspec.filesystem("s3", **options)


@pytest.mark.parametrize("delay", [0.0, 0.05])
def test_proxy_delays_each_response(s3_endpoint: str, delay: float) -> None:
    with LatencyProxy(s3_endpoint, delay=delay) as proxy:
        fs = fs_through(proxy)
        bucket = f"proxy-{uuid.uuid4().hex[:8]}"
        fs.mkdir(bucket)
        fs.pipe(f"{bucket}/a", b"x" * 1000)
        proxy.reset()
        start = time.perf_counter()
        for _ in range(4):  # one connection, kept alive: 4 round trips
            # max_concurrency=1: one GET (else s3fs asks for the size first, a HEAD).
            assert fs.cat_file(f"{bucket}/a", max_concurrency=1) == b"x" * 1000
        elapsed = time.perf_counter() - start
        assert proxy.requests() == {"GET": 4}
        assert elapsed >= 4 * delay
        if delay:
            assert elapsed < 4 * delay + 1.0
        fs.ls(bucket, refresh=True)
        fs.rm(f"{bucket}/a")
        counts = proxy.requests()
        assert counts["LIST"] >= 1 and (counts.get("DELETE", 0) + counts.get("POST", 0)) >= 1


def test_proxy_counts_large_bodies(s3_endpoint: str) -> None:
    """Bodies of several MiB (sent in many pieces) are skipped, not read as requests."""
    with LatencyProxy(s3_endpoint, delay=0.01) as proxy:
        fs = fs_through(proxy)
        bucket = f"proxy-{uuid.uuid4().hex[:8]}"
        fs.mkdir(bucket)
        data = bytes(range(256)) * (12 * 2**12)  # 12 MiB
        proxy.reset()
        fs.pipe(f"{bucket}/big", data)
        assert fs.cat_file(f"{bucket}/big", max_concurrency=1) == data
        counts = proxy.requests()
        assert counts["PUT"] == 1 and counts["GET"] == 1, counts


class _KeepAlive(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keeps connections open (moto's server closes them)

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


def test_proxy_keeps_connections_alive() -> None:
    """A server that keeps connections open is reached over one connection, each
    response on it delayed."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _KeepAlive)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with LatencyProxy(f"http://127.0.0.1:{server.server_address[1]}", 0.05) as proxy:
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
            start = time.perf_counter()
            for _ in range(4):
                conn.request("GET", "/x")
                assert conn.getresponse().read() == b"ok"
            elapsed = time.perf_counter() - start
            conn.close()
            assert proxy.connections == 1
            assert proxy.requests() == {"GET": 4}
            assert 0.2 <= elapsed < 1.2
    finally:
        server.shutdown()
        server.server_close()
