"""The three pieces along one request, called as the router will call them (a retried attempt)."""

from __future__ import annotations

import io
import json
import time

from prometheus_client.parser import text_string_to_metric_families

from sidecar.observability.access_log import AccessEntry, AccessLog, AccessLogConfig
from sidecar.observability.metrics import OUTBOUND, MeshMetrics
from sidecar.observability.propagation import extract
from sidecar.observability.semconv import grpc_status_of
from sidecar.observability.tracing import Tracer
from sidecar.observability.tracing_config import TracingConfig
from tests.observability.otlp_receiver import OtlpReceiver


def test_one_retried_grpc_request_through_tracing_metrics_and_access_log() -> None:
    receiver = OtlpReceiver().start()
    tracer = Tracer(TracingConfig(enabled=True, endpoint=receiver.endpoint, schedule_delay_s=0.05))
    metrics = MeshMetrics()
    metrics.read_span_drops(lambda: tracer.dropped_spans)
    out = io.BytesIO()
    fields = ("status", "grpc_status", "attempts", "response_flags", "trace_id", "request_id")
    access = AccessLog(AccessLogConfig(fields=fields), stream=out)
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/ledger.v1.Ledger/Post"),
        (b":authority", b"ledger"),
        (b"content-type", b"application/grpc"),
    ]
    started = time.monotonic()

    # on_headers, once the route matched
    server = tracer.start_server_span(headers, route="ledger-route")
    route_stats = metrics.route(OUTBOUND, "ledger", "ledger-route")
    cluster_stats = metrics.cluster("ledger")
    # attempt 1: refused stream
    attempt = tracer.start_client_span(server, 1, upstream="10.1.0.1:50051", cluster="ledger")
    first_upstream = tracer.inject(attempt, headers)
    tracer.end(attempt, 0, flag="UR")
    cluster_stats.retries.inc()
    # attempt 2: answered
    attempt = tracer.start_client_span(server, 2, upstream="10.1.0.2:50051", cluster="ledger")
    second_upstream = tracer.inject(attempt, headers)
    grpc_status = grpc_status_of([(b"grpc-status", b"0")])  # from the response trailers
    tracer.end(attempt, 200, grpc_status=grpc_status)
    # _finish
    tracer.end(server, 200, grpc_status=grpc_status)
    route_stats.record(200, grpc_status, "", time.monotonic() - started, 5, 12)
    access.log(
        AccessEntry(
            start_time=time.time(),
            method="POST",
            authority="ledger",
            path="/ledger.v1.Ledger/Post",
            protocol="HTTP/2",
            status=200,
            duration_ms=(time.monotonic() - started) * 1000,
            grpc_status=grpc_status,
            attempts=2,
            trace_id=server.trace_id_hex,
            request_id=server.request_id.decode(),
        )
    )

    spans = receiver.wait_for(3)
    tracer.shutdown()
    receiver.stop()
    line = json.loads(out.getvalue())
    assert line["trace_id"] == f"{spans[0].trace_id:032x}"
    assert {s.trace_id for s in spans} == {server.trace_id}
    # Both attempts carry the same new request id and their own span as the parent.
    ids = [dict(h)[b"x-request-id"] for h in (first_upstream, second_upstream)]
    assert ids == [server.request_id] * 2 and line["request_id"] == server.request_id.decode()
    parents = [extract(h).parent for h in (first_upstream, second_upstream)]
    assert [p.span_id for p in parents if p is not None] == [
        s.span_id for s in sorted(spans, key=lambda s: s.attributes.get("pilotfish.attempt", 0))
    ][1:]
    families = {f.name: f for f in text_string_to_metric_families(metrics.render())}
    (request,) = families["pilotfish_requests"].samples
    assert request.labels["grpc_status"] == "0" and request.value == 1
    (retries,) = families["pilotfish_upstream_retries"].samples
    assert retries.value == 1
    assert families["pilotfish_tracing_spans_dropped"].samples[0].value == 0
