"""A real OTLP/gRPC trace receiver for tests: the collector's TraceService on 127.0.0.1:0."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass
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
    field = v.WhichOneof("value")
    return getattr(v, field) if field is not None else None


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self.receiver = receiver

    def Export(
        self, request: Any, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
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
        self.receiver.add(spans)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """Start with ``start()``; ``endpoint`` is then ``http://127.0.0.1:<port>``."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self._cond = threading.Condition()
        self._server: grpc.Server | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OtlpReceiver:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        service = _TraceService(self)
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            service, server
        )
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
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
