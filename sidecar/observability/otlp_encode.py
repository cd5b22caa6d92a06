"""OTLP trace export requests in protobuf wire format, written directly.

The sidecar sends one message type, ``ExportTraceServiceRequest``, built from a dozen small
messages (``opentelemetry/proto/trace/v1/trace.proto``, ``common/v1/common.proto``,
``resource/v1/resource.proto``). Writing them here keeps the protobuf runtime and the generated
OTLP modules (several MB resident) out of every sidecar. Field numbers are those of the .proto
files; ``tests/observability/test_otlp_encode.py`` decodes what this writes with the official
generated classes and compares it with the OpenTelemetry SDK's own encoder.

Proto3 rules followed: scalar fields equal to their default are left out, except inside a
``oneof`` (``AnyValue``), where the field's presence is the value's type.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

# Tags: (field number << 3) | wire type, as the bytes that go on the wire.
_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5
_INT64_MASK = (1 << 64) - 1
# SpanFlags: the low 8 bits are the W3C trace flags; these two say whether the parent is remote.
_FLAG_HAS_IS_REMOTE = 0x100
_FLAG_IS_REMOTE = 0x200


def _tag(field: int, wire: int) -> bytes:
    return _varint((field << 3) | wire)


def _varint(value: int) -> bytes:
    out = bytearray()
    _put_varint(out, value)
    return bytes(out)


def _put_varint(out: bytearray, value: int) -> None:
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _put_bytes(out: bytearray, tag: bytes, payload: bytes | bytearray) -> None:
    out += tag
    _put_varint(out, len(payload))
    out += payload


def _put_str(out: bytearray, tag: bytes, text: str | None) -> None:
    if text:
        # Protobuf strings must be UTF-8; a lone surrogate must not cost the whole batch.
        _put_bytes(out, tag, text.encode("utf-8", "replace"))


def _put_uint(out: bytearray, tag: bytes, value: int) -> None:
    if value:
        out += tag
        _put_varint(out, value)


# AnyValue (a oneof) and KeyValue
_ANY_STRING = _tag(1, _LEN)
_ANY_BOOL = _tag(2, _VARINT)
_ANY_INT = _tag(3, _VARINT)
_ANY_DOUBLE = _tag(4, _FIXED64)
_ANY_ARRAY = _tag(5, _LEN)
_ANY_KVLIST = _tag(6, _LEN)
_ANY_BYTES = _tag(7, _LEN)
_KV_KEY = _tag(1, _LEN)
_KV_VALUE = _tag(2, _LEN)
_LIST_VALUES = _tag(1, _LEN)  # ArrayValue.values and KeyValueList.values


def _any_value(value: object) -> bytearray:
    out = bytearray()
    # bool before int: True is an int too.
    if isinstance(value, bool):
        out += _ANY_BOOL
        out.append(1 if value else 0)
    elif isinstance(value, str):
        _put_bytes(out, _ANY_STRING, value.encode("utf-8", "replace"))
    elif isinstance(value, int):
        out += _ANY_INT
        _put_varint(out, value & _INT64_MASK)  # int64: negative numbers as two's complement
    elif isinstance(value, float):
        out += _ANY_DOUBLE
        out += struct.pack("<d", value)
    elif isinstance(value, bytes):
        _put_bytes(out, _ANY_BYTES, value)
    elif isinstance(value, Mapping):
        values = bytearray()
        for key, item in value.items():
            _put_bytes(values, _LIST_VALUES, _key_value(str(key), item))
        _put_bytes(out, _ANY_KVLIST, values)
    elif isinstance(value, Sequence):
        values = bytearray()
        for item in value:
            _put_bytes(values, _LIST_VALUES, _any_value(item))
        _put_bytes(out, _ANY_ARRAY, values)
    elif value is not None:
        # The SDK only lets primitives and sequences of them through; anything else is shown,
        # not dropped with the batch it is in.
        _put_bytes(out, _ANY_STRING, str(value).encode("utf-8", "replace"))
    return out


def _key_value(key: str, value: object) -> bytearray:
    out = bytearray()
    _put_str(out, _KV_KEY, key)
    _put_bytes(out, _KV_VALUE, _any_value(value))
    return out


def _put_attributes(out: bytearray, tag: bytes, attributes: Attributes) -> None:
    if attributes:
        for key, value in attributes.items():
            _put_bytes(out, tag, _key_value(key, value))


# Span and its parts
_SPAN_TRACE_ID = _tag(1, _LEN)
_SPAN_SPAN_ID = _tag(2, _LEN)
_SPAN_TRACE_STATE = _tag(3, _LEN)
_SPAN_PARENT_SPAN_ID = _tag(4, _LEN)
_SPAN_NAME = _tag(5, _LEN)
_SPAN_KIND = _tag(6, _VARINT)
_SPAN_START = _tag(7, _FIXED64)
_SPAN_END = _tag(8, _FIXED64)
_SPAN_ATTRIBUTES = _tag(9, _LEN)
_SPAN_DROPPED_ATTRIBUTES = _tag(10, _VARINT)
_SPAN_EVENTS = _tag(11, _LEN)
_SPAN_DROPPED_EVENTS = _tag(12, _VARINT)
_SPAN_LINKS = _tag(13, _LEN)
_SPAN_DROPPED_LINKS = _tag(14, _VARINT)
_SPAN_STATUS = _tag(15, _LEN)
_SPAN_FLAGS = _tag(16, _FIXED32)
_EVENT_TIME = _tag(1, _FIXED64)
_EVENT_NAME = _tag(2, _LEN)
_EVENT_ATTRIBUTES = _tag(3, _LEN)
_EVENT_DROPPED_ATTRIBUTES = _tag(4, _VARINT)
_LINK_TRACE_ID = _tag(1, _LEN)
_LINK_SPAN_ID = _tag(2, _LEN)
_LINK_TRACE_STATE = _tag(3, _LEN)
_LINK_ATTRIBUTES = _tag(4, _LEN)
_LINK_DROPPED_ATTRIBUTES = _tag(5, _VARINT)
_LINK_FLAGS = _tag(6, _FIXED32)
_STATUS_MESSAGE = _tag(2, _LEN)
_STATUS_CODE = _tag(3, _VARINT)


def _trace_state(state: TraceState | None) -> str:
    return ",".join(f"{key}={value}" for key, value in state.items()) if state else ""


def _flags(context: SpanContext, parent: SpanContext | None) -> bytes:
    flags = int(context.trace_flags) | _FLAG_HAS_IS_REMOTE
    if parent is not None and parent.is_remote:
        flags |= _FLAG_IS_REMOTE
    return struct.pack("<I", flags)


def _event(event: Event) -> bytearray:
    out = bytearray(_EVENT_TIME)
    out += struct.pack("<Q", event.timestamp)
    _put_str(out, _EVENT_NAME, event.name)
    _put_attributes(out, _EVENT_ATTRIBUTES, event.attributes)
    _put_uint(out, _EVENT_DROPPED_ATTRIBUTES, event.dropped_attributes)
    return out


def _link(link: Link) -> bytearray:
    context = link.context
    out = bytearray()
    _put_bytes(out, _LINK_TRACE_ID, context.trace_id.to_bytes(16, "big"))
    _put_bytes(out, _LINK_SPAN_ID, context.span_id.to_bytes(8, "big"))
    _put_str(out, _LINK_TRACE_STATE, _trace_state(context.trace_state))
    _put_attributes(out, _LINK_ATTRIBUTES, link.attributes)
    _put_uint(out, _LINK_DROPPED_ATTRIBUTES, link.dropped_attributes)
    out += _LINK_FLAGS
    # A link's flags describe the linked context itself, as the SDK's encoder does.
    out += _flags(context, context)
    return out


def encode_span(span: ReadableSpan) -> bytes:
    """One ``Span`` message."""
    context = span.get_span_context()
    assert context is not None  # an SDK span always has one
    out = bytearray()
    _put_bytes(out, _SPAN_TRACE_ID, context.trace_id.to_bytes(16, "big"))
    _put_bytes(out, _SPAN_SPAN_ID, context.span_id.to_bytes(8, "big"))
    _put_str(out, _SPAN_TRACE_STATE, _trace_state(context.trace_state))
    parent = span.parent
    if parent is not None and parent.span_id:
        _put_bytes(out, _SPAN_PARENT_SPAN_ID, parent.span_id.to_bytes(8, "big"))
    _put_str(out, _SPAN_NAME, span.name)
    # The API numbers kinds from INTERNAL = 0; OTLP keeps 0 for "unspecified".
    out += _SPAN_KIND
    _put_varint(out, span.kind.value + 1)
    out += _SPAN_START
    out += struct.pack("<Q", span.start_time or 0)
    out += _SPAN_END
    out += struct.pack("<Q", span.end_time or 0)
    _put_attributes(out, _SPAN_ATTRIBUTES, span.attributes)
    _put_uint(out, _SPAN_DROPPED_ATTRIBUTES, span.dropped_attributes)
    for event in span.events:
        _put_bytes(out, _SPAN_EVENTS, _event(event))
    _put_uint(out, _SPAN_DROPPED_EVENTS, span.dropped_events)
    for link in span.links:
        _put_bytes(out, _SPAN_LINKS, _link(link))
    _put_uint(out, _SPAN_DROPPED_LINKS, span.dropped_links)
    status = bytearray()
    _put_str(status, _STATUS_MESSAGE, span.status.description)
    _put_uint(status, _STATUS_CODE, span.status.status_code.value)
    _put_bytes(out, _SPAN_STATUS, status)
    out += _SPAN_FLAGS
    out += _flags(context, parent)
    return bytes(out)


# The envelope: ExportTraceServiceRequest > ResourceSpans > ScopeSpans > Span
_REQUEST_RESOURCE_SPANS = _tag(1, _LEN)
_RESOURCE_SPANS_RESOURCE = _tag(1, _LEN)
_RESOURCE_SPANS_SCOPE_SPANS = _tag(2, _LEN)
_RESOURCE_SPANS_SCHEMA_URL = _tag(3, _LEN)
_SCOPE_SPANS_SCOPE = _tag(1, _LEN)
_SCOPE_SPANS_SPANS = _tag(2, _LEN)
_SCOPE_SPANS_SCHEMA_URL = _tag(3, _LEN)
_RESOURCE_ATTRIBUTES = _tag(1, _LEN)
_SCOPE_NAME = _tag(1, _LEN)
_SCOPE_VERSION = _tag(2, _LEN)
_SCOPE_ATTRIBUTES = _tag(3, _LEN)


def _resource(resource: Resource) -> bytearray:
    out = bytearray()
    _put_attributes(out, _RESOURCE_ATTRIBUTES, resource.attributes)
    return out


def _scope(scope: InstrumentationScope | None) -> bytearray:
    out = bytearray()
    if scope is not None:
        _put_str(out, _SCOPE_NAME, scope.name)
        _put_str(out, _SCOPE_VERSION, scope.version)
        _put_attributes(out, _SCOPE_ATTRIBUTES, scope.attributes)
    return out


def encode_request(spans: Iterable[ReadableSpan]) -> bytes:
    """An ``ExportTraceServiceRequest`` carrying ``spans``, grouped by resource and scope."""
    groups: dict[int, tuple[Resource, dict[int, tuple[InstrumentationScope | None, list[bytes]]]]]
    groups = {}
    # Keyed by identity: a tracer provider hands every span the same resource and scope objects.
    for span in spans:
        resource = span.resource
        scopes = groups.setdefault(id(resource), (resource, {}))[1]
        scope = span.instrumentation_scope
        scopes.setdefault(id(scope), (scope, []))[1].append(encode_span(span))
    out = bytearray()
    for resource, scopes in groups.values():
        resource_spans = bytearray()
        _put_bytes(resource_spans, _RESOURCE_SPANS_RESOURCE, _resource(resource))
        for scope, encoded in scopes.values():
            scope_spans = bytearray()
            _put_bytes(scope_spans, _SCOPE_SPANS_SCOPE, _scope(scope))
            for span_bytes in encoded:
                _put_bytes(scope_spans, _SCOPE_SPANS_SPANS, span_bytes)
            _put_str(scope_spans, _SCOPE_SPANS_SCHEMA_URL, scope.schema_url if scope else None)
            _put_bytes(resource_spans, _RESOURCE_SPANS_SCOPE_SPANS, scope_spans)
        _put_str(resource_spans, _RESOURCE_SPANS_SCHEMA_URL, resource.schema_url)
        _put_bytes(out, _REQUEST_RESOURCE_SPANS, resource_spans)
    return bytes(out)


def rejected_spans(response: bytes) -> tuple[int, str]:
    """``partial_success`` of an ``ExportTraceServiceResponse``: spans the collector refused,
    and its message; ``(0, "")`` for a full success. Raises ``ValueError`` on malformed input."""
    partial = _field(response, 1)
    if partial is None:
        return 0, ""
    rejected = 0
    message = ""
    for number, value in _fields(partial):
        if number == 1 and isinstance(value, int):
            rejected = value - (1 << 64) if value >= 1 << 63 else value
        elif number == 2 and isinstance(value, bytes):
            message = value.decode("utf-8", "replace")
    return rejected, message


def duration_field(message: bytes, number: int) -> float | None:
    """Field ``number`` of ``message``, a ``google.protobuf.Duration``, in seconds."""
    duration = _field(message, number)
    if duration is None:
        return None
    seconds = nanos = 0
    for n, value in _fields(duration):
        if n == 1 and isinstance(value, int):
            seconds = value
        elif n == 2 and isinstance(value, int):
            nanos = value
    return max(0.0, seconds + nanos / 1e9)


def _field(message: bytes, number: int) -> bytes | None:
    found: bytes | None = None
    for n, value in _fields(message):
        if n == number and isinstance(value, bytes):
            found = value  # the last occurrence wins, as protobuf merges it
    return found


def _fields(message: bytes) -> Iterable[tuple[int, int | bytes]]:
    """(field number, value) pairs: ints for varint and fixed fields, bytes for the rest."""
    pos, end = 0, len(message)
    while pos < end:
        key, pos = _read_varint(message, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _read_varint(message, pos)
            yield number, value
        elif wire == _FIXED64:
            yield number, int.from_bytes(message[pos : pos + 8], "little")
            pos += 8
        elif wire == _FIXED32:
            yield number, int.from_bytes(message[pos : pos + 4], "little")
            pos += 4
        elif wire == _LEN:
            size, pos = _read_varint(message, pos)
            if pos + size > end:
                raise ValueError("truncated protobuf field")
            yield number, message[pos : pos + size]
            pos += size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    if pos != end:
        raise ValueError("truncated protobuf message")


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("malformed protobuf varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
