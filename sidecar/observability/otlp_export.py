"""The OTLP span exporter: OTLP/gRPC or OTLP/HTTP (protobuf), without grpcio or protobuf.

The OpenTelemetry SDK's OTLP exporters bring grpcio (its threads, its C core) or requests, and
the protobuf runtime with the generated OTLP modules: about 14 MB resident, in a sidecar that
now idles at 35 MB with tracing on. This exporter writes the request itself (``otlp_encode``)
and sends it over one connection kept open between batches: an HTTP/2 gRPC call made with
``h2`` (``otlp_grpc``), or an HTTP/1.1 POST (``otlp_http``). Each transport is imported when
the first batch leaves, so a sidecar that never exports a span pays for neither.

Behaviour follows the OTLP exporter specification and the SDK's exporters: transient failures
(connection errors, gRPC UNAVAILABLE and friends, HTTP 429/502/503/504) are retried with
exponential backoff (1 s, 2 s, 4 s… with ±20% jitter, or the server's requested delay) until
``export_timeout_s`` has passed; anything else fails the batch at once. ``shutdown`` cuts a
call in flight and any backoff short.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import random
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from sidecar.observability.otlp_encode import encode_request
from sidecar.observability.tracing_config import HTTP_TRACES_PATH, TracingConfig, split_endpoint

log = logging.getLogger("pilotfish.tracing")

MAX_ATTEMPTS = 6
USER_AGENT = "pilotfish-otlp-exporter/0.1"


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one request to the collector came to."""

    ok: bool
    retryable: bool = False
    detail: str = ""
    retry_after_s: float | None = None  # the collector's requested delay, when it sent one
    rejected_spans: int = 0  # a partial success: spans the collector took but refused


class Transport(Protocol):
    def send(self, body: bytes, timeout_s: float) -> Attempt:
        """One request carrying the encoded (and compressed) ``body``; never raises for
        network or protocol errors, which come back as a failed ``Attempt``."""
        ...

    def close(self) -> None:
        """Drop the connection; safe from another thread while ``send`` is blocked in it."""
        ...


class BlockingTransport(abc.ABC):
    """A ``Transport`` on a blocking socket: one call at a time from the exporter's thread,
    ``close`` from any thread. Subclasses make the call and own the connection."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards the connection and the two below
        self._closed = False
        self._sending = False

    def send(self, body: bytes, timeout_s: float) -> Attempt:
        with self._lock:
            if self._closed:
                return Attempt(ok=False, detail="the exporter is shutting down")
            self._sending = True
        try:
            return self._send(body, timeout_s)
        finally:
            with self._lock:
                self._sending = False
            if self._closed:
                self._drop()

    def close(self) -> None:
        """For good: a ``send`` blocked now fails at once, and so does every later one."""
        with self._lock:
            self._closed = True
            sending, sock = self._sending, self._live_socket()
        if not sending:
            self._drop()
        elif sock is not None:
            # Wakes the sender blocked on it, which then closes it: closing a connection
            # under another thread's feet is not safe.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    @abc.abstractmethod
    def _send(self, body: bytes, timeout_s: float) -> Attempt:
        """The call itself; network and protocol errors come back as a failed ``Attempt``."""

    @abc.abstractmethod
    def _live_socket(self) -> socket.socket | None:
        """The open connection's socket, if any (called with ``_lock`` held)."""

    @abc.abstractmethod
    def _drop(self) -> None:
        """Close the connection, if any; the next call opens a new one."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where and how to export, resolved from a ``TracingConfig``."""

    protocol: str  # "grpc" or "http/protobuf"
    host: str
    port: int
    path: str  # http/protobuf: the URL's path and query; grpc: unused
    tls: ssl.SSLContext | None
    headers: tuple[tuple[str, str], ...]
    compression: str  # "none", "gzip", "deflate"
    timeout_s: float

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{self.authority}{self.path if self.protocol != 'grpc' else ''}"

    @classmethod
    def from_config(cls, config: TracingConfig) -> Target:
        """Raises ``ValueError`` for an endpoint that is no URL, ``OSError`` (``ssl.SSLError``
        included) for certificate files that cannot be loaded."""
        parts = split_endpoint(config.export_endpoint)
        assert parts.hostname is not None  # split_endpoint checked
        # As the SDK's exporters: the scheme decides; without one, ``insecure`` does.
        secure = parts.scheme == "https" or (not parts.scheme and not config.insecure)
        port = parts.port or (443 if secure else 80)
        path = parts.path if parts.path not in ("", "/") else HTTP_TRACES_PATH
        if parts.query:
            path += f"?{parts.query}"
        return cls(
            protocol=config.protocol,
            host=parts.hostname,
            port=port,
            path=path,
            tls=_tls_context(config, config.protocol == "grpc") if secure else None,
            headers=config.headers,
            compression=config.compression,
            timeout_s=config.export_timeout_s,
        )


def _tls_context(config: TracingConfig, grpc: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=config.certificate or None)
    if config.client_certificate:
        context.load_cert_chain(config.client_certificate, config.client_key or None)
    if grpc:
        context.set_alpn_protocols(["h2"])
    return context


def compress(body: bytes, compression: str) -> bytes:
    if compression == "gzip":
        packer = zlib.compressobj(wbits=31)  # 16 + 15: a gzip header and trailer
        return packer.compress(body) + packer.flush()
    if compression == "deflate":
        return zlib.compress(body)
    return body


class OtlpSpanExporter(SpanExporter):
    """Encodes each batch once and sends it with retries; see the module docstring."""

    def __init__(self, config: TracingConfig, *, transport: Transport | None = None) -> None:
        self.target = Target.from_config(config)
        self._transport = transport
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._jitter = random.Random()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._stopping.is_set():
            return SpanExportResult.FAILURE
        body = compress(encode_request(spans), self.target.compression)
        transport = self._transport or self._open()
        deadline = time.monotonic() + self.target.timeout_s
        for attempt_number in range(MAX_ATTEMPTS):
            attempt = transport.send(body, max(deadline - time.monotonic(), 0.0))
            if attempt.ok:
                if attempt.rejected_spans:
                    log.warning(
                        "the collector at %s refused %d of %d spans: %s",
                        self.target.url, attempt.rejected_spans, len(spans), attempt.detail,
                    )
                return SpanExportResult.SUCCESS
            backoff = attempt.retry_after_s
            if backoff is None:
                backoff = 2**attempt_number * self._jitter.uniform(0.8, 1.2)
            if (
                not attempt.retryable
                or attempt_number + 1 == MAX_ATTEMPTS
                or backoff > deadline - time.monotonic()
                or self._stopping.is_set()
            ):
                log.warning(
                    "could not export %d spans to %s: %s", len(spans), self.target.url,
                    attempt.detail,
                )
                return SpanExportResult.FAILURE
            log.debug("exporting to %s failed (%s); again in %.1fs", self.target.url,
                      attempt.detail, backoff)
            if self._stopping.wait(backoff):
                break
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        self._stopping.set()
        with self._lock:
            transport = self._transport
        if transport is not None:
            transport.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # nothing is held here between exports

    def _open(self) -> Transport:
        with self._lock:
            if self._transport is None:
                if self.target.protocol == "grpc":
                    from sidecar.observability.otlp_grpc import GrpcTransport

                    self._transport = GrpcTransport(self.target, USER_AGENT)
                else:
                    from sidecar.observability.otlp_http import HttpTransport

                    self._transport = HttpTransport(self.target, USER_AGENT)
            return self._transport
