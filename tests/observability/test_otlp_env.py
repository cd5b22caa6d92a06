"""The standard ``OTEL_EXPORTER_OTLP_*`` variables, each in its generic and its ``_TRACES_``
form, set in the environment of a tracer built as the sidecar builds it (``Tracer.create``),
against real OTLP receivers: one span is ended and flushed, and what the collector saw (or
the count of spans lost) says whether the variable was honoured."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from sidecar.observability.tracing import Tracer
from sidecar.observability.tracing_config import TracingConfig
from tests.observability.certs import Pki, make_pki
from tests.observability.otlp_receiver import OtlpHttpReceiver, OtlpReceiver

PREFIXES = ["OTEL_EXPORTER_OTLP_", "OTEL_EXPORTER_OTLP_TRACES_"]
REQUEST = [(b":method", b"GET"), (b":path", b"/env"), (b":authority", b"svc")]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR"):
        # The system's bundle must not be what makes a TLS test pass (or fail).
        monkeypatch.delenv(name, raising=False)


def export_one(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Tracer:
    """Set ``env``, build the tracer from an empty config (the variables turn it on), end one
    span and flush it (blocking until the export succeeded or failed)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    tracer = Tracer.create(TracingConfig())
    assert tracer.enabled
    tracer.end(tracer.start_server_span(REQUEST), 200)
    tracer.force_flush()
    return tracer


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


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


def grpc_tls_receiver(pki: Pki, *, require_client: bool = False) -> OtlpReceiver:
    credentials = grpc.ssl_server_credentials(
        [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())],
        root_certificates=pki.ca.read_bytes() if require_client else None,
        require_client_auth=require_client,
    )
    return OtlpReceiver().start(credentials)


# -- endpoint and protocol --------------------------------------------------------------------


def test_the_generic_endpoint_is_the_grpc_collector(
    monkeypatch: pytest.MonkeyPatch, grpc_receiver: OtlpReceiver
) -> None:
    tracer = export_one(monkeypatch, {"OTEL_EXPORTER_OTLP_ENDPOINT": grpc_receiver.endpoint})
    assert [s.attributes["url.path"] for s in grpc_receiver.wait_for(1)] == ["/env"]
    assert tracer.dropped_spans == 0
    tracer.shutdown()


def test_the_traces_endpoint_wins_over_the_generic_one(
    monkeypatch: pytest.MonkeyPatch, grpc_receiver: OtlpReceiver
) -> None:
    tracer = export_one(
        monkeypatch,
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",  # nothing listens there
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": grpc_receiver.endpoint,
        },
    )
    assert len(grpc_receiver.wait_for(1)) == 1
    assert tracer.dropped_spans == 0
    tracer.shutdown()


@pytest.mark.parametrize("prefix", PREFIXES)
def test_http_protobuf_posts_to_the_signal_path_of_a_base_endpoint_or_to_a_traces_url(
    monkeypatch: pytest.MonkeyPatch, http_receiver: OtlpHttpReceiver, prefix: str
) -> None:
    # The generic endpoint is the collector's base URL; the per-signal one is used as given.
    endpoint = f"{http_receiver.endpoint}/otlp" + ("/custom" if "TRACES" in prefix else "")
    tracer = export_one(
        monkeypatch, {f"{prefix}PROTOCOL": "http/protobuf", f"{prefix}ENDPOINT": endpoint}
    )
    assert len(http_receiver.wait_for(1)) == 1
    assert http_receiver.paths == (
        ["/otlp/custom"] if "TRACES" in prefix else ["/otlp/v1/traces"]
    )
    tracer.shutdown()


# -- headers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_headers_go_with_every_export(
    monkeypatch: pytest.MonkeyPatch,
    grpc_receiver: OtlpReceiver,
    http_receiver: OtlpHttpReceiver,
    prefix: str,
    protocol: str,
) -> None:
    receiver = grpc_receiver if protocol == "grpc" else http_receiver
    tracer = export_one(
        monkeypatch,
        {
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": protocol,
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint,
            f"{prefix}HEADERS": "X-Api-Key=s%20cret,tenant=t1",
        },
    )
    receiver.wait_for(1)
    # Names lowercased, values URL-decoded, as the specification writes them.
    assert receiver.metadata[0]["x-api-key"] == "s cret"
    assert receiver.metadata[0]["tenant"] == "t1"
    tracer.shutdown()


def test_the_traces_headers_replace_the_generic_ones(
    monkeypatch: pytest.MonkeyPatch, grpc_receiver: OtlpReceiver
) -> None:
    tracer = export_one(
        monkeypatch,
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": grpc_receiver.endpoint,
            "OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=generic,x-generic=1",
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "x-api-key=traces",
        },
    )
    grpc_receiver.wait_for(1)
    assert grpc_receiver.metadata[0]["x-api-key"] == "traces"
    assert "x-generic" not in grpc_receiver.metadata[0]
    tracer.shutdown()


# -- compression ------------------------------------------------------------------------------

# grpc.compression_enabled_algorithms_bitset: bit 0 identity, bit 1 deflate, bit 2 gzip. A
# receiver without gzip refuses a gzip call, so its answer says what the exporter sent.
IDENTITY_AND_DEFLATE = 0b011
IDENTITY_AND_GZIP = 0b101


@pytest.mark.parametrize("prefix", PREFIXES)
def test_grpc_compression(monkeypatch: pytest.MonkeyPatch, prefix: str) -> None:
    refusing = OtlpReceiver().start(
        options=[("grpc.compression_enabled_algorithms_bitset", IDENTITY_AND_DEFLATE)]
    )
    accepting = OtlpReceiver().start(
        options=[("grpc.compression_enabled_algorithms_bitset", IDENTITY_AND_GZIP)]
    )
    try:
        env = {f"{prefix}COMPRESSION": "gzip", "OTEL_EXPORTER_OTLP_TIMEOUT": "500"}
        refused = export_one(monkeypatch, {**env, f"{prefix}ENDPOINT": refusing.endpoint})
        assert (refused.dropped_spans, len(refusing.spans)) == (1, 0)
        refused.shutdown()
        taken = export_one(monkeypatch, {**env, f"{prefix}ENDPOINT": accepting.endpoint})
        assert (taken.dropped_spans, len(accepting.wait_for(1))) == (0, 1)
        taken.shutdown()
    finally:
        refusing.stop()
        accepting.stop()


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("compression", ["gzip", "deflate"])
def test_http_compression(
    monkeypatch: pytest.MonkeyPatch, http_receiver: OtlpHttpReceiver, prefix: str,
    compression: str,
) -> None:
    tracer = export_one(
        monkeypatch,
        {
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": http_receiver.endpoint + "/v1/traces",
            f"{prefix}COMPRESSION": compression,
        },
    )
    # The receiver inflates by Content-Encoding before decoding: a wrong one fails the parse.
    assert len(http_receiver.wait_for(1)) == 1
    assert http_receiver.metadata[0]["content-encoding"] == compression
    tracer.shutdown()


# -- timeout ----------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_an_export_that_outlasts_the_timeout_fails(
    monkeypatch: pytest.MonkeyPatch,
    grpc_receiver: OtlpReceiver,
    http_receiver: OtlpHttpReceiver,
    prefix: str,
    protocol: str,
) -> None:
    # The collector answers after 1.5 s. 300 means milliseconds, as the specification says:
    # read as seconds (as the Python SDK reads the generic variable) the export would succeed.
    receiver = grpc_receiver if protocol == "grpc" else http_receiver
    receiver.delay_s = 1.5
    tracer = export_one(
        monkeypatch,
        {
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": protocol,
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint,
            f"{prefix}TIMEOUT": "300",
        },
    )
    assert tracer.dropped_spans == 1
    assert receiver.calls >= 1
    tracer.shutdown()


def test_without_a_timeout_a_slow_collector_is_waited_for(
    monkeypatch: pytest.MonkeyPatch, grpc_receiver: OtlpReceiver
) -> None:
    grpc_receiver.delay_s = 1.5  # as above, within the default of 10 s
    tracer = export_one(monkeypatch, {"OTEL_EXPORTER_OTLP_ENDPOINT": grpc_receiver.endpoint})
    assert tracer.dropped_spans == 0
    assert len(grpc_receiver.wait_for(1)) == 1
    tracer.shutdown()


# -- TLS --------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", PREFIXES)
def test_grpc_certificate_verifies_the_collector(
    monkeypatch: pytest.MonkeyPatch, pki: Pki, prefix: str
) -> None:
    receiver = grpc_tls_receiver(pki)
    try:
        env = {
            f"{prefix}ENDPOINT": f"https://localhost:{receiver.port}",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "1000",
        }
        # Our CA is not the system's: without the variable the handshake fails.
        untrusted = export_one(monkeypatch, env)
        assert (untrusted.dropped_spans, receiver.calls) == (1, 0)
        untrusted.shutdown()
        trusted = export_one(monkeypatch, {**env, f"{prefix}CERTIFICATE": str(pki.ca)})
        assert (trusted.dropped_spans, len(receiver.wait_for(1))) == (0, 1)
        trusted.shutdown()
    finally:
        receiver.stop()


@pytest.mark.parametrize("prefix", PREFIXES)
def test_http_certificate_verifies_the_collector(
    monkeypatch: pytest.MonkeyPatch, pki: Pki, prefix: str
) -> None:
    receiver = OtlpHttpReceiver().start(tls=pki.server_context())
    try:
        env = {
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            f"{prefix}ENDPOINT": f"https://localhost:{receiver.port}"
            + ("/v1/traces" if "TRACES" in prefix else ""),
            "OTEL_EXPORTER_OTLP_TIMEOUT": "1000",
        }
        untrusted = export_one(monkeypatch, env)
        assert (untrusted.dropped_spans, receiver.calls) == (1, 0)
        untrusted.shutdown()
        # A CA bundle set for requests must not hide the configured one.
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pki.server_cert))
        trusted = export_one(monkeypatch, {**env, f"{prefix}CERTIFICATE": str(pki.ca)})
        assert (trusted.dropped_spans, len(receiver.wait_for(1))) == (0, 1)
        trusted.shutdown()
    finally:
        receiver.stop()


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_client_certificate_and_key_for_mutual_tls(
    monkeypatch: pytest.MonkeyPatch, pki: Pki, prefix: str, protocol: str
) -> None:
    receiver: OtlpReceiver
    if protocol == "grpc":
        receiver = grpc_tls_receiver(pki, require_client=True)
    else:
        receiver = OtlpHttpReceiver().start(tls=pki.server_context(require_client=True))
    try:
        env = {
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": protocol,
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"https://localhost:{receiver.port}",
            "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE": str(pki.ca),
            "OTEL_EXPORTER_OTLP_TIMEOUT": "1000",
        }
        anonymous = export_one(monkeypatch, env)
        assert anonymous.dropped_spans == 1
        anonymous.shutdown()
        known = export_one(
            monkeypatch,
            {
                **env,
                f"{prefix}CLIENT_CERTIFICATE": str(pki.client_cert),
                f"{prefix}CLIENT_KEY": str(pki.client_key),
            },
        )
        assert (known.dropped_spans, len(receiver.wait_for(1))) == (0, 1)
        known.shutdown()
    finally:
        receiver.stop()


@pytest.mark.parametrize("prefix", PREFIXES)
def test_insecure_decides_tls_for_an_endpoint_without_a_scheme(
    monkeypatch: pytest.MonkeyPatch, pki: Pki, grpc_receiver: OtlpReceiver, prefix: str
) -> None:
    plaintext = export_one(
        monkeypatch,
        {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"localhost:{grpc_receiver.port}",
            f"{prefix}INSECURE": "true",
        },
    )
    assert (plaintext.dropped_spans, len(grpc_receiver.wait_for(1))) == (0, 1)
    plaintext.shutdown()
    receiver = grpc_tls_receiver(pki)
    try:
        tls = export_one(
            monkeypatch,
            {
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"localhost:{receiver.port}",
                f"{prefix}INSECURE": "false",
                "OTEL_EXPORTER_OTLP_CERTIFICATE": str(pki.ca),
            },
        )
        assert (tls.dropped_spans, len(receiver.wait_for(1))) == (0, 1)
        tls.shutdown()
    finally:
        receiver.stop()
