"""OTLP/gRPC without grpcio: ``TraceService/Export`` as one HTTP/2 stream, written with the
sidecar's own codec on a blocking socket in the span processor's thread.

The SDK calls ``export`` from that thread, one batch at a time, so a blocking socket is all the
concurrency there is: no event loop, no thread of our own. One connection is kept across
batches (checked for a GOAWAY or a close that arrived while it was idle before each use) and
replaced when it breaks. The request is encoded by OpenTelemetry's own encoder, so the payload
is what the SDK's gRPC exporter sends; framing, the judgement of the answer and the retry
schedule are ``grpc_call``'s. ``shutdown``, from any thread, wakes a call blocked on the socket
and ends any backoff at once.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.common.version import __version__ as otlp_version
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from sidecar.codec import (
    CodecProtocolError,
    ConnectionTerminated,
    DataReceived,
    H2Codec,
    RemoteSettingsChanged,
)
from sidecar.codec.errors import CANCEL
from sidecar.codec.events import Event
from sidecar.flags import GrpcStatus
from sidecar.observability.grpc_call import (
    CallStatus,
    UnaryCall,
    framed,
    request_headers,
    retrying,
)

log = logging.getLogger("pilotfish.tracing")

EXPORT_PATH = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
# The OTLP exporter specification's form, naming the encoder that wrote the payload.
USER_AGENT = f"OTel-OTLP-Exporter-Python/{otlp_version} pilotfish".encode()


# Time for acknowledgements (SETTINGS, PING) owed on an idle connection to leave.
IDLE_FLUSH_S = 1.0


class _Stopped(Exception):
    """``shutdown`` came: the export ends now."""


class _DeadlineExceeded(Exception):
    pass


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _DeadlineExceeded
    return left


class _Connection:
    """One HTTP/2 connection to the collector, used by one thread at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.codec = H2Codec(client_side=True)
        self.codec.initiate_connection()
        self.calls = 0
        self.usable = True  # no GOAWAY, no error: a next call may use it
        self.spoke_h2 = False  # the collector's SETTINGS came

    @classmethod
    def open(
        cls, host: str, port: int, tls: ssl.SSLContext | None, deadline: float
    ) -> _Connection:
        sock = socket.create_connection((host, port), _left(deadline))
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                sock.settimeout(_left(deadline))
                sock = tls.wrap_socket(sock, server_hostname=host)
                protocol = sock.selected_alpn_protocol()
                if protocol not in (None, "h2"):  # None: a peer without ALPN; try h2 anyway
                    raise ConnectionError(f"the collector chose {protocol!r}, not h2, over ALPN")
            conn = cls(sock)
            conn.flush(deadline)
        except BaseException:
            sock.close()
            raise
        return conn

    def flush(self, deadline: float) -> None:
        data = self.codec.data_to_send()
        if data:
            self.sock.settimeout(_left(deadline))
            self.sock.sendall(data)

    def read(self, deadline: float) -> list[Event]:
        """The events of one read; raises ``ConnectionError`` when the collector closed."""
        self.sock.settimeout(_left(deadline))
        size = self.sock.recv_into(self.codec.get_buffer())
        if not size:
            raise ConnectionResetError("the collector closed the connection")
        return self._received(size)

    def _received(self, size: int) -> list[Event]:
        codec = self.codec
        events = codec.buffer_updated(size)
        while codec.backlogged:
            codec.get_buffer()
            events += codec.buffer_updated(0)
        for event in events:
            if isinstance(event, DataReceived):
                codec.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, ConnectionTerminated):
                self.usable = False
            elif isinstance(event, RemoteSettingsChanged):
                self.spoke_h2 = True
        return events

    def still_open(self) -> bool:
        """Whether the collector kept this idle connection: reads what arrived since the
        last call without waiting (a GOAWAY, a close, or frames to answer)."""
        if not self.usable:
            return False
        try:
            while self.usable:
                self.sock.settimeout(0)  # ``flush`` below sets a timeout of its own
                size = self.sock.recv_into(self.codec.get_buffer())
                if not size:
                    return False
                self._received(size)  # a GOAWAY makes it unusable
                self.flush(time.monotonic() + IDLE_FLUSH_S)
        except (BlockingIOError, ssl.SSLWantReadError):
            return True
        except (OSError, CodecProtocolError, _DeadlineExceeded):
            return False
        finally:
            self.sock.settimeout(None)
        return False

    def call(
        self, headers: list[tuple[bytes, bytes]], message: bytes, deadline: float
    ) -> CallStatus:
        """One unary call; failures of the connection become its status (UNAVAILABLE, or
        DEADLINE_EXCEEDED), and leave the connection unusable."""
        codec = self.codec
        self.calls += 1
        call = UnaryCall(codec.get_next_available_stream_id())
        sid = call.stream_id
        try:
            codec.send_headers(sid, headers)
            view = memoryview(message)
            sent = 0
            while not call.done:
                if sent < len(message):
                    window = codec.local_flow_control_window(sid)
                    if window > 0:
                        chunk = view[sent : sent + window]
                        sent += len(chunk)
                        codec.send_data(sid, chunk, end_stream=sent == len(message))
                        self.flush(deadline)
                        continue
                self.flush(deadline)
                call.on_events(self.read(deadline))
            if codec.streams.get(sid) is not None:
                # Answered before the request was whole (an error): stop sending it.
                codec.reset_stream(sid, CANCEL)
                self.flush(deadline)
            assert call.status is not None
            return call.status
        except (_DeadlineExceeded, TimeoutError):
            self.usable = False
            return CallStatus(GrpcStatus.DEADLINE_EXCEEDED, "the export timeout passed")
        except CodecProtocolError as exc:
            self.usable = False
            if not self.spoke_h2:  # typically the OTLP/HTTP port given for OTLP/gRPC
                return CallStatus(
                    GrpcStatus.UNAVAILABLE,
                    f"the collector does not speak HTTP/2 on this port ({exc})",
                )
            return CallStatus(GrpcStatus.INTERNAL, f"HTTP/2 protocol error: {exc}")
        except OSError as exc:
            self.usable = False
            return call.connection_lost(f"connection lost: {exc}")

    def wake(self) -> None:
        """From another thread: a blocked read or write returns at once (with an error). The
        socket is closed by its own thread: closing it under a reader is not safe."""
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)

    def close(self) -> None:
        self.sock.close()


class GrpcSpanExporter(SpanExporter):
    """OTLP/gRPC span export over one kept HTTP/2 connection (see the module docstring)."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        authority: str,
        tls: ssl.SSLContext | None,
        metadata: tuple[tuple[bytes, bytes], ...],
        compression: str,
        timeout_s: float,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._host = host
        self._port = port
        self._authority = authority
        self._tls = tls
        self._metadata = metadata
        self._compression = compression
        self._timeout_s = timeout_s
        self._jitter = jitter
        self._stop = threading.Event()
        self._lock = threading.Lock()  # guards the two below against ``shutdown``
        self._conn: _Connection | None = None
        self._busy = False
        self.connections = 0  # opened so far (read by tests)

    @property
    def target(self) -> str:
        return f"{'https' if self._tls is not None else 'http'}://{self._authority}"

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._lock:
            if self._stop.is_set():
                return SpanExportResult.FAILURE
            self._busy = True
        try:
            status = self._export(spans)
        finally:
            with self._lock:
                self._busy = False
            if self._stop.is_set():
                self._drop()
        if status.ok:
            return SpanExportResult.SUCCESS
        log.warning("tracing: %d spans not exported to %s: %s", len(spans), self.target, status)
        return SpanExportResult.FAILURE

    def _export(self, spans: Sequence[ReadableSpan]) -> CallStatus:
        message = framed(encode_spans(spans).SerializeToString(), self._compression)
        deadline = time.monotonic() + self._timeout_s
        tries = retrying(
            deadline, clock=time.monotonic, sleep=self._pause, random=self._jitter,
            before_sleep=self._announce_retry,
        )  # fmt: skip
        try:
            status: CallStatus = tries(self._try, message, deadline)
        except _Stopped:
            return CallStatus(GrpcStatus.CANCELLED, "the exporter is shutting down")
        return status

    def _try(self, message: bytes, deadline: float) -> CallStatus:
        while True:
            if self._stop.is_set():
                raise _Stopped
            try:
                conn = self._connection(deadline)
            except _DeadlineExceeded:
                return CallStatus(GrpcStatus.DEADLINE_EXCEEDED, "the export timeout passed")
            except OSError as exc:  # ssl.SSLError included
                return CallStatus(
                    GrpcStatus.UNAVAILABLE, f"cannot connect to {self._authority}: {exc}"
                )
            reused = conn.calls > 0
            headers = request_headers(
                authority=self._authority, secure=self._tls is not None, path=EXPORT_PATH,
                timeout_s=deadline - time.monotonic(), compression=self._compression,
                extra=self._metadata, user_agent=USER_AGENT,
            )  # fmt: skip
            status = conn.call(headers, message, deadline)
            if self._stop.is_set():
                raise _Stopped
            lost = not conn.usable and status.code == GrpcStatus.UNAVAILABLE
            if not conn.usable or status.unprocessed:
                self._drop()
            # A kept connection the collector closed (or that refused the stream) while idle
            # fails before the call reaches the collector: a new connection takes the call at
            # once, not after a backoff. A new connection failing so is a failed try.
            if reused and (status.unprocessed or lost):
                continue
            return status

    def _connection(self, deadline: float) -> _Connection:
        conn = self._conn
        if conn is not None and conn.still_open():
            return conn
        self._drop()
        conn = _Connection.open(self._host, self._port, self._tls, deadline)
        self.connections += 1
        with self._lock:
            if self._stop.is_set():  # shutdown found no connection to wake: close it here
                conn.close()
                raise _Stopped
            self._conn = conn
        return conn

    def _drop(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _pause(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise _Stopped

    def _announce_retry(self, status: CallStatus, delay: float) -> None:
        log.info(
            "tracing: export to %s failed (%s), trying again in %.2fs", self.target, status, delay
        )

    def shutdown(self) -> None:
        """For good: an export in flight ends now (its spans are counted as lost)."""
        with self._lock:
            self._stop.set()
            busy, conn = self._busy, self._conn
        if busy:
            if conn is not None:
                conn.wake()
        else:
            self._drop()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # nothing is held here between exports
