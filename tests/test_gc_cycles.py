"""Finished requests are freed by reference counting, not left in cycles for the collector.

A cycle between a stream and its exchange (or an upstream stream and its attempt) keeps every
finished request's objects until a garbage collection finds them: memory grows with the
request rate and each collection has more to walk. With the collector switched off, nothing
of a finished request may stay alive.
"""

from __future__ import annotations

import gc
import socket
from collections.abc import Iterator

import grpc
import pytest

from sidecar.route.attempt import Attempt
from sidecar.route.exchange import Exchange
from tests.h2_upstream import H2Upstream
from tests.support import (
    GrpcServer,
    ThreadedSidecar,
    running_sidecar,
    simple_config,
    wait_for,
)

REQUESTS = 40


@pytest.fixture
def collector_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def alive(sidecar: ThreadedSidecar) -> int:
    def count() -> int:
        return sum(1 for o in gc.get_objects() if type(o) in (Exchange, Attempt))

    result: int = sidecar.call(count)
    return result


def h1_requests(sidecar: ThreadedSidecar, n: int) -> None:
    with socket.create_connection(("127.0.0.1", sidecar.port)) as sock:
        for _ in range(n):
            sock.sendall(b"GET /x HTTP/1.1\r\nhost: app\r\n\r\n")
            data = b""
            while not data.endswith(b"ok"):
                chunk = sock.recv(4096)
                assert chunk, "the sidecar closed the connection"
                data += chunk
            assert data.startswith(b"HTTP/1.1 200")


def test_no_request_objects_survive_http1_to_http2(collector_off: None) -> None:
    upstream = H2Upstream()
    try:
        with running_sidecar(simple_config([upstream.address])) as sc:
            h1_requests(sc, REQUESTS)
            assert wait_for(lambda: sc.stat("http.ingress.downstream_rq_active") == 0)
            assert alive(sc) <= 1  # at most the last one, still on its way out
    finally:
        upstream.stop()


def test_no_request_objects_survive_grpc(collector_off: None) -> None:
    echo = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    upstream = GrpcServer("gc.Echo", {"Call": echo})
    try:
        with (
            running_sidecar(simple_config([upstream.address])) as sc,
            grpc.insecure_channel(sc.address) as channel,
        ):
            call = channel.unary_unary("/gc.Echo/Call")
            for n in range(REQUESTS):
                assert call(b"%d" % n, timeout=5) == b"%d" % n
            assert wait_for(lambda: sc.stat("http.ingress.downstream_rq_active") == 0)
            assert alive(sc) <= 1
    finally:
        upstream.stop()
