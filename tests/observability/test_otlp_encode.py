"""Our OTLP protobuf writer against the official generated classes and the SDK's encoder."""

from __future__ import annotations

import struct

import pytest
from google.protobuf.duration_pb2 import Duration
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.span import TraceFlags, TraceState

from sidecar.observability.otlp_encode import duration_field, encode_request, rejected_spans

TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
RESOURCE = Resource({"service.name": "quotes", "k8s.pod.uid": "abc"}, schema_url="https://s/1")
OTHER_RESOURCE = Resource({"service.name": "other"})
SCOPE = InstrumentationScope("pilotfish.sidecar", "0.1", "https://s/scope")


def span(
    span_id: int,
    *,
    parent: SpanContext | None = None,
    kind: SpanKind = SpanKind.SERVER,
    resource: Resource = RESOURCE,
    scope: InstrumentationScope | None = SCOPE,
    **extra: object,
) -> ReadableSpan:
    settings: dict[str, object] = {
        "name": "GET",
        "context": SpanContext(
            TRACE, span_id, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED),
            trace_state=TraceState([("vendor", "abc"), ("other", "x")]),
        ),
        "parent": parent,
        "resource": resource,
        "kind": kind,
        "start_time": 1_700_000_000_123_456_789,
        "end_time": 1_700_000_000_223_456_789,
        "instrumentation_scope": scope,
        "status": Status(StatusCode.UNSET),
    }
    settings.update(extra)
    return ReadableSpan(**settings)  # type: ignore[arg-type]


def decode(data: bytes) -> ExportTraceServiceRequest:
    message = ExportTraceServiceRequest()
    message.ParseFromString(data)
    return message


def test_a_rich_batch_decodes_to_what_the_sdk_encoder_builds() -> None:
    remote_parent = SpanContext(TRACE, 0x00F067AA0BA902B7, is_remote=True)
    spans = [
        span(
            1,
            parent=remote_parent,
            attributes={
                "http.request.method": "GET",
                "server.port": 8080,
                "negative": -5,
                "big": 2**62,
                "ratio": 0.25,
                "flag": True,
                "off": False,
                "empty": "",
                "zero": 0,
                "names": ("a", "b"),
                "numbers": [1, 2, 3],
                "unicode": "naïve ✓",
            },
            status=Status(StatusCode.ERROR, "upstream reset"),
        ),
        span(
            2,
            parent=SpanContext(TRACE, 1, is_remote=False),
            kind=SpanKind.CLIENT,
            events=(Event("retry", {"attempt": 2}, timestamp=1_700_000_000_150_000_000),),
            links=(Link(SpanContext(TRACE + 1, 7, is_remote=True), {"why": "fan-in"}),),
            status=Status(StatusCode.OK),
        ),
        span(3, kind=SpanKind.INTERNAL, scope=None),
        span(4, kind=SpanKind.PRODUCER, resource=OTHER_RESOURCE),
        span(5, kind=SpanKind.CONSUMER, name="", attributes={}),
    ]
    ours = decode(encode_request(spans))
    sdk = encode_spans(spans)
    # The SDK leaves the W3C trace flags out of Span.flags; the OTLP spec puts them in the low
    # 8 bits, and so do we. Everything else must be identical.
    for resource_spans in ours.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                assert s.flags & 0xFF == TraceFlags.SAMPLED
                s.flags &= ~0xFF
                for link in s.links:
                    link.flags &= ~0xFF
    assert ours == sdk


def test_flags_carry_trace_flags_and_whether_the_parent_was_remote() -> None:
    remote = SpanContext(TRACE, 9, is_remote=True)
    request = decode(encode_request([span(1, parent=remote), span(2)]))
    first, second = request.resource_spans[0].scope_spans[0].spans
    assert first.flags == 0x301  # sampled, has-is-remote, is-remote
    assert second.flags == 0x101
    assert first.parent_span_id == (9).to_bytes(8, "big")
    assert second.parent_span_id == b""


def test_spans_are_grouped_by_resource_then_scope() -> None:
    other_scope = InstrumentationScope("other")
    request = decode(
        encode_request(
            [span(1), span(2, resource=OTHER_RESOURCE), span(3, scope=other_scope), span(4)]
        )
    )
    assert [len(rs.scope_spans) for rs in request.resource_spans] == [2, 1]
    first = request.resource_spans[0]
    assert first.schema_url == "https://s/1"
    assert [s.span_id[-1] for s in first.scope_spans[0].spans] == [1, 4]
    assert first.scope_spans[0].scope.name == "pilotfish.sidecar"
    assert first.scope_spans[0].scope.version == "0.1"
    assert first.scope_spans[0].schema_url == "https://s/scope"
    assert first.scope_spans[1].scope.name == "other"


def test_an_empty_batch_is_an_empty_request() -> None:
    assert encode_request([]) == b""


def test_partial_success_is_read_from_the_response() -> None:
    response = ExportTraceServiceResponse(
        partial_success=ExportTracePartialSuccess(rejected_spans=3, error_message="too old")
    )
    assert rejected_spans(response.SerializeToString()) == (3, "too old")
    assert rejected_spans(ExportTraceServiceResponse().SerializeToString()) == (0, "")
    with pytest.raises(ValueError):
        rejected_spans(b"\x0a\x05\x08")  # a length that runs past the end


def test_a_duration_field_in_seconds() -> None:
    duration = Duration(seconds=2, nanos=500_000_000).SerializeToString()
    message = b"\x0a" + bytes([len(duration)]) + duration  # field 1 of some message
    assert duration_field(message, 1) == 2.5
    assert duration_field(b"", 1) is None
    # Fields of other wire types are skipped on the way.
    skipped = b"\x11" + struct.pack("<d", 1.0) + b"\x1d" + struct.pack("<I", 7) + message
    assert duration_field(skipped, 1) == 2.5
