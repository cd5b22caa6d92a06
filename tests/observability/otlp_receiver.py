"""Real OTLP trace receivers for tests, on 127.0.0.1:0: the collector's gRPC TraceService
(``OtlpReceiver``) and its OTLP/HTTP endpoint (``OtlpHttpReceiver``)."""

from __future__ import annotations

import contextlib
import ssl
import threading
import time
import zlib
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


@dataclass(frozen=True)
class ReceivedSpan:
    """A span as the collector saw it, ids as ints, attributes as plain values."""

    name: str
    kind: int  # opentelemetry.proto.trace.v1.Span.SpanKind
    trace_id: int
    span_id: int
    parent_span_id: int
    attributes: dict[str, Any]
    status_code: int  # 0 unset, 1 ok, 2 error
    resource: dict[str, Any]
    trace_state: str


def _value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    return getattr(v, which) if which is not None else None


@dataclass(frozen=True)
class Refusal:
    """What the receiver answers one call with instead of accepting it."""

    grpc_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    http_status: int = 503
    retry_after: str | None = None  # HTTP Retry-After
    trailing_metadata: Sequence[tuple[str, str | bytes]] = field(default_factory=tuple)


def spans_of(request: Any) -> list[ReceivedSpan]:
    """The spans of an ``ExportTraceServiceRequest``, as the collector sees them."""
    spans: list[ReceivedSpan] = []
    for resource_spans in request.resource_spans:
        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        name=s.name,
                        kind=s.kind,
                        trace_id=int.from_bytes(s.trace_id, "big"),
                        span_id=int.from_bytes(s.span_id, "big"),
                        parent_span_id=int.from_bytes(s.parent_span_id, "big")
                        if s.parent_span_id
                        else 0,
                        attributes={a.key: _value(a.value) for a in s.attributes},
                        status_code=s.status.code,
                        resource=resource,
                        trace_state=s.trace_state,
                    )
                )
    return spans


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self.receiver = receiver

    def Export(
        self, request: Any, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        refusal = self.receiver.call_arrived(dict(context.invocation_metadata()), context.peer())
        self.receiver.hold()
        if refusal is not None:
            context.set_trailing_metadata(tuple(refusal.trailing_metadata))
            context.abort(refusal.grpc_code, "refused by the test")
        self.receiver.add(spans_of(request))
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """Start with ``start()``; ``endpoint`` is then ``http://127.0.0.1:<port>``."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self.calls = 0  # every call, refused ones too
        self.metadata: list[dict[str, Any]] = []  # each call's request headers
        self.peers: list[str] = []  # each call's client address ("ipv4:127.0.0.1:port")
        self.refusals: list[Refusal] = []  # answers to the next calls, in order
        self.delay_s = 0.0  # how long each call waits before it is answered
        self._released = threading.Event()  # set by stop(): no call waits any longer
        self._cond = threading.Condition()
        self._server: grpc.Server | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(
        self,
        credentials: grpc.ServerCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
        port: int = 0,
    ) -> OtlpReceiver:
        """``port``: 0 for any free one."""
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=options)
        service = _TraceService(self)
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            service, server
        )
        if credentials is None:
            self.port = server.add_insecure_port(f"127.0.0.1:{port}")
        else:
            self.port = server.add_secure_port(f"127.0.0.1:{port}", credentials)
        server.start()
        self._server = server
        return self

    def call_arrived(self, metadata: dict[str, Any], peer: str = "") -> Refusal | None:
        with self._cond:
            self.calls += 1
            self.metadata.append(metadata)
            self.peers.append(peer)
            return self.refusals.pop(0) if self.refusals else None

    def hold(self) -> None:
        """Wait ``delay_s`` before answering (cut short by ``stop``)."""
        if self.delay_s:
            self._released.wait(self.delay_s)

    def stop(self) -> None:
        self._released.set()
        if self._server is not None:
            self._server.stop(grace=None)
            self._server = None

    def add(self, spans: list[ReceivedSpan]) -> None:
        with self._cond:
            self.spans.extend(spans)
            self.requests += 1
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float = 5.0) -> list[ReceivedSpan]:
        """At least ``count`` spans, or an AssertionError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.spans) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"got {len(self.spans)} spans, wanted {count}")
                self._cond.wait(left)
            return list(self.spans)


class OtlpHttpReceiver(OtlpReceiver):
    """OTLP/HTTP with protobuf bodies: ``POST`` requests to any path, decoded as an
    ``ExportTraceServiceRequest`` (after ``Content-Encoding`` gzip or deflate). ``paths``
    records where each request went; ``response`` is the body of a 200."""

    def __init__(self) -> None:
        super().__init__()
        self.paths: list[str] = []
        self.response = trace_service_pb2.ExportTraceServiceResponse()
        self._http: ThreadingHTTPServer | None = None

    def start(
        self,
        credentials: grpc.ServerCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
        port: int = 0,
        *,
        tls: ssl.SSLContext | None = None,
    ) -> OtlpHttpReceiver:
        """``tls``: serve HTTPS with this context (``credentials`` and ``options`` are for
        the gRPC receiver and ignored here)."""
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as collectors do

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                encoding = self.headers.get("Content-Encoding", "")
                if encoding in ("gzip", "deflate"):
                    body = zlib.decompress(body, 31 if encoding == "gzip" else 15)
                with receiver._cond:
                    receiver.paths.append(self.path)
                refusal = receiver.call_arrived({k.lower(): v for k, v in self.headers.items()})
                receiver.hold()
                if refusal is not None:
                    self.send_response(refusal.http_status)
                    if refusal.retry_after is not None:
                        self.send_header("Retry-After", refusal.retry_after)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                request = trace_service_pb2.ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver.add(spans_of(request))
                payload = receiver.response.SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def handle(self) -> None:
                # The exporter may give up waiting for a held answer, and go.
                with contextlib.suppress(ConnectionError):
                    super().handle()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._http.daemon_threads = True
        if tls is not None:
            self._http.socket = tls.wrap_socket(self._http.socket, server_side=True)
        self.port = self._http.server_address[1]
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._released.set()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
