"""One sidecar process for these tests, in front of an HTTP/2 and an HTTP/1.1 upstream.

Limits are the defaults except the timeouts, shortened so that tests of them take seconds.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest

from tests.h2_upstream import H2Upstream
from tests.hostile.canary import Canary, Memory
from tests.support import SidecarProcess, http_get, simple_config

LIMITS = {"stream_idle_timeout": "1s", "header_timeout": "1s", "http2_idle_timeout": "2s"}


class Paths(http.server.BaseHTTPRequestHandler):
    """An HTTP/1.1 upstream that records the paths it served."""

    protocol_version = "HTTP/1.1"
    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        Paths.seen.append(self.path)
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    do_POST = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        pass


class QuietServer(http.server.ThreadingHTTPServer):
    """Requests the sidecar abandons mid-body (it resets them) are expected here."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class Proxy:
    """The sidecar process under attack, its upstreams, and how to look at it."""

    def __init__(self, h2: H2Upstream, h1: str) -> None:
        self.h2 = h2
        config = simple_config(
            [h2.address],
            timeout="5s",
            extra_listener={"limits": LIMITS},
            extra_clusters=[{"name": "h1", "protocol": "http1", "endpoints": [h1]}],
            routes=[
                {"match": {"prefix": "/h1/"}, "route": {"cluster": "h1", "timeout": "5s"}},
                {"match": {"prefix": "/"}, "route": {"cluster": "app", "timeout": "5s"}},
            ],
        )
        self.process = SidecarProcess(config)
        self.address = self.process.address

    def stats(self) -> dict[str, int]:
        _, text = http_get(self.process.admin_url + "/stats")
        out: dict[str, int] = {}
        for line in text.splitlines():
            key, _, value = line.partition(": ")
            if value.lstrip("-").isdigit():
                out[key] = int(value)
        return out

    def stat(self, name: str) -> int:
        return self.stats().get(name, 0)

    def memory(self) -> Memory:
        return Memory(self.process.proc.pid)

    def canary(self, memory: Memory | None = None) -> Canary:
        return Canary(self.address, memory)


@pytest.fixture(scope="package")
def proxy() -> Iterator[Proxy]:
    # One sidecar for the whole package: every test compares counters before and after, and
    # measures memory from its own start, so the attacks before it do not count against it.
    h2 = H2Upstream(max_concurrent_streams=1000)
    Paths.seen = []
    server = QuietServer(("127.0.0.1", 0), Paths)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    proxy = Proxy(h2, f"127.0.0.1:{server.server_address[1]}")
    try:
        yield proxy
    finally:
        proxy.process.stop()
        server.shutdown()
        server.server_close()
        h2.stop()
