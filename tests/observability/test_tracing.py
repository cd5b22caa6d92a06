"""The Tracer facade end to end: spans go through the real OTLP exporter to a real receiver."""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Iterator

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sidecar.observability.propagation import (
    B3_MULTI,
    TRACE_HEADERS,
    TRACECONTEXT,
    Headers,
    append_context,
    extract,
    unsampled_context,
)
from sidecar.observability.semconv import grpc_status_of, request_attributes, split_host_port
from sidecar.observability.tracing import Tracer
from sidecar.observability.tracing_config import TracingConfig
from tests.observability.otlp_receiver import OtlpReceiver

PARENT_TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
PARENT_SPAN = 0x00F067AA0BA902B7


def request(*extra: tuple[bytes, bytes], grpc: bool = False) -> Headers:
    headers: Headers = [
        (b":method", b"POST" if grpc else b"GET"),
        (b":scheme", b"http"),
        (b":authority", b"quotes.default:8080"),
        (b":path", b"/quotes.v1.Quotes/Get" if grpc else b"/v1/quotes?symbol=X"),
    ]
    if grpc:
        headers.append((b"content-type", b"application/grpc"))
    headers.extend(extra)
    return headers


def traceparent(sampled: bool = True) -> tuple[bytes, bytes]:
    flags = "01" if sampled else "00"
    return b"traceparent", f"00-{PARENT_TRACE:032x}-{PARENT_SPAN:016x}-{flags}".encode()


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver().start()
    yield r
    r.stop()


def make_tracer(endpoint: str, **overrides: object) -> Tracer:
    settings: dict[str, object] = {
        "enabled": True,
        "endpoint": endpoint,
        "service_name": "quotes-sidecar",
        "schedule_delay_s": 0.05,
        "export_timeout_s": 2.0,
        "shutdown_timeout_s": 2.0,
    }
    settings.update(overrides)
    return Tracer(TracingConfig(**settings))  # type: ignore[arg-type]


def test_server_and_retry_client_spans_arrive_linked(receiver: OtlpReceiver) -> None:
    tracer = make_tracer(receiver.endpoint)
    server = tracer.start_server_span(
        request(traceparent(), (b"tracestate", b"vendor=abc")), {"app": "x"}, route="quotes"
    )
    first = tracer.start_client_span(server, 1, upstream="10.0.0.7:9000", cluster="quotes-v1")
    upstream_headers = tracer.inject(first, request())
    tracer.end(first, 503, flag="UR")
    second = tracer.start_client_span(server, 2, upstream="10.0.0.8:9000")
    tracer.end(second, 200)
    tracer.end(server, 200)
    tracer.end(server, 200)  # twice is harmless
    spans = {s.span_id: s for s in receiver.wait_for(3)}
    tracer.shutdown()
    assert len(spans) == 3

    srv = spans[server.span_id]
    assert srv.trace_id == PARENT_TRACE
    assert srv.parent_span_id == PARENT_SPAN
    assert srv.kind == PbSpan.SPAN_KIND_SERVER
    assert srv.name == "GET"
    assert srv.trace_state == "vendor=abc"
    assert srv.resource["service.name"] == "quotes-sidecar"
    assert srv.attributes.pop("pilotfish.request_id") == server.request_id.decode()
    assert srv.attributes == {
        "http.request.method": "GET",
        "url.path": "/v1/quotes",
        "url.scheme": "http",
        "server.address": "quotes.default",
        "server.port": 8080,
        "pilotfish.route": "quotes",
        "app": "x",
        "http.response.status_code": 200,
    }
    for handle, attempt, host in ((first, 1, "10.0.0.7"), (second, 2, "10.0.0.8")):
        client = spans[handle.span_id]
        assert client.kind == PbSpan.SPAN_KIND_CLIENT
        assert client.trace_id == PARENT_TRACE
        assert client.parent_span_id == server.span_id
        assert client.attributes["pilotfish.attempt"] == attempt
        assert client.attributes["server.address"] == host
        assert client.attributes["server.port"] == 9000
        assert client.attributes["pilotfish.upstream.address"] == f"{host}:9000"
        assert client.attributes["pilotfish.route"] == "quotes"
        assert client.attributes["http.request.method"] == "GET"
    assert spans[second.span_id].attributes["http.request.resend_count"] == 1
    assert spans[first.span_id].attributes["pilotfish.response_flags"] == "UR"
    assert spans[first.span_id].attributes["pilotfish.cluster"] == "quotes-v1"
    assert spans[first.span_id].status_code == 2  # error
    assert srv.status_code == 0

    # The upstream sees the client span as its parent, in both formats, with the tracestate.
    got = extract(upstream_headers, TRACECONTEXT)
    assert got.parent is not None
    assert (got.parent.trace_id, got.parent.span_id) == (PARENT_TRACE, first.span_id)
    assert got.parent.tracestate == b"vendor=abc"
    b3 = extract(upstream_headers, B3_MULTI)
    assert b3.parent is not None and b3.parent.span_id == first.span_id
    assert (b"x-b3-parentspanid", f"{server.span_id:016x}".encode()) in upstream_headers
    assert sum(1 for k, _ in upstream_headers if k == b"x-request-id") == 1


def test_grpc_attributes_and_status(receiver: OtlpReceiver) -> None:
    tracer = make_tracer(receiver.endpoint)
    server = tracer.start_server_span(request(grpc=True))  # a root: no parent on the wire
    client = tracer.start_client_span(server, 1, upstream="[::1]:50051")
    tracer.end(client, 200, grpc_status=5)
    tracer.end(server, 200, grpc_status=5)
    spans = {s.span_id: s for s in receiver.wait_for(2)}
    tracer.shutdown()
    srv, cli = spans[server.span_id], spans[client.span_id]
    assert srv.parent_span_id == 0
    assert srv.trace_id == server.trace_id != 0
    assert srv.name == cli.name == "quotes.v1.Quotes/Get"
    for s in (srv, cli):
        assert s.attributes["rpc.system"] == "grpc"
        assert s.attributes["rpc.service"] == "quotes.v1.Quotes"
        assert s.attributes["rpc.method"] == "Get"
        assert s.attributes["rpc.grpc.status_code"] == 5
    # NOT_FOUND is the server's answer, not its failure; the client side reports it as an error.
    assert srv.status_code == 0
    assert cli.status_code == 2
    assert cli.attributes["server.address"] == "::1"


def test_unsampled_requests_create_no_spans_and_pass_context_on(receiver: OtlpReceiver) -> None:
    tracer = make_tracer(receiver.endpoint, sample_ratio=0.0)
    for headers in (
        request(traceparent(sampled=False)),
        request((b"b3", b"0")),  # a bare "do not sample" from the caller
        request(),  # a root, and the ratio says no
    ):
        server = tracer.start_server_span(headers)
        assert not server.recording
        client = tracer.start_client_span(server, 1, upstream="10.0.0.1:80")
        assert client is server
        upstream = tracer.inject(client, headers)
        got = extract(upstream)
        assert got.parent is not None and got.parent.sampled is False
        tracer.end(client, 200)
        tracer.end(server, 200)
    # The caller's span id goes through untouched: we are invisible in its trace.
    server = tracer.start_server_span(request(traceparent(sampled=False)))
    assert (server.trace_id, server.span_id) == (PARENT_TRACE, PARENT_SPAN)
    # A sampled parent is still followed (parent-based), and only that span arrives.
    sampled = tracer.start_server_span(request(traceparent(sampled=True)))
    tracer.end(sampled, 200)
    tracer.force_flush()
    spans = receiver.wait_for(1)
    time.sleep(0.1)
    tracer.shutdown()
    assert [s.span_id for s in receiver.spans] == [sampled.span_id]
    assert spans[0].parent_span_id == PARENT_SPAN


def test_ratio_sampling_is_by_trace_id_and_ignores_parent_when_not_parent_based() -> None:
    config = TracingConfig(enabled=True, sample_ratio=0.25, parent_based=False)
    tracer = Tracer(config, InMemorySpanExporter())
    sampled = sum(tracer._ratio(random.getrandbits(128)) for _ in range(20000))
    assert 4000 < sampled < 6000
    low = 0x0000000000000001  # low 64 bits tiny: under any non-zero ratio
    header = (b"traceparent", f"00-{low:032x}-{PARENT_SPAN:016x}-00".encode())
    handle = tracer.start_server_span(request(header))
    assert handle.recording  # the unsampled flag is overridden by the ratio
    tracer.end(handle, 200)
    tracer.shutdown()


def test_root_context_decides_as_start_server_span_and_makes_spans_only_when_sampled() -> None:
    """The fast path's decision for a request without trace headers: the same ratio test on
    the same kind of trace id; unsampled, only the context to send on; sampled, one span."""
    exporter = InMemorySpanExporter()
    config = TracingConfig(enabled=True, sample_ratio=0.25, schedule_delay_s=0.01)
    tracer = Tracer(config, exporter, rng=random.Random(11))
    sampled = []
    for _ in range(4000):
        trace_id, context = tracer.root_context()
        assert trace_id and (context is None) == tracer._ratio(trace_id)
        if context is None:
            sampled.append(trace_id)
            continue
        parent = extract(context).parent
        assert parent is not None and not parent.sampled and parent.trace_id == trace_id
        written: Headers = []  # what the general writer makes of the same ids
        append_context(written, tracer.inject_formats, trace_id, parent.span_id, False)
        assert context == written
        # The configured formats (tracecontext, b3multi), as inject would write them.
        assert {k for k, _ in context} == {b"traceparent", b"x-b3-traceid", b"x-b3-spanid",
                                           b"x-b3-sampled"}  # fmt: skip
    assert 800 < len(sampled) < 1200
    handle = tracer.start_server_span(request(), root_trace_id=sampled[0])
    assert handle.recording and handle.trace_id == sampled[0] and handle.request_id_generated
    tracer.end(handle, 200)
    tracer.force_flush()
    assert [s.context.trace_id for s in exporter.get_finished_spans()] == [sampled[0]]
    tracer.shutdown()


def test_disabled_tracer_only_handles_request_id() -> None:
    tracer = Tracer(TracingConfig(enabled=False))
    headers = request(traceparent())
    handle = tracer.start_server_span(headers)
    assert not handle.recording and handle.trace_id == 0 and handle.trace_id_hex == ""
    upstream = tracer.inject(tracer.start_client_span(handle, 1), headers)
    assert upstream[:-1] == headers  # nothing touched but the new id at the end
    assert upstream[-1] == (b"x-request-id", handle.request_id)
    assert len(handle.request_id) == 36
    with_id = request((b"x-request-id", b"abc-123"))
    handle = tracer.start_server_span(with_id)
    assert handle.request_id == b"abc-123"
    assert tracer.inject(handle, with_id) is with_id
    tracer.end(handle, 200)
    tracer.shutdown()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_dead_collector_never_slows_requests_and_counts_every_lost_span() -> None:
    tracer = make_tracer(
        f"http://127.0.0.1:{closed_port()}",
        max_queue_size=64,
        max_export_batch_size=32,
        schedule_delay_s=0.01,
        export_timeout_s=5.0,  # the exporter sits in its retries for the whole test
        shutdown_timeout_s=0.5,
    )
    headers = request(traceparent())
    count = 3000
    worst = 0.0
    for _ in range(count):
        t0 = time.perf_counter()
        server = tracer.start_server_span(headers)
        client = tracer.start_client_span(server, 1, upstream="10.0.0.1:80")
        tracer.inject(client, headers)
        tracer.end(client, 200)
        tracer.end(server, 200)
        worst = max(worst, time.perf_counter() - t0)
    assert tracer.dropped_spans > 0
    # Two spans per request, never waiting on the exporter's retries (seconds long); the bound
    # leaves room for a loaded machine's scheduling hiccups. How fast is for bench/.
    assert worst < 0.5, f"one request took {worst * 1000:.1f} ms"
    t0 = time.perf_counter()
    tracer.shutdown()
    assert time.perf_counter() - t0 < 3.0
    # Nothing arrived anywhere, and every span is accounted for.
    assert tracer.dropped_spans == 2 * count


def test_request_attributes_edge_cases() -> None:
    attrs = request_attributes([(b":method", b"BREW"), (b":path", b"/pot"), (b"host", b"tea")])
    assert attrs["http.request.method"] == "_OTHER"
    assert attrs["http.request.method_original"] == "BREW"
    assert attrs["server.address"] == "tea" and "server.port" not in attrs
    assert split_host_port("[2001:db8::1]:443") == ("2001:db8::1", 443)
    assert split_host_port("2001:db8::1") == ("2001:db8::1", 0)
    assert split_host_port("example.com:80") == ("example.com", 80)


def test_grpc_status_of() -> None:
    assert grpc_status_of([(b"grpc-message", b"x"), (b"grpc-status", b"14")]) == 14
    assert grpc_status_of([(b"grpc-status", b"x")]) is None
    assert grpc_status_of([(b":status", b"200")]) is None


def test_any_inbound_format_is_read_and_the_configured_ones_written() -> None:
    tracer = Tracer(TracingConfig(enabled=True, propagators=("b3",)), InMemorySpanExporter())
    b3 = (b"b3", f"{PARENT_TRACE:032x}-{PARENT_SPAN:016x}-1".encode())
    for header in (traceparent(), b3):
        server = tracer.start_server_span(request(header))
        assert server.recording and server.parent_span_id == PARENT_SPAN
        upstream = tracer.inject(server, request(header))
        assert [k for k, _ in upstream if k in (b"b3", b"traceparent")] == [b"b3"]
        tracer.end(server, 200)
    tracer.shutdown()


@pytest.mark.parametrize("sampled", [True, False])
@pytest.mark.parametrize("propagators", [("tracecontext",), ("b3", "b3multi"), ()])
def test_add_context_on_stripped_headers_matches_inject(
    sampled: bool, propagators: tuple[str, ...]
) -> None:
    tracer = Tracer(
        TracingConfig(enabled=True, propagators=propagators),
        InMemorySpanExporter(),
        rng=random.Random(7),
    )
    incoming = request(traceparent(sampled), (b"b3", b"0"), (b"x-b3-sampled", b"1"))
    server = tracer.start_server_span(incoming)
    client = tracer.start_client_span(server, 1, upstream="10.0.0.7:9000")
    expected = tracer.inject(client, incoming)
    stripped = [h for h in incoming if not (tracer.rewrites_context and h[0] in TRACE_HEADERS)]
    tracer.add_context(client, stripped)
    assert stripped == expected
    tracer.end(client, 200)
    tracer.end(server, 200)
    tracer.shutdown()


@pytest.mark.parametrize("formats", range(8))
def test_unsampled_context_writes_what_append_context_does(formats: int) -> None:
    written: Headers = []
    append_context(written, formats, PARENT_TRACE, PARENT_SPAN, False)
    assert unsampled_context(formats, PARENT_TRACE, PARENT_SPAN) == written
