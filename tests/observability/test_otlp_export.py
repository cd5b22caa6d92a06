"""The OTLP exporter against real receivers: OTLP/gRPC (grpcio's server) and OTLP/HTTP, the
choice between them, retries, TLS, and what it must not load."""

from __future__ import annotations

import dataclasses
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.rpc.error_details_pb2 import RetryInfo
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import SpanContext, SpanKind
from opentelemetry.trace.span import TraceFlags

from sidecar.observability.otlp_export import OtlpSpanExporter
from sidecar.observability.otlp_transport import Target
from sidecar.observability.tracing import Tracer
from sidecar.observability.tracing_config import TracingConfig
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


def exporter(endpoint: str, **settings: Any) -> OtlpSpanExporter:
    config = TracingConfig(enabled=True, endpoint=endpoint, export_timeout_s=5.0)
    return OtlpSpanExporter(dataclasses.replace(config, **settings))


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
    assert Target.from_config(config).url == url


def test_the_environment_picks_the_protocol_and_the_base_endpoint_gets_the_signal_path() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/base/",
    }
    config = TracingConfig().with_env(env)
    assert (config.protocol, config.enabled) == ("http/protobuf", True)
    assert Target.from_config(config).url == "http://collector:4318/base/v1/traces"
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
    assert grpc_receiver.metadata[0]["user-agent"].startswith("pilotfish-otlp-exporter/")
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
        started = time.monotonic()
        assert e.export(spans(1)) is SpanExportResult.SUCCESS
        assert time.monotonic() - started < 0.5  # no backoff: the call was never processed
        assert len(receiver.wait_for(2)) == 2
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
    retry_info = RetryInfo(retry_delay=Duration(nanos=20_000_000)).SerializeToString()
    grpc_receiver.refusals.append(
        Refusal(trailing_metadata=(("google.rpc.retryinfo-bin", retry_info),))
    )
    e = exporter(grpc_receiver.endpoint)
    started = time.monotonic()
    assert e.export(spans(2)) is SpanExportResult.SUCCESS
    assert time.monotonic() - started < 0.8  # 20 ms, not the default backoff of about 1 s
    assert grpc_receiver.calls == 2
    assert len(grpc_receiver.wait_for(2)) == 2
    e.shutdown()


def test_permanent_grpc_errors_fail_the_batch_at_once(
    grpc_receiver: OtlpReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    grpc_receiver.refusals.append(Refusal(grpc_code=grpc.StatusCode.INVALID_ARGUMENT))
    e = exporter(grpc_receiver.endpoint)
    with caplog.at_level(logging.WARNING, "pilotfish.tracing"):
        assert e.export(spans(1)) is SpanExportResult.FAILURE
    assert grpc_receiver.calls == 1
    assert "gRPC status 3" in caplog.text
    e.shutdown()


def _openssl(tmp_path: Path, name: str, subject: str) -> tuple[Path, Path]:
    key, cert = tmp_path / f"{name}.key", tmp_path / f"{name}.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", f"/CN={subject}",
            "-addext", f"subjectAltName=DNS:{subject}", "-keyout", str(key), "-out", str(cert),
        ],
        check=True, capture_output=True,
    )
    return key, cert


def test_grpc_over_tls_with_a_client_certificate(tmp_path: Path) -> None:
    server_key, server_cert = _openssl(tmp_path, "server", "localhost")
    client_key, client_cert = _openssl(tmp_path, "client", "sidecar")
    credentials = grpc.ssl_server_credentials(
        [(server_key.read_bytes(), server_cert.read_bytes())],
        root_certificates=client_cert.read_bytes(),
        require_client_auth=True,
    )
    receiver = OtlpReceiver().start(credentials)
    try:
        e = exporter(
            f"https://localhost:{receiver.port}",
            certificate=str(server_cert),
            client_certificate=str(client_cert),
            client_key=str(client_key),
        )
        assert e.export(spans(2)) is SpanExportResult.SUCCESS
        assert len(receiver.wait_for(2)) == 2
        e.shutdown()
        # Without our certificate the collector refuses the handshake.
        anonymous = exporter(
            f"https://localhost:{receiver.port}", certificate=str(server_cert),
            export_timeout_s=0.5,
        )
        assert anonymous.export(spans(1)) is SpanExportResult.FAILURE
        anonymous.shutdown()
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


def test_a_partial_success_is_logged(
    http_receiver: OtlpHttpReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    http_receiver.response = ExportTraceServiceResponse(
        partial_success=ExportTracePartialSuccess(rejected_spans=1, error_message="too old")
    )
    e = exporter(http_receiver.endpoint, protocol="http/protobuf")
    with caplog.at_level(logging.WARNING, "pilotfish.tracing"):
        assert e.export(spans(2)) is SpanExportResult.SUCCESS
    assert "refused 1 of 2 spans: too old" in caplog.text
    e.shutdown()


# -- the collector does not answer ---------------------------------------------------------


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_shutdown_cuts_a_call_the_collector_never_answers(protocol: str) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        e = exporter(
            f"http://127.0.0.1:{listener.getsockname()[1]}", protocol=protocol,
            export_timeout_s=30.0,
        )
        results: list[SpanExportResult] = []
        worker = threading.Thread(target=lambda: results.append(e.export(spans(1))))
        worker.start()
        time.sleep(0.3)  # connected, request sent, waiting for an answer that never comes
        started = time.monotonic()
        e.shutdown()
        worker.join(5)
        assert not worker.is_alive()
        assert time.monotonic() - started < 2
        assert results == [SpanExportResult.FAILURE]


# -- what a tracing sidecar loads ----------------------------------------------------------

NO_HEAVY_MODULES = """
import sys
from pilotfish.deps import check_dependencies
import sidecar.main, sidecar.server
from sidecar.observability.tracing import Tracer
from sidecar.observability.tracing_config import TracingConfig

assert check_dependencies() is None
for protocol in ("grpc", "http/protobuf"):
    tracer = Tracer(TracingConfig(enabled=True, protocol=protocol, endpoint=sys.argv[1],
                                  export_timeout_s=0.2))
    span = tracer.start_server_span([(b":method", b"GET"), (b":path", b"/")])
    tracer.end(span, 200)
    tracer.force_flush()
    tracer.shutdown()
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("grpc", "google", "requests",
               "urllib3") or m.endswith("_pb2") or m.startswith("opentelemetry.exporter"))
print(" ".join(heavy))
"""


def test_exporting_loads_neither_grpcio_nor_protobuf() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        done = subprocess.run(
            [sys.executable, "-c", NO_HEAVY_MODULES, f"http://127.0.0.1:{closed.getsockname()[1]}"],
            capture_output=True, text=True, timeout=60, check=True,
        )
    assert done.stdout.strip() == ""
