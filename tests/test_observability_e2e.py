"""Tracing, metrics and access logs of real sidecars, end to end: real sockets, real grpcio
clients and servers, spans exported over OTLP/gRPC to a real in-process receiver.

What each test pins down: a trace crossing two sidecars and an app that forwards the trace
headers is one trace with correctly nested spans; every retry is its own CLIENT span; the
Prometheus exposition counts what was sent; a dead collector costs spans, never calls; each
access log line is JSON with the documented fields.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from prometheus_client.parser import text_string_to_metric_families

from sidecar.observability.access_log import ALL_FIELDS
from tests.observability.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.support import (
    GrpcServer,
    SidecarProcess,
    ThreadedSidecar,
    free_port,
    http_get,
    running_sidecar,
    simple_config,
    wait_for,
)

SERVER = PbSpan.SPAN_KIND_SERVER
CLIENT = PbSpan.SPAN_KIND_CLIENT
STATUS_ERROR = 2
FLAGS_HEADER = "x-pilotfish-response-flags"
# What an app must copy from its incoming call to the calls it makes, for one trace end to end.
FORWARDED = (
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "x-request-id",
)
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
LOAD_CALLS = 2000
LOAD_CONCURRENCY = 8


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[OtlpReceiver]:
    # Sidecars in this process read the OTEL_* variables when they start: export every 50 ms.
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    r = OtlpReceiver().start()
    yield r
    r.stop()


@contextlib.contextmanager
def closed_address() -> Iterator[str]:
    """A loopback address that refuses connections: bound (so nobody takes it), never listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def sidecar_config(
    upstream: str,
    *,
    service: str,
    routes: list[dict[str, Any]],
    tracing: dict[str, Any] | None = None,
    extra_clusters: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One listener, one virtual host ``*`` with ``routes``, cluster ``app`` at ``upstream``."""
    config: dict[str, Any] = {
        "node_id": service,
        "admin": {"address": "127.0.0.1", "port": free_port()},
        "drain_timeout": "3s",
        "listeners": [
            {"name": "ingress", "address": f"127.0.0.1:{free_port()}", "route_config": "local"}
        ],
        "route_configs": [
            {
                "name": "local",
                "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}],
            }
        ],
        "clusters": [{"name": "app", "protocol": "http2", "endpoints": [upstream]}]
        + (extra_clusters or []),
        "access_log": {"sink": "off"},
    }
    if tracing is not None:
        config["tracing"] = tracing
    config.update(extra)
    return config


def traced(endpoint: str, service: str) -> dict[str, Any]:
    return {
        "endpoint": endpoint,
        "sampling": "100%",
        "service_name": service,
        "propagators": ["tracecontext", "b3multi"],
    }


def route(name: str, prefix: str, cluster: str = "app", **policy: Any) -> dict[str, Any]:
    return {"name": name, "match": {"prefix": prefix}, "route": {"cluster": cluster}, **policy}


def unary(channel: grpc.Channel, method: str) -> Any:
    """A raw-bytes unary callable (no serializers: grpcio passes bytes through)."""
    return channel.unary_unary(method)


def metadata_of(context: grpc.ServicerContext) -> dict[str, str]:
    return {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}


def flags_of(error: grpc.Call) -> str | None:
    for metadata in (error.trailing_metadata(), error.initial_metadata()):
        for key, value in metadata or ():
            if key == FLAGS_HEADER:
                return str(value)
    return None


def spans_by_service(
    spans: list[ReceivedSpan], trace_id: int
) -> dict[tuple[str, int], list[ReceivedSpan]]:
    out: dict[tuple[str, int], list[ReceivedSpan]] = {}
    for s in spans:
        if s.trace_id == trace_id:
            out.setdefault((str(s.resource["service.name"]), s.kind), []).append(s)
    return out


def wait_spans(
    receiver: OtlpReceiver, predicate: Callable[[list[ReceivedSpan]], bool], timeout: float = 10
) -> list[ReceivedSpan]:
    assert wait_for(lambda: predicate(list(receiver.spans)), timeout), receiver.spans
    return list(receiver.spans)


# -- 1. two hops, one trace ----------------------------------------------------------------------


@dataclass
class Seen:
    """What service B saw."""

    metadata: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def test_a_call_across_two_sidecars_is_one_trace_with_nested_spans(
    receiver: OtlpReceiver,
) -> None:
    seen = Seen()

    def b_echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        with seen.lock:
            seen.metadata.append(metadata_of(context))
        return b"b:" + request

    service_b = GrpcServer(
        "pilotfish.test.B", {"Echo": grpc.unary_unary_rpc_method_handler(b_echo)}
    )
    sidecar_b = ThreadedSidecar(
        sidecar_config(
            service_b.address,
            service="sidecar-b",
            routes=[route("to-b", "/")],
            tracing=traced(receiver.endpoint, "sidecar-b"),
        )
    ).start()
    channel_to_b = grpc.insecure_channel(sidecar_b.address, options=CHANNEL_OPTIONS)
    call_b = unary(channel_to_b, "/pilotfish.test.B/Echo")

    def a_call(request: bytes, context: grpc.ServicerContext) -> bytes:
        # The app's part of tracing: pass the trace headers on to the calls it makes.
        forwarded = [(k, v) for k, v in metadata_of(context).items() if k in FORWARDED]
        reply: bytes = call_b(request, metadata=forwarded, timeout=5)
        return b"a:" + reply

    service_a = GrpcServer(
        "pilotfish.test.A", {"Call": grpc.unary_unary_rpc_method_handler(a_call)}
    )
    try:
        with (
            closed_address() as down,
            running_sidecar(
                sidecar_config(
                    service_a.address,
                    service="sidecar-a",
                    routes=[route("down", "/pilotfish.test.Down/", "down"), route("to-a", "/")],
                    tracing=traced(receiver.endpoint, "sidecar-a"),
                    extra_clusters=[{"name": "down", "endpoints": [down]}],
                )
            ) as sidecar_a,
            grpc.insecure_channel(sidecar_a.address, options=CHANNEL_OPTIONS) as channel,
        ):
            reply = unary(channel, "/pilotfish.test.A/Call")(b"hi", timeout=5)
            assert reply == b"a:b:hi"
            with pytest.raises(grpc.RpcError) as failed:
                unary(channel, "/pilotfish.test.Down/Get")(b"x", timeout=5)
            assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
            assert flags_of(failed.value) == "UF"

            # 4 spans for the good call (2 per sidecar), a SERVER span and its tries for the other.
            spans = wait_spans(
                receiver,
                lambda got: sum(s.kind == SERVER for s in got) >= 3 and len(got) >= 6,
            )
    finally:
        channel_to_b.close()
        sidecar_b.stop()
        service_a.stop()
        service_b.stop()

    (a_server,) = [
        s
        for s in spans
        if s.kind == SERVER and s.attributes["url.path"] == "/pilotfish.test.A/Call"
    ]
    trace = spans_by_service(spans, a_server.trace_id)
    assert sorted(trace) == [
        ("sidecar-a", SERVER), ("sidecar-a", CLIENT), ("sidecar-b", SERVER), ("sidecar-b", CLIENT)
    ]  # fmt: skip
    assert all(len(v) == 1 for v in trace.values()), trace
    (a_client,) = trace["sidecar-a", CLIENT]
    (b_server,) = trace["sidecar-b", SERVER]
    (b_client,) = trace["sidecar-b", CLIENT]

    # The chain: A SERVER (a root) -> A CLIENT -> (service A forwards) -> B SERVER -> B CLIENT.
    assert a_server.parent_span_id == 0
    assert a_client.parent_span_id == a_server.span_id
    assert b_server.parent_span_id == a_client.span_id
    assert b_client.parent_span_id == b_server.span_id
    # Service B saw B's CLIENT span as its parent, in both configured formats.
    (b_metadata,) = seen.metadata
    assert b_metadata["traceparent"] == f"00-{a_server.trace_id:032x}-{b_client.span_id:016x}-01"
    assert b_metadata["x-b3-traceid"] == f"{a_server.trace_id:032x}"
    assert b_metadata["x-b3-spanid"] == f"{b_client.span_id:016x}"
    assert b_metadata["x-b3-parentspanid"] == f"{b_server.span_id:016x}"
    assert b_metadata["x-b3-sampled"] == "1"

    # x-request-id: made by sidecar A (the caller sent none), the same all the way to service B.
    request_id = a_server.attributes["pilotfish.request_id"]
    assert UUID_RE.fullmatch(request_id), request_id
    assert b_metadata["x-request-id"] == request_id
    for span in (a_client, b_server, b_client):
        assert span.attributes["pilotfish.request_id"] == request_id

    sidecar_a_port = int(sidecar_a.address.rpartition(":")[2])
    sidecar_b_port = int(sidecar_b.address.rpartition(":")[2])
    for span, service, method, port in (
        (a_server, "pilotfish.test.A", "Call", sidecar_a_port),
        (b_server, "pilotfish.test.B", "Echo", sidecar_b_port),
    ):
        assert span.name == f"{service}/{method}"
        assert span.attributes["http.request.method"] == "POST"
        assert span.attributes["url.path"] == f"/{service}/{method}"
        assert span.attributes["server.address"] == "127.0.0.1"
        assert span.attributes["server.port"] == port
        assert span.attributes["rpc.system"] == "grpc"
        assert span.attributes["rpc.service"] == service
        assert span.attributes["rpc.method"] == method
        assert span.attributes["http.response.status_code"] == 200
        assert span.attributes["rpc.grpc.status_code"] == 0
        assert span.status_code != STATUS_ERROR
    assert a_server.attributes["pilotfish.route"] == "to-a"
    assert b_server.attributes["pilotfish.route"] == "to-b"
    for span, parent, upstream in (
        (a_client, a_server, service_a),
        (b_client, b_server, service_b),
    ):
        assert span.name == parent.name
        assert span.attributes["pilotfish.upstream.address"] == upstream.address
        assert span.attributes["server.address"] == "127.0.0.1"
        assert span.attributes["server.port"] == upstream.port
        assert span.attributes["pilotfish.cluster"] == "app"
        assert span.attributes["pilotfish.attempt"] == 1
        assert span.attributes["rpc.grpc.status_code"] == 0
        assert span.attributes["http.response.status_code"] == 200
    assert a_client.attributes["pilotfish.route"] == "to-a"

    # The failing call: its own trace; every span says why (UF: upstream connect failure).
    (down_server,) = [
        s
        for s in spans
        if s.kind == SERVER and s.attributes["url.path"] == "/pilotfish.test.Down/Get"
    ]
    assert down_server.trace_id != a_server.trace_id
    # UF, and URX: the one host was tried again (an ordinary connect-failure retry), in vain.
    assert down_server.attributes["pilotfish.response_flags"] == "UF,URX"
    assert down_server.attributes["rpc.grpc.status_code"] == 14
    assert down_server.attributes["pilotfish.route"] == "down"
    assert down_server.status_code == STATUS_ERROR
    down_tries = [s for s in spans if s.kind == CLIENT and s.parent_span_id == down_server.span_id]
    assert down_tries, "a try that could not connect still has its span"
    for attempt, span in enumerate(
        sorted(down_tries, key=lambda s: s.attributes["pilotfish.attempt"]), 1
    ):
        assert span.attributes["pilotfish.attempt"] == attempt
        assert span.attributes["pilotfish.response_flags"] == "UF"
        assert span.attributes["pilotfish.cluster"] == "down"
        assert span.status_code == STATUS_ERROR


# -- 2. retries are spans -----------------------------------------------------------------------


class FailsFirst:
    """Fails the first call with UNAVAILABLE before sending anything (trailers-only)."""

    def __init__(self) -> None:
        self.calls = 0
        self.parents: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self._lock:
            self.calls += 1
            first = self.calls == 1
            self.parents.append(metadata_of(context).get("traceparent", ""))
        if first:
            context.abort(grpc.StatusCode.UNAVAILABLE, "not yet")
        return b"ok:" + request


def test_each_retry_is_a_client_span_under_one_server_span(receiver: OtlpReceiver) -> None:
    flaky = FailsFirst()
    upstream = GrpcServer(
        "pilotfish.test.Flaky", {"Get": grpc.unary_unary_rpc_method_handler(flaky)}
    )
    retry = {"attempts": 2, "retry_on": ["unavailable"], "retry_non_idempotent": True}
    config = sidecar_config(
        upstream.address,
        service="sidecar-retry",
        routes=[route("flaky", "/", retry=retry)],
        tracing=traced(receiver.endpoint, "sidecar-retry"),
    )
    try:
        with (
            running_sidecar(config) as sidecar,
            grpc.insecure_channel(sidecar.address, options=CHANNEL_OPTIONS) as channel,
        ):
            assert unary(channel, "/pilotfish.test.Flaky/Get")(b"x", timeout=5) == b"ok:x"
            spans = wait_spans(receiver, lambda got: len(got) >= 3)
            _, prometheus = sidecar.admin("/stats/prometheus")
    finally:
        upstream.stop()

    assert flaky.calls == 2
    (server,) = [s for s in spans if s.kind == SERVER]
    tries = sorted(
        (s for s in spans if s.kind == CLIENT), key=lambda s: s.attributes["pilotfish.attempt"]
    )
    assert [s.attributes["pilotfish.attempt"] for s in tries] == [1, 2]
    assert {s.trace_id for s in tries} == {server.trace_id}
    assert all(s.parent_span_id == server.span_id for s in tries)
    first, second = tries
    assert first.attributes["rpc.grpc.status_code"] == 14
    assert first.status_code == STATUS_ERROR
    assert "http.request.resend_count" not in first.attributes
    assert second.attributes["rpc.grpc.status_code"] == 0
    assert second.attributes["http.request.resend_count"] == 1
    assert second.status_code != STATUS_ERROR
    assert server.attributes["rpc.grpc.status_code"] == 0
    assert server.status_code != STATUS_ERROR
    assert "pilotfish.response_flags" not in server.attributes
    # Each try told the upstream its own span as the parent.
    assert flaky.parents == [f"00-{server.trace_id:032x}-{t.span_id:016x}-01" for t in tries]
    # The request counted once, as the OK it was in the end.
    families = parse_metrics(prometheus)
    assert request_count(families, response_code="200", grpc_status="0", route="flaky") == 1
    assert total_requests(families) == 1


def test_a_retry_is_counted_in_pilotfish_upstream_retries_total() -> None:
    flaky = FailsFirst()
    upstream = GrpcServer(
        "pilotfish.test.Flaky", {"Get": grpc.unary_unary_rpc_method_handler(flaky)}
    )
    retry = {"attempts": 2, "retry_on": ["unavailable"], "retry_non_idempotent": True}
    config = sidecar_config(
        upstream.address, service="s", routes=[route("flaky", "/", retry=retry)]
    )
    try:
        with (
            running_sidecar(config) as sidecar,
            grpc.insecure_channel(sidecar.address, options=CHANNEL_OPTIONS) as channel,
        ):
            unary(channel, "/pilotfish.test.Flaky/Get")(b"x", timeout=5)
            _, prometheus = sidecar.admin("/stats/prometheus")
    finally:
        upstream.stop()
    families = parse_metrics(prometheus)
    samples = [
        s for s in families["pilotfish_upstream_retries"].samples if s.labels == {"cluster": "app"}
    ]
    assert [s.value for s in samples] == [1.0]


# -- 3. metrics ---------------------------------------------------------------------------------


def parse_metrics(text: str) -> dict[str, Any]:
    """family name → family, as Prometheus's own parser reads it (counters lose ``_total``)."""
    return {f.name: f for f in text_string_to_metric_families(text)}


def request_count(families: dict[str, Any], **labels: str) -> float:
    return float(
        sum(
            s.value
            for s in families["pilotfish_requests"].samples
            if s.name == "pilotfish_requests_total" and labels.items() <= s.labels.items()
        )
    )


def total_requests(families: dict[str, Any]) -> float:
    return request_count(families)


def not_found(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    raise AssertionError("abort returns only by raising")


def http1_get(address: str, path: str) -> tuple[int, str]:
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", path, headers={"Host": "metrics.test"})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def test_prometheus_counts_each_outcome_and_the_histogram_agrees() -> None:
    upstream = GrpcServer(
        "pilotfish.test.M",
        {
            "Ok": grpc.unary_unary_rpc_method_handler(lambda request, context: request),
            "Missing": grpc.unary_unary_rpc_method_handler(not_found),
        },
    )
    scrape_port = free_port()
    config = sidecar_config(
        upstream.address,
        service="sidecar-m",
        routes=[route("m-route", "/pilotfish.test.M/")],
        admin={
            "address": "127.0.0.1",
            "port": free_port(),
            "prometheus_address": f"127.0.0.1:{scrape_port}",
        },
    )
    try:
        with (
            running_sidecar(config) as sidecar,
            grpc.insecure_channel(sidecar.address, options=CHANNEL_OPTIONS) as channel,
        ):
            ok, missing = (
                unary(channel, "/pilotfish.test.M/Ok"),
                unary(channel, "/pilotfish.test.M/Missing"),
            )
            for _ in range(7):
                assert ok(b"x", timeout=5) == b"x"
            for _ in range(3):
                with pytest.raises(grpc.RpcError) as err:
                    missing(b"x", timeout=5)
                assert err.value.code() is grpc.StatusCode.NOT_FOUND
            for _ in range(2):
                status, _ = http1_get(sidecar.address, "/no/such/route")
                assert status == 404

            # The last request is recorded when it ends, which may be just after the reply.
            def counted() -> bool:
                return total_requests(parse_metrics(sidecar.admin("/stats/prometheus")[1])) >= 12

            assert wait_for(counted)
            status, text = sidecar.admin("/stats/prometheus")
            scrape_status, scrape_text = http_get(f"http://127.0.0.1:{scrape_port}/metrics")
    finally:
        upstream.stop()
    assert status == 200 and scrape_status == 200
    families = parse_metrics(text)
    assert "pilotfish_requests" in parse_metrics(scrape_text)

    route_labels = {"direction": "outbound", "service": "app", "route": "m-route"}
    expected = [
        ({**route_labels, "response_code": "200", "grpc_status": "0", "response_flags": ""}, 7),
        ({**route_labels, "response_code": "200", "grpc_status": "5", "response_flags": ""}, 3),
        (
            {
                "direction": "outbound",
                "service": "",
                "route": "",
                "response_code": "404",
                "grpc_status": "",
                "response_flags": "NR",
            },
            2,
        ),
    ]
    requests = {
        tuple(sorted(s.labels.items())): s.value
        for s in families["pilotfish_requests"].samples
        if s.name == "pilotfish_requests_total"
    }
    assert requests == {tuple(sorted(labels.items())): float(n) for labels, n in expected}
    durations = families["pilotfish_request_duration_seconds"]
    assert durations.type == "histogram"
    for labels, n in expected:
        counts = [
            s.value for s in durations.samples if s.name.endswith("_count") and s.labels == labels
        ]
        assert counts == [float(n)], labels
        inf = [
            s.value
            for s in durations.samples
            if s.name.endswith("_bucket") and s.labels == {**labels, "le": "+Inf"}
        ]
        assert inf == [float(n)], labels
    # Body bytes of the gRPC calls, per route: 5 bytes of framing + 1 byte each way per OK call.
    request_bytes = {
        tuple(sorted(s.labels.items())): s.value
        for s in families["pilotfish_request_bytes"].samples
    }
    assert request_bytes[tuple(sorted(route_labels.items()))] == 10 * 6
    for name in ("pilotfish_process_cpu_seconds", "pilotfish_process_resident_memory_bytes"):
        (sample,) = families[name].samples
        assert sample.value > 0, name
    assert families["pilotfish_tracing_spans_dropped"].samples[0].value == 0


# -- 4. a dead collector under load -------------------------------------------------------------


@dataclass
class LoadResult:
    latencies: list[float]
    failures: list[str]

    @property
    def p99(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[int(len(ordered) * 0.99) - 1]


def drive_load(address: str, calls: int, concurrency: int) -> LoadResult:
    """``calls`` small unary calls from ``concurrency`` threads over one channel."""
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        echo = unary(channel, "/pilotfish.test.Load/Echo")
        echo(b"warm", timeout=5)

        def worker(count: int) -> None:
            for _ in range(count):
                t0 = time.perf_counter()
                try:
                    echo(b"ping", timeout=5)
                except grpc.RpcError as exc:
                    with lock:
                        failures.append(f"{exc.code()}: {exc.details()}")
                    continue
                elapsed = time.perf_counter() - t0
                with lock:
                    latencies.append(elapsed)

        share = calls // concurrency
        with futures.ThreadPoolExecutor(concurrency) as pool:
            for f in [pool.submit(worker, share) for _ in range(concurrency)]:
                f.result(60)
    return LoadResult(latencies, failures)


def test_a_dead_collector_loses_spans_not_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    # A small queue and a short export timeout, so spans are lost during the run, not after it.
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "256")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "500")
    upstream = GrpcServer(
        "pilotfish.test.Load",
        {"Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request)},
    )
    try:
        with closed_address() as collector:
            plain_config = sidecar_config(
                upstream.address, service="plain", routes=[route("r", "/")]
            )
            with running_sidecar(plain_config) as plain:
                baseline = drive_load(plain.address, LOAD_CALLS, LOAD_CONCURRENCY)
            config = sidecar_config(
                upstream.address,
                service="dead-collector",
                routes=[route("r", "/")],
                tracing=traced(f"http://{collector}", "dead-collector"),
            )
            sidecar = ThreadedSidecar(config).start()
            try:
                loaded = drive_load(sidecar.address, LOAD_CALLS, LOAD_CONCURRENCY)

                def dropped() -> float:
                    families = parse_metrics(sidecar.admin("/stats/prometheus")[1])
                    return float(families["pilotfish_tracing_spans_dropped"].samples[0].value)

                # Lost while running: the queue filled, or a batch failed to export.
                assert wait_for(lambda: dropped() > 0, timeout=10)
            finally:
                t0 = time.monotonic()
                sidecar.stop()
                stop_took = time.monotonic() - t0
    finally:
        upstream.stop()
    for result in (baseline, loaded):
        assert result.failures == []
        assert len(result.latencies) == LOAD_CALLS
    # Loose on purpose (a loaded 2-core machine): no call waited on the collector's timeouts.
    assert max(loaded.latencies) < 1.0, f"slowest call {max(loaded.latencies) * 1000:.0f} ms"
    print(
        f"p99 without tracing {baseline.p99 * 1000:.1f} ms, "
        f"with a dead collector {loaded.p99 * 1000:.1f} ms"
    )
    # After shutdown every span is accounted for: 2 per call (SERVER and CLIENT), warm-up included.
    assert sidecar.sidecar is not None
    assert sidecar.sidecar.tracer.dropped_spans == 2 * (LOAD_CALLS + 1)
    assert stop_took < 10, f"stopping took {stop_took:.1f} s"


# -- 5. access log ------------------------------------------------------------------------------


def test_access_log_lines_are_json_with_the_documented_fields(
    receiver: OtlpReceiver, tmp_path: Path
) -> None:
    log_path = tmp_path / "access.log"
    upstream = GrpcServer(
        "pilotfish.test.Log",
        {"Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request)},
    )
    unsampled_trace = random.getrandbits(128) | 1
    try:
        with closed_address() as down:
            config = sidecar_config(
                upstream.address,
                service="sidecar-log",
                routes=[
                    route("down", "/pilotfish.test.Down/", "down"),
                    route("log", "/pilotfish.test.Log/"),
                ],
                tracing=traced(receiver.endpoint, "sidecar-log"),
                extra_clusters=[{"name": "down", "endpoints": [down]}],
            )
            config["access_log"] = {
                "sink": "file",
                "path": str(log_path),
                "fields": list(ALL_FIELDS),
            }
            with (
                running_sidecar(config) as sidecar,
                grpc.insecure_channel(sidecar.address, options=CHANNEL_OPTIONS) as channel,
            ):
                echo = unary(channel, "/pilotfish.test.Log/Echo")
                for _ in range(3):
                    assert echo(b"hello", timeout=5) == b"hello"
                assert echo(b"hello", metadata=[("x-request-id", "given-id-1")], timeout=5)
                unsampled = f"00-{unsampled_trace:032x}-{random.getrandbits(64) | 1:016x}-00"
                assert echo(b"hello", metadata=[("traceparent", unsampled)], timeout=5)
                with pytest.raises(grpc.RpcError):
                    unary(channel, "/pilotfish.test.Down/Get")(b"x", timeout=5)
                assert http1_get(sidecar.address, "/nowhere")[0] == 404
                assert wait_for(lambda: len(read_lines(log_path)) >= 7)
                spans = wait_spans(receiver, lambda got: sum(s.kind == SERVER for s in got) >= 5)
    finally:
        upstream.stop()

    lines = read_lines(log_path)
    assert len(lines) == 7
    for line in lines:
        assert list(line) == list(ALL_FIELDS)  # every documented field, in order
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["start_time"])
        assert isinstance(line["duration_ms"], float | int) and line["duration_ms"] >= 0
        assert line["listener"] == "ingress"
        assert line["request_id"]
    *ok_lines, given, not_sampled, down_line, no_route = lines

    server_traces = {f"{s.trace_id:032x}" for s in spans if s.kind == SERVER}
    for line in [*ok_lines, given]:
        assert line["method"] == "POST"
        assert line["path"] == "/pilotfish.test.Log/Echo"
        assert line["authority"] == sidecar.address
        assert line["protocol"] == "HTTP/2"
        assert (line["status"], line["grpc_status"]) == (200, 0)
        assert line["bytes_in"] == line["bytes_out"] == 10  # 5 bytes of gRPC framing + "hello"
        assert line["upstream_host"] == upstream.address
        assert line["attempts"] == 1
        assert line["response_flags"] is None
        assert (line["route"], line["cluster"]) == ("log", "app")
        assert line["trace_id"] in server_traces  # sampled: its spans are in the collector
    for line in ok_lines:
        assert UUID_RE.fullmatch(line["request_id"])  # made by the sidecar
    assert len({line["request_id"] for line in ok_lines}) == 3
    assert given["request_id"] == "given-id-1"
    # Not sampled by the caller: no span, but the caller's trace id still ties the line to it.
    assert not_sampled["trace_id"] == f"{unsampled_trace:032x}"
    assert not_sampled["trace_id"] not in server_traces

    assert down_line["response_flags"] == "UF,URX"
    assert (down_line["status"], down_line["grpc_status"]) == (200, 14)
    assert down_line["upstream_host"] == down
    assert down_line["attempts"] >= 1
    assert (down_line["route"], down_line["cluster"]) == ("down", "down")

    assert no_route["response_flags"] == "NR"
    assert (no_route["status"], no_route["grpc_status"]) == (404, None)
    assert no_route["protocol"] == "HTTP/1.1"
    assert no_route["method"] == "GET" and no_route["path"] == "/nowhere"
    assert no_route["upstream_host"] is None and no_route["attempts"] == 0
    assert no_route["route"] is None and no_route["cluster"] is None


def read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_a_local_reply_body_counts_in_bytes_out(tmp_path: Path) -> None:
    log_path = tmp_path / "access.log"
    with closed_address() as nowhere:
        config = sidecar_config(nowhere, service="s", routes=[route("only", "/only/")])
    config["access_log"] = {"sink": "file", "path": str(log_path)}
    with running_sidecar(config) as sidecar:
        status, body = http1_get(sidecar.address, "/elsewhere")
        assert status == 404
        assert wait_for(lambda: len(read_lines(log_path)) == 1)
    (line,) = read_lines(log_path)
    assert line["response_flags"] == "NR"
    assert line["bytes_out"] == len(body.encode())


def test_command_line_flags_turn_tracing_on_over_the_bootstrap(receiver: OtlpReceiver) -> None:
    """``--otlp-endpoint`` and ``--trace-sampling`` win over a bootstrap that has no tracing."""
    server = GrpcServer("test.Echo", {"Unary": grpc.unary_unary_rpc_method_handler(lambda r, c: r)})
    process = SidecarProcess(
        simple_config([server.address], timeout="5s"),
        "--otlp-endpoint", receiver.endpoint, "--trace-sampling", "1",
    )  # fmt: skip
    try:
        with grpc.insecure_channel(process.address) as channel:
            assert channel.unary_unary("/test.Echo/Unary")(b"x", timeout=5) == b"x"
        spans = receiver.wait_for(2, timeout=10)
        assert {span.kind for span in spans} >= {SERVER, CLIENT}
    finally:
        process.stop()
        server.stop()
