"""The OTLP exporter the sidecar builds from its tracing config, against real receivers:
OTLP/gRPC (grpcio's server) and OTLP/HTTP, the choice between them, retries, TLS, and a
collector that does not answer."""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.rpc.error_details_pb2 import RetryInfo
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanContext, SpanKind
from opentelemetry.trace.span import TraceFlags

from sidecar.observability.otlp_export import DeferredExporter, Endpoint, otlp_exporter
from sidecar.observability.tracing import Tracer
from sidecar.observability.tracing_config import TracingConfig
from tests.observability.certs import make_pki
from tests.observability.otlp_receiver import OtlpHttpReceiver, OtlpReceiver, Refusal

RESOURCE = Resource({"service.name": "exporter-test"})


def spans(count: int, attribute_bytes: int = 16) -> list[ReadableSpan]:
    return [
        ReadableSpan(
            name=f"span-{i}",
            context=SpanContext(
                0xABC, i + 1, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED)
            ),
            kind=SpanKind.SERVER,
            resource=RESOURCE,
            attributes={"payload": "x" * attribute_bytes, "index": i},
            start_time=1,
            end_time=2,
        )
        for i in range(count)
    ]


def exporter(endpoint: str, **settings: Any) -> SpanExporter:
    config = TracingConfig(enabled=True, endpoint=endpoint, export_timeout_s=5.0)
    return otlp_exporter(dataclasses.replace(config, **settings))


@pytest.fixture
def grpc_receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver().start()
    yield r
    r.stop()


@pytest.fixture
def http_receiver() -> Iterator[OtlpHttpReceiver]:
    r = OtlpHttpReceiver().start()
    yield r
    r.stop()


# -- which exporter, where ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "url"),
    [
        (TracingConfig(), "http://127.0.0.1:4317"),
        (TracingConfig(protocol="http/protobuf"), "http://127.0.0.1:4318/v1/traces"),
        (TracingConfig(endpoint="https://collector:4317"), "https://collector:4317"),
        # Without a scheme, ``insecure`` decides (as the SDK's exporters do).
        (TracingConfig(endpoint="collector:4317"), "http://collector:4317"),
        (TracingConfig(endpoint="collector:4317", insecure=False), "https://collector:4317"),
        (TracingConfig(endpoint="http://[::1]:4317/ignored"), "http://[::1]:4317"),
        (
            TracingConfig(protocol="http/protobuf", endpoint="http://collector:4318"),
            "http://collector:4318/v1/traces",
        ),
        (
            TracingConfig(protocol="http/protobuf", endpoint="https://saas.example/otlp/traces?a=b"),
            "https://saas.example:443/otlp/traces?a=b",
        ),
    ],
)
def test_the_endpoint_resolves_per_protocol(config: TracingConfig, url: str) -> None:
    assert Endpoint.of(config).url(config.protocol) == url


def test_the_environment_picks_the_protocol_and_the_base_endpoint_gets_the_signal_path() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/base/",
    }
    config = TracingConfig().with_env(env)
    assert (config.protocol, config.enabled) == ("http/protobuf", True)
    assert Endpoint.of(config).url(config.protocol) == "http://collector:4318/base/v1/traces"
    # The per-signal variables win, and their URL is used as it is.
    config = TracingConfig().with_env(
        {
            **env,
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317",
        }
    )
    assert (config.protocol, config.endpoint) == ("grpc", "http://collector:4317")


def test_a_bad_endpoint_is_refused_when_the_tracer_is_built() -> None:
    with pytest.raises(ValueError, match="scheme"):
        Tracer(TracingConfig(enabled=True, endpoint="ftp://collector:21"))


# -- OTLP/gRPC ----------------------------------------------------------------------------


def test_grpc_export_with_headers_and_gzip(grpc_receiver: OtlpReceiver) -> None:
    e = exporter(grpc_receiver.endpoint, headers=(("x-api-key", "secret"),), compression="gzip")
    assert e.export(spans(3)) is SpanExportResult.SUCCESS
    received = grpc_receiver.wait_for(3)
    assert sorted(s.name for s in received) == ["span-0", "span-1", "span-2"]
    assert received[0].resource == {"service.name": "exporter-test"}
    assert grpc_receiver.metadata[0]["x-api-key"] == "secret"
    assert grpc_receiver.metadata[0]["user-agent"].startswith("OTel-OTLP-Exporter-Python/")
    # The connection is kept: a second batch goes over it.
    assert e.export(spans(1)) is SpanExportResult.SUCCESS
    grpc_receiver.wait_for(4)
    e.shutdown()


def test_a_connection_the_collector_closed_while_idle_is_replaced_at_once() -> None:
    # The collector sends GOAWAY to connections idle for 100 ms, as collectors do (later).
    receiver = OtlpReceiver().start(options=[("grpc.max_connection_idle_ms", 100)])
    try:
        e = exporter(receiver.endpoint)
        assert e.export(spans(1)) is SpanExportResult.SUCCESS
        time.sleep(0.5)
        assert e.export(spans(1)) is SpanExportResult.SUCCESS
        assert len(receiver.wait_for(2)) == 2
        assert receiver.calls == 2  # no call was lost to the closed connection
        e.shutdown()
    finally:
        receiver.stop()


def test_a_batch_larger_than_the_flow_control_window_is_sent_whole(
    grpc_receiver: OtlpReceiver,
) -> None:
    e = exporter(grpc_receiver.endpoint)
    batch = spans(512, attribute_bytes=1000)  # about 560 KB, ten initial windows
    assert e.export(batch) is SpanExportResult.SUCCESS
    assert len(grpc_receiver.wait_for(512)) == 512
    e.shutdown()


def test_transient_grpc_errors_are_retried_after_the_delay_the_collector_asks_for(
    grpc_receiver: OtlpReceiver,
) -> None:
    # Two refusals asking for 20 ms: without the collector's delay, the default backoff
    # (1 s, then 2 s) would run past the export timeout and fail the batch.
    retry_info = RetryInfo(retry_delay=Duration(nanos=20_000_000)).SerializeToString()
    grpc_receiver.refusals += [
        Refusal(trailing_metadata=(("google.rpc.retryinfo-bin", retry_info),))
    ] * 2
    e = exporter(grpc_receiver.endpoint, export_timeout_s=1.5)
    assert e.export(spans(2)) is SpanExportResult.SUCCESS
    assert grpc_receiver.calls == 3
    assert len(grpc_receiver.wait_for(2)) == 2
    e.shutdown()


def test_permanent_grpc_errors_fail_the_batch_at_once(
    grpc_receiver: OtlpReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    grpc_receiver.refusals.append(Refusal(grpc_code=grpc.StatusCode.INVALID_ARGUMENT))
    e = exporter(grpc_receiver.endpoint)
    with caplog.at_level(logging.WARNING):
        assert e.export(spans(1)) is SpanExportResult.FAILURE
    assert grpc_receiver.calls == 1
    assert "INVALID_ARGUMENT" in caplog.text
    e.shutdown()


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_tls_with_a_client_certificate(tmp_path: Path, protocol: str) -> None:
    pki = make_pki(tmp_path)
    receiver: OtlpReceiver
    if protocol == "grpc":
        credentials = grpc.ssl_server_credentials(
            [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())],
            root_certificates=pki.ca.read_bytes(),
            require_client_auth=True,
        )
        receiver = OtlpReceiver().start(credentials)
    else:
        receiver = OtlpHttpReceiver().start(tls=pki.server_context(require_client=True))
    try:
        e = exporter(
            f"https://localhost:{receiver.port}",
            protocol=protocol,
            certificate=str(pki.ca),
            client_certificate=str(pki.client_cert),
            client_key=str(pki.client_key),
        )
        assert e.export(spans(2)) is SpanExportResult.SUCCESS
        assert len(receiver.wait_for(2)) == 2
        e.shutdown()
        # Without our certificate the collector refuses the handshake.
        anonymous = exporter(
            f"https://localhost:{receiver.port}", protocol=protocol, certificate=str(pki.ca),
            export_timeout_s=0.5,
        )
        assert anonymous.export(spans(1)) is SpanExportResult.FAILURE
        anonymous.shutdown()
        assert len(receiver.spans) == 2
    finally:
        receiver.stop()


def test_missing_certificate_files_fail_when_the_tracer_is_built(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        Tracer(
            TracingConfig(
                enabled=True, endpoint="https://collector:4317",
                certificate=str(tmp_path / "missing.pem"),
            )
        )


# -- OTLP/HTTP ----------------------------------------------------------------------------


def test_http_protobuf_export(http_receiver: OtlpHttpReceiver) -> None:
    e = exporter(
        http_receiver.endpoint, protocol="http/protobuf", headers=(("x-api-key", "secret"),),
        compression="deflate",
    )
    assert e.export(spans(3)) is SpanExportResult.SUCCESS
    assert e.export(spans(2)) is SpanExportResult.SUCCESS
    assert len(http_receiver.wait_for(5)) == 5
    assert http_receiver.paths == ["/v1/traces", "/v1/traces"]
    headers = http_receiver.metadata[0]
    assert headers["content-type"] == "application/x-protobuf"
    assert headers["x-api-key"] == "secret"
    e.shutdown()


def test_http_retries_what_is_transient_and_only_that(http_receiver: OtlpHttpReceiver) -> None:
    http_receiver.refusals += [Refusal(http_status=503, retry_after="0"), Refusal(http_status=400)]
    e = exporter(http_receiver.endpoint, protocol="http/protobuf")
    assert e.export(spans(1)) is SpanExportResult.FAILURE  # 503, then 400: not retried
    assert http_receiver.calls == 2
    http_receiver.refusals.append(Refusal(http_status=429, retry_after="0"))
    assert e.export(spans(1)) is SpanExportResult.SUCCESS
    assert http_receiver.calls == 4
    e.shutdown()


# -- the collector does not answer ---------------------------------------------------------


def test_shutdown_cuts_a_grpc_call_the_collector_never_answers() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        e = exporter(f"http://127.0.0.1:{listener.getsockname()[1]}", export_timeout_s=30.0)
        results: list[SpanExportResult] = []
        worker = threading.Thread(target=lambda: results.append(e.export(spans(1))))
        worker.start()
        listener.settimeout(10)
        held, _ = listener.accept()  # connected; no answer will ever come
        with held:
            e.shutdown()
            worker.join(10)  # well before the call's own timeout of 30 s
            assert not worker.is_alive()
        assert results == [SpanExportResult.FAILURE]


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_tracer_shutdown_is_bounded_and_counts_what_a_silent_collector_held(
    protocol: str,
) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        tracer = Tracer(
            TracingConfig(
                enabled=True, protocol=protocol, endpoint=f"http://127.0.0.1:{port}",
                export_timeout_s=30.0, shutdown_timeout_s=0.2, schedule_delay_s=0.05,
            )
        )
        for _ in range(3):
            tracer.end(tracer.start_server_span([(b":method", b"GET"), (b":path", b"/")]), 200)
        listener.settimeout(10)
        held, _ = listener.accept()  # the batch of three is under way; it will get no answer
        with held:
            done = threading.Thread(target=tracer.shutdown)
            done.start()
            done.join(10)  # shutdown_timeout_s and a second's grace, not the 30 s export
            assert not done.is_alive()
            assert tracer.dropped_spans == 3


# -- built with the first batch -------------------------------------------------------------


def test_the_exporter_is_built_by_the_first_export_and_not_after_shutdown(
    grpc_receiver: OtlpReceiver,
) -> None:
    e = exporter(grpc_receiver.endpoint)
    assert isinstance(e, DeferredExporter) and not e.built
    assert e.force_flush() is True  # nothing to flush: nothing is built for it
    assert not e.built
    assert e.export(spans(1)) is SpanExportResult.SUCCESS
    assert e.built
    assert len(grpc_receiver.wait_for(1)) == 1
    e.shutdown()
    never = exporter(grpc_receiver.endpoint)
    never.shutdown()
    assert never.export(spans(1)) is SpanExportResult.FAILURE  # counted as dropped upstream
    assert not never.built
    assert grpc_receiver.calls == 1
