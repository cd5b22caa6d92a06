"""OTLP/HTTP with protobuf bodies: one ``POST`` per batch on a kept-alive HTTP/1.1 connection
(``http.client``), ``content-type: application/x-protobuf``.

Per the OTLP specification, 2xx is success (its body may report a partial success); 429, 502,
503 and 504 are transient, with an optional ``Retry-After`` in seconds; any other status fails
the batch. A connection that breaks is opened again for the next request.
"""

from __future__ import annotations

import contextlib
import http.client
import socket

from sidecar.observability.otlp_encode import rejected_spans
from sidecar.observability.otlp_transport import Attempt, BlockingTransport, Target

RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})


class HttpTransport(BlockingTransport):
    def __init__(self, target: Target, user_agent: str) -> None:
        super().__init__()
        self._target = target
        self._headers = {
            "Content-Type": "application/x-protobuf",
            "User-Agent": user_agent,
            **dict(target.headers),
        }
        if target.compression != "none":
            self._headers["Content-Encoding"] = target.compression
        self._conn: http.client.HTTPConnection | None = None

    def _live_socket(self) -> socket.socket | None:
        return self._conn.sock if self._conn is not None else None

    def _send(self, body: bytes, timeout_s: float) -> Attempt:
        if timeout_s <= 0:
            return Attempt(ok=False, retryable=True, detail="timed out")
        # A kept connection the collector has since closed fails at once: try a fresh one.
        for fresh in (self._conn is None, True):
            try:
                conn = self._connection(timeout_s)
                conn.request("POST", self._target.path, body=body, headers=self._headers)
                response = conn.getresponse()
                payload = response.read()
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                if fresh or self._closed:
                    return Attempt(ok=False, retryable=True, detail=f"{exc!r}")
                continue
            if response.will_close:
                self._drop()
            return _outcome(response, payload)
        raise AssertionError("unreachable")

    def _connection(self, timeout_s: float) -> http.client.HTTPConnection:
        with self._lock:
            if self._closed:
                raise ConnectionAbortedError("the exporter is shutting down")
            if self._conn is None:
                target = self._target
                if target.tls is not None:
                    self._conn = http.client.HTTPSConnection(
                        target.host, target.port, timeout=timeout_s, context=target.tls
                    )
                else:
                    self._conn = http.client.HTTPConnection(
                        target.host, target.port, timeout=timeout_s
                    )
            conn = self._conn
        conn.timeout = timeout_s
        if conn.sock is not None:
            conn.sock.settimeout(timeout_s)
        return conn

    def _drop(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def _outcome(response: http.client.HTTPResponse, payload: bytes) -> Attempt:
    status = response.status
    if 200 <= status < 300:
        try:
            rejected, detail = rejected_spans(payload)
        except ValueError as exc:
            return Attempt(ok=True, detail=f"unreadable response: {exc}")
        return Attempt(ok=True, detail=detail, rejected_spans=rejected)
    retry_after: float | None = None
    with contextlib.suppress(TypeError, ValueError):
        retry_after = max(0.0, float(response.getheader("Retry-After", "")))
    return Attempt(
        ok=False,
        retryable=status in RETRYABLE_STATUSES,
        detail=f"HTTP {status} {response.reason}".rstrip(),
        retry_after_s=retry_after,
    )
