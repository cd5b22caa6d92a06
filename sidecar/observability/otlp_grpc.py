"""OTLP/gRPC: the unary ``TraceService/Export`` call over HTTP/2, made with ``h2`` on a blocking
socket in the exporter's thread.

A gRPC unary call is one HTTP/2 request: HEADERS (``POST``, ``content-type:
application/grpc``, ``te: trailers``, ``grpc-timeout``), the message as DATA behind a 5-byte
prefix (compressed flag, big-endian length), END_STREAM; the answer is HEADERS, the response
message, and trailers carrying ``grpc-status`` (or HEADERS alone, "trailers-only", for an
error). The connection stays open between batches and is opened again after any error.
"""

from __future__ import annotations

import base64
import contextlib
import socket
import time
import zlib
from urllib.parse import unquote_to_bytes

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions

from sidecar.observability.otlp_encode import duration_field, rejected_spans
from sidecar.observability.otlp_transport import Attempt, BlockingTransport, Target

PATH = b"/opentelemetry.proto.collector.trace.v1.TraceService/Export"
READ_SIZE = 65536

# gRPC status codes (grpc/doc/statuscodes.md) the OTLP exporter spec calls transient.
OK = 0
UNKNOWN = 2
INTERNAL = 13
UNAVAILABLE = 14
RETRYABLE = frozenset({1, 4, 8, 10, 11, UNAVAILABLE, 15})
# What a gRPC client makes of an HTTP status that is not 200 (grpc/doc/http-grpc-status-mapping.md).
HTTP_TO_GRPC = {400: INTERNAL, 401: 16, 403: 7, 404: 12, 429: UNAVAILABLE, 502: UNAVAILABLE,
                503: UNAVAILABLE, 504: UNAVAILABLE}
# RST_STREAM codes gRPC clients read as a status (the rest are INTERNAL).
RESET_TO_GRPC = {h2.errors.ErrorCodes.REFUSED_STREAM: UNAVAILABLE, h2.errors.ErrorCodes.CANCEL: 1,
                 h2.errors.ErrorCodes.ENHANCE_YOUR_CALM: 8}


class _Timeout(Exception):
    pass


class _NotProcessed(ConnectionError):
    """GOAWAY named a last stream below ours: the collector never saw the call."""


class _Call:
    """What has come back for the one stream in flight."""

    __slots__ = ("data", "done", "failure", "http_status", "metadata")

    def __init__(self) -> None:
        self.http_status = 0
        self.metadata: dict[bytes, bytes] = {}  # response headers and trailers
        self.data = bytearray()
        self.done = False
        self.failure: Attempt | None = None  # reset or GOAWAY before the call completed


class GrpcTransport(BlockingTransport):
    def __init__(self, target: Target, user_agent: str) -> None:
        super().__init__()
        self._target = target
        self._user_agent = user_agent.encode()
        self._sock: socket.socket | None = None
        self._h2: h2.connection.H2Connection | None = None

    def _live_socket(self) -> socket.socket | None:
        return self._sock

    def _send(self, body: bytes, timeout_s: float) -> Attempt:
        return self._call_with_retry(body, time.monotonic() + timeout_s)

    def _call_with_retry(self, body: bytes, deadline: float) -> Attempt:
        # A kept connection the collector has since closed fails at once: try a fresh one.
        for fresh in (self._h2 is None, True):
            try:
                if self._h2 is None:
                    self._connect(deadline)
                return self._call(body, deadline)
            except _Timeout:
                self._drop()
                return Attempt(ok=False, retryable=True, detail="DEADLINE_EXCEEDED")
            except (OSError, h2.exceptions.ProtocolError) as exc:
                self._drop()
                if fresh or self._closed:
                    return Attempt(ok=False, retryable=True, detail=f"UNAVAILABLE: {exc!r}")
        raise AssertionError("unreachable")

    def _drop(self) -> None:
        with self._lock:
            sock, self._sock, self._h2 = self._sock, None, None
        if sock is not None:
            sock.close()

    # -- connection ------------------------------------------------------------------------

    def _connect(self, deadline: float) -> None:
        if self._closed:
            raise ConnectionAbortedError("the exporter is shutting down")
        target = self._target
        sock = socket.create_connection((target.host, target.port), _left(deadline))
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if target.tls is not None:
                sock.settimeout(_left(deadline))
                sock = target.tls.wrap_socket(sock, server_hostname=target.host)
            conn = h2.connection.H2Connection(
                h2.config.H2Configuration(client_side=True, header_encoding=None)
            )
            conn.initiate_connection()
            sock.settimeout(_left(deadline))
            sock.sendall(conn.data_to_send())
        except BaseException:
            sock.close()
            raise
        with self._lock:
            self._sock, self._h2 = sock, conn
        if self._closed:  # close() came while connecting: it found no socket to wake
            raise ConnectionAbortedError("the exporter is shutting down")

    def _flush(self, conn: h2.connection.H2Connection, deadline: float) -> None:
        data = conn.data_to_send()
        if data:
            sock = self._socket()
            sock.settimeout(_left(deadline))
            sock.sendall(data)

    def _socket(self) -> socket.socket:
        sock = self._sock
        if sock is None:
            raise ConnectionAbortedError("the exporter is shutting down")
        return sock

    # -- the call --------------------------------------------------------------------------

    def _call(self, body: bytes, deadline: float) -> Attempt:
        conn = self._h2
        assert conn is not None
        target = self._target
        stream_id = conn.get_next_available_stream_id()
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"https" if target.tls is not None else b"http"),
            (b":path", PATH),
            (b":authority", target.authority.encode()),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            # At most 8 digits, says the gRPC wire format.
            (b"grpc-timeout", f"{min(max(1, int(_left(deadline) * 1000)), 99_999_999)}m".encode()),
            (b"user-agent", self._user_agent),
        ]
        compressed = target.compression != "none"
        if compressed:
            headers.append((b"grpc-encoding", target.compression.encode()))
        headers += [(k.encode(), v.encode()) for k, v in target.headers]
        conn.send_headers(stream_id, headers)
        message = bytes([1 if compressed else 0]) + len(body).to_bytes(4, "big") + body
        call = _Call()
        sent = 0
        while sent < len(message) and not call.done:
            window = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)
            if window <= 0:
                self._flush(conn, deadline)
                self._receive(conn, stream_id, call, deadline)
                continue
            chunk = message[sent : sent + window]
            conn.send_data(stream_id, chunk)
            sent += len(chunk)
        if not call.done:
            conn.end_stream(stream_id)
        elif sent < len(message):
            # Answered before it had all the request (an error): stop sending it.
            with contextlib.suppress(h2.exceptions.ProtocolError):
                conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        self._flush(conn, deadline)
        while not call.done:
            self._receive(conn, stream_id, call, deadline)
        return _outcome(call)

    def _receive(
        self, conn: h2.connection.H2Connection, stream_id: int, call: _Call, deadline: float
    ) -> None:
        sock = self._socket()
        sock.settimeout(_left(deadline))
        try:
            data = sock.recv(READ_SIZE)
        except TimeoutError:
            raise _Timeout from None
        if not data:
            raise ConnectionResetError("the collector closed the connection")
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                if event.stream_id == stream_id:
                    for name, value in event.headers or ():
                        if name == b":status":
                            call.http_status = int(value)
                        else:
                            call.metadata[bytes(name)] = bytes(value)
            elif isinstance(event, h2.events.DataReceived):
                if event.stream_id == stream_id:
                    call.data += event.data or b""
                # Give the window back at once: responses are tiny and read whole.
                conn.acknowledge_received_data(
                    event.flow_controlled_length or 0, event.stream_id
                )
            elif isinstance(event, h2.events.StreamEnded):
                if event.stream_id == stream_id:
                    call.done = True
            elif isinstance(event, h2.events.StreamReset):
                if event.stream_id == stream_id:
                    code = RESET_TO_GRPC.get(event.error_code, INTERNAL)  # type: ignore[call-overload]
                    call.failure = _status_attempt(code, f"stream reset ({event.error_code!r})")
                    call.done = True
            elif isinstance(event, h2.events.ConnectionTerminated):
                self._flush_quietly(conn, deadline)
                self._drop()
                if call.done:
                    return
                if event.last_stream_id is not None and event.last_stream_id < stream_id:
                    # Typically an idle connection the collector closed between two batches.
                    raise _NotProcessed(f"GOAWAY ({event.error_code!r}) before the call")
                call.failure = Attempt(
                    ok=False, retryable=True,
                    detail=f"UNAVAILABLE: the collector went away ({event.error_code!r})",
                )
                call.done = True
                return
        self._flush(conn, deadline)  # window updates, PING and SETTINGS acknowledgements

    def _flush_quietly(self, conn: h2.connection.H2Connection, deadline: float) -> None:
        with contextlib.suppress(OSError):
            self._flush(conn, deadline)


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _Timeout
    return left


def _status_attempt(code: int, message: str, retry_after_s: float | None = None) -> Attempt:
    return Attempt(
        ok=False,
        retryable=code in RETRYABLE,
        detail=f"gRPC status {code}" + (f": {message}" if message else ""),
        retry_after_s=retry_after_s,
    )


def _outcome(call: _Call) -> Attempt:
    if call.failure is not None:
        return call.failure
    if call.http_status != 200:
        code = HTTP_TO_GRPC.get(call.http_status, UNKNOWN)
        return _status_attempt(code, f"HTTP status {call.http_status}")
    raw_status = call.metadata.get(b"grpc-status")
    message = _percent_decoded(call.metadata.get(b"grpc-message", b""))
    if raw_status is None:
        return _status_attempt(UNKNOWN, "the response carried no grpc-status")
    try:
        code = int(raw_status)
    except ValueError:
        return _status_attempt(UNKNOWN, f"grpc-status {raw_status!r}")
    if code != OK:
        return _status_attempt(code, message, _retry_delay(call.metadata))
    try:
        rejected, detail = rejected_spans(_response_message(call))
    except ValueError as exc:
        # The spans were accepted; an answer we cannot read does not undo that.
        return Attempt(ok=True, detail=f"unreadable response: {exc}")
    return Attempt(ok=True, detail=detail, rejected_spans=rejected)


def _response_message(call: _Call) -> bytes:
    data = bytes(call.data)
    if len(data) < 5:
        return b""
    flag, size = data[0], int.from_bytes(data[1:5], "big")
    payload = data[5 : 5 + size]
    if flag:
        encoding = call.metadata.get(b"grpc-encoding", b"identity")
        wbits = 31 if encoding == b"gzip" else 15
        try:
            payload = zlib.decompress(payload, wbits)
        except zlib.error as exc:
            raise ValueError(f"cannot decompress the response ({encoding!r}): {exc}") from None
    return payload


def _percent_decoded(raw: bytes) -> str:
    return unquote_to_bytes(raw).decode("utf-8", "replace")


def _retry_delay(metadata: dict[bytes, bytes]) -> float | None:
    """``google.rpc.RetryInfo.retry_delay`` from the ``grpc-status-details`` the SDK reads too:
    the ``google.rpc.retryinfo-bin`` trailer (base64 of a RetryInfo message)."""
    raw = metadata.get(b"google.rpc.retryinfo-bin")
    if raw is None:
        return None
    try:
        padded = raw + b"=" * (-len(raw) % 4)
        return duration_field(base64.b64decode(padded), 1)
    except ValueError:
        return None
