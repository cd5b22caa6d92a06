"""The OTLP span exporter for a ``TracingConfig``, with every setting taken from the config:
OTLP/gRPC by our own client (``otlp_grpc``: the sidecar's HTTP/2 codec on a blocking socket,
OpenTelemetry's encoder for the payload, no grpcio), or OpenTelemetry's OTLP/HTTP (protobuf)
exporter.

The config already holds the ``OTEL_*`` environment (``TracingConfig.with_env``), so each
setting is passed explicitly: the exporters' own reading of the environment differs from the
specification in places (the Python SDK reads ``OTEL_EXPORTER_OTLP_TIMEOUT`` as seconds) and
must not override what the sidecar was configured with.

Transient failures are retried by both as the OTLP specification asks (gRPC ``UNAVAILABLE``
and the other retryable statuses, HTTP 429/502/503/504, connection errors: 1 s, 2 s, 4 s…
with jitter, or the delay the collector asks for) until the export timeout has passed.

Each exporter, and the protobuf runtime (and, for OTLP/HTTP, requests) under it, is imported
and built when the first batch of spans leaves, in the span processor's thread: a sidecar
without tracing, or with tracing on that has sampled nothing yet, loads none of it, and only
the protocol configured is ever loaded. What can be wrong with the config (the endpoint, the
headers, the certificate files) is checked when the tracer is built.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from sidecar.observability.tracing_config import HTTP_TRACES_PATH, TracingConfig, split_endpoint

if TYPE_CHECKING:
    import ssl

# Below this, an export could not even connect; a zero would also make the HTTP exporter fall
# back to its own reading of the environment.
MIN_TIMEOUT_S = 0.001
# Headers the gRPC call writes itself: a configured header of one of these names would corrupt it.
RESERVED_HEADERS = frozenset(
    {
        "content-type", "te", "user-agent", "grpc-timeout", "grpc-encoding",
        "grpc-accept-encoding", "host", "connection", "transfer-encoding", "content-length",
    }
)  # fmt: skip
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where to export, resolved from a ``TracingConfig`` as the SDK's exporters resolve it:
    the scheme decides between TLS and plaintext; without one, ``insecure`` does."""

    secure: bool
    host: str
    port: int
    path: str  # http/protobuf: the URL's path and query; grpc: unused

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def url(self, protocol: str) -> str:
        scheme = "https" if self.secure else "http"
        return f"{scheme}://{self.authority}{self.path if protocol != 'grpc' else ''}"

    @classmethod
    def of(cls, config: TracingConfig) -> Endpoint:
        """Raises ``ValueError`` for an endpoint that is no URL."""
        parts = split_endpoint(config.export_endpoint)
        assert parts.hostname is not None  # split_endpoint checked
        secure = parts.scheme == "https" or (not parts.scheme and not config.insecure)
        path = parts.path if parts.path not in ("", "/") else HTTP_TRACES_PATH
        if parts.query:
            path += f"?{parts.query}"
        return cls(secure, parts.hostname, parts.port or (443 if secure else 80), path)


def otlp_exporter(config: TracingConfig) -> SpanExporter:
    """The exporter ``config`` asks for, built when it first exports. Raises ``ValueError``
    for an endpoint that is no URL or headers that cannot be sent, and ``OSError`` for
    certificate files that cannot be read or loaded, so a bad config is refused when the
    tracer is built rather than at the first export."""
    from pilotfish.otlp_protos import install

    # Now, not when the exporter is built: it must come before anything imports the modules
    # it serves (an xDS sidecar's Envoy tracing config does), and costs nothing where the
    # files are sound.
    install()
    endpoint = Endpoint.of(config)
    if config.protocol == "grpc":
        grpc = GrpcSettings(
            grpc_metadata(config.headers), _tls_context(config) if endpoint.secure else None
        )
        return DeferredExporter(config, endpoint, grpc)
    if endpoint.secure:
        _check_tls_files(config)
    return DeferredExporter(config, endpoint, None)


@dataclass(frozen=True, slots=True)
class GrpcSettings:
    """What the OTLP/gRPC exporter takes from the config, checked when the tracer is built."""

    metadata: tuple[tuple[bytes, bytes], ...]
    tls: ssl.SSLContext | None


def grpc_metadata(headers: Iterable[tuple[str, str]]) -> tuple[tuple[bytes, bytes], ...]:
    """Configured headers as gRPC metadata (names lowercased, as HTTP/2 requires). Raises
    ``ValueError`` naming ``tracing.headers`` for a name or value that cannot be sent."""
    out: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        key = name.strip().lower().encode()
        if not key or not set(key) <= _TOKEN or key.decode() in RESERVED_HEADERS:
            raise ValueError(f"tracing.headers: {name!r} cannot be sent as gRPC metadata")
        raw = value.encode()
        if any(byte in raw for byte in b"\r\n\0"):
            raise ValueError(f"tracing.headers: the value of {name!r} holds a line break or NUL")
        out.append((key, raw))
    return tuple(out)


def _tls_context(config: TracingConfig) -> ssl.SSLContext:
    """Verifies the collector with ``certificate`` (else the system's roots), presents
    ``client_certificate`` when configured, and offers h2 over ALPN, as gRPC requires."""
    import ssl  # a sidecar has it loaded (asyncio); an embedder's tracer need not

    if bool(config.client_certificate) != bool(config.client_key):
        raise ValueError("tracing.client_certificate and tracing.client_key go together")
    context = ssl.create_default_context(cafile=config.certificate or None)
    if config.client_certificate:
        context.load_cert_chain(config.client_certificate, config.client_key)
    context.set_alpn_protocols(["h2"])
    return context


class DeferredExporter(SpanExporter):
    """Builds the OTLP exporter on the first ``export``, so that a process that exports no
    span never imports it. The span processor calls ``export`` from its own thread, off the
    event loop; ``shutdown`` may come from any thread, and is final."""

    def __init__(
        self, config: TracingConfig, endpoint: Endpoint, grpc: GrpcSettings | None
    ) -> None:
        self._config = config
        self._endpoint = endpoint
        self._grpc = grpc
        self._inner: SpanExporter | None = None
        self._shut = False
        self._lock = threading.Lock()

    @property
    def built(self) -> bool:
        return self._inner is not None

    def _exporter(self) -> SpanExporter | None:
        with self._lock:
            if self._inner is None and not self._shut:
                self._inner = build_exporter(self._config, self._endpoint, self._grpc)
            return self._inner

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        inner = self._exporter()
        if inner is None:
            return SpanExportResult.FAILURE  # shut down
        return inner.export(spans)

    def shutdown(self) -> None:
        with self._lock:
            self._shut = True
            inner = self._inner
        if inner is not None:
            inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        inner = self._inner
        return True if inner is None else inner.force_flush(timeout_millis)


def build_exporter(
    config: TracingConfig, endpoint: Endpoint, grpc: GrpcSettings | None
) -> SpanExporter:
    """The exporter for ``config.protocol``, imported now."""
    timeout = max(config.export_timeout_s, MIN_TIMEOUT_S)
    if grpc is not None:
        from sidecar.observability.otlp_grpc import GrpcSpanExporter

        return GrpcSpanExporter(
            host=endpoint.host,
            port=endpoint.port,
            authority=endpoint.authority,
            tls=grpc.tls,
            metadata=grpc.metadata,
            compression=config.compression,
            timeout_s=timeout,
        )
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpSpanExporter,
    )

    return HttpSpanExporter(
        endpoint=endpoint.url(config.protocol),
        session=_session(),
        # requests reads these itself at each connection; they were checked above.
        certificate_file=(config.certificate or None) if endpoint.secure else None,
        client_key_file=(config.client_key or None) if endpoint.secure else None,
        client_certificate_file=(config.client_certificate or None) if endpoint.secure else None,
        headers=dict(config.headers),
        timeout=timeout,
        compression=Compression(config.compression),
    )


def _session() -> Any:
    """A ``requests`` session in which a configured CA bundle is the one used.

    ``requests`` replaces the session's ``verify`` with ``REQUESTS_CA_BUNDLE`` or
    ``CURL_CA_BUNDLE`` when either is set (psf/requests#3829), which many container images
    set: the exporter would then ignore ``OTEL_EXPORTER_OTLP_CERTIFICATE``. Without a
    configured CA those variables still apply, and so do the proxy variables."""
    import requests

    class Session(requests.Session):
        def merge_environment_settings(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
            settings: dict[str, Any] = super().merge_environment_settings(*args, **kwargs)
            if isinstance(self.verify, str):
                settings["verify"] = self.verify
            return settings

    return Session()


def _check_tls_files(config: TracingConfig) -> None:
    # requests reads them itself, at each connection.
    for path in (config.certificate, config.client_key, config.client_certificate):
        if path:
            Path(path).read_bytes()
