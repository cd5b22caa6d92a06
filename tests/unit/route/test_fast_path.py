"""The exchange's fast path against a real HTTP/2 upstream: what the common request sends
upstream, and which of its stages it never enters."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from sidecar.http.streams import Headers, OnSent
from sidecar.observability.propagation import extract
from sidecar.route.exchange import Exchange
from tests.h2_upstream import H2Upstream
from tests.support import simple_config
from tests.unit.sidecar_fakes import listener_for

TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN = 0x00F067AA0BA902B7


class Downstream:
    """A ``StreamSink`` that keeps the response."""

    def __init__(self) -> None:
        self.headers: list[Headers] = []
        self.body = b""

    def send_headers(self, headers: Headers, end_stream: bool) -> None:
        self.headers.append(headers)

    def send_data(self, data: bytes, end_stream: bool, on_sent: OnSent) -> None:
        self.body += data
        if on_sent is not None:
            on_sent()

    def send_trailers(self, trailers: Headers) -> None:
        pass

    def reset(self, code: int) -> None:
        raise AssertionError(f"reset {code}")

    def reset_when_sent(self, code: int) -> None:
        raise AssertionError(f"reset {code}")

    def ack(self, flow_len: int) -> None:
        pass


@pytest.fixture(scope="module")
def upstream() -> Any:
    server = H2Upstream()
    yield server
    server.stop()


def echo(
    upstream: H2Upstream, sampling: str, *extra: tuple[bytes, bytes], routes: Any = None
) -> tuple[Exchange, dict[str, str]]:
    """One GET /echo through an exchange; the exchange and the headers the upstream saw."""
    config = simple_config([upstream.address], routes=routes)
    # Spans would go to a port nobody listens on: only the decisions matter here.
    config["tracing"] = {"endpoint": "http://127.0.0.1:9", "sampling": sampling}

    async def run() -> tuple[Exchange, Downstream]:
        listener = listener_for(config)
        downstream = Downstream()
        exchange = Exchange(listener, downstream)
        request = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"app"),
                   (b":path", b"/echo"), *extra]  # fmt: skip
        exchange.on_headers(request, True)
        for _ in range(500):
            if exchange.done:
                break
            await asyncio.sleep(0.01)
        listener.sidecar.clusters.close_all()
        return exchange, downstream

    exchange, downstream = asyncio.run(run())
    assert exchange.done and exchange.status == 200, (exchange.status, exchange.flags)
    seen: dict[str, str] = json.loads(downstream.body)["headers"]
    return exchange, seen


def test_an_unsampled_new_trace_has_no_span_but_its_context_goes_upstream(
    upstream: H2Upstream,
) -> None:
    exchange, seen = echo(upstream, "0%")
    assert exchange.trace is None  # no span handle, no SDK span
    assert exchange.retry is None and exchange.admitted is None and exchange.deadline is None
    # The next hop follows the decision: the same trace id, marked unsampled, in every
    # configured format (tracecontext and b3multi by default).
    headers = [(k.encode(), v.encode()) for k, v in seen.items()]
    parent = extract(headers).parent
    assert parent is not None and not parent.sampled
    assert parent.trace_id == exchange.trace_id != 0
    assert seen["traceparent"].endswith("-00") and seen["x-b3-sampled"] == "0"
    assert seen["x-request-id"] == exchange.request_id.decode()  # type: ignore[union-attr]
    assert seen["x-pilotfish-attempt-count"] == "1"
    # The time left of the route's 15 s (the first try waited for its connection).
    assert 0 < int(seen["x-pilotfish-expected-rq-timeout-ms"]) <= 15000


def test_a_sampled_new_trace_gets_a_span_and_sends_it_as_the_parent(
    upstream: H2Upstream,
) -> None:
    exchange, seen = echo(upstream, "100%")
    assert exchange.trace is not None and exchange.trace.sampled
    parent = extract([(k.encode(), v.encode()) for k, v in seen.items()]).parent
    assert parent is not None and parent.sampled
    assert parent.trace_id == exchange.trace.trace_id
    assert parent.span_id != exchange.trace.span_id  # the CLIENT span's id, not the SERVER's
    assert seen["x-request-id"] == exchange.trace.request_id.decode()


def test_an_incoming_unsampled_traceparent_is_passed_on_unchanged(upstream: H2Upstream) -> None:
    incoming = f"00-{TRACE:032x}-{SPAN:016x}-00"
    exchange, seen = echo(upstream, "100%", (b"traceparent", incoming.encode()),
                          (b"x-request-id", b"given-1"))  # fmt: skip
    assert seen["traceparent"] == incoming
    assert seen["x-request-id"] == "given-1"
    assert exchange.trace is not None and not exchange.trace.sampled


def test_route_header_edits_and_the_callers_stale_headers(upstream: H2Upstream) -> None:
    routes = [{
        "match": {"prefix": "/"},
        "route": {"cluster": "app", "timeout": "2s"},
        "request_headers_to_add": [{"name": "x-route", "value": "r"}],
        "request_headers_to_remove": ["x-secret"],
    }]  # fmt: skip
    exchange, seen = echo(upstream, "0%", (b"x-secret", b"s"), (b"grpc-timeout", b"1S"),
                          (b"x-pilotfish-attempt-count", b"7"), routes=routes)  # fmt: skip
    assert seen["x-route"] == "r" and "x-secret" not in seen
    assert seen["x-pilotfish-attempt-count"] == "1"  # the caller's is replaced
    # The caller's grpc-timeout bounds the request (a RequestDeadline), and is not passed on
    # for a request that is not gRPC: the upstream hears the time left in milliseconds.
    assert "grpc-timeout" not in seen and exchange.deadline is not None
    assert 0 < int(seen["x-pilotfish-expected-rq-timeout-ms"]) <= 1000
