"""What the OTLP exporter's transports share: the collector ``Target`` resolved from config,
the ``Attempt`` one request comes to, and a blocking-socket base that lets another thread cut
a call short. The transports themselves are ``otlp_grpc`` and ``otlp_http``."""

from __future__ import annotations

import abc
import contextlib
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import Protocol

from sidecar.observability.tracing_config import HTTP_TRACES_PATH, TracingConfig, split_endpoint


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
