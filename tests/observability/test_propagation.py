"""W3C and B3 on the proxy's byte headers, checked against OpenTelemetry's own propagators."""

from __future__ import annotations

import os
import re

import pytest
from opentelemetry import trace
from opentelemetry.propagators.b3 import B3MultiFormat, B3SingleFormat
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace.span import TraceState

from sidecar.observability.propagation import (
    ALL_FORMATS,
    B3_MULTI,
    B3_SINGLE,
    TRACECONTEXT,
    Headers,
    RemoteParent,
    append_context,
    extract,
    new_request_id,
    parse_b3_single,
    parse_formats,
    parse_traceparent,
    without_context,
)

TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN = 0x00F067AA0BA902B7
TP = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

OFFICIAL = {
    TRACECONTEXT: TraceContextTextMapPropagator(),
    B3_SINGLE: B3SingleFormat(),
    B3_MULTI: B3MultiFormat(),
}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (TP, RemoteParent(TRACE, SPAN, True)),
        (b"  " + TP[:-2] + b"00 ", RemoteParent(TRACE, SPAN, False)),
        (b"01-" + TP[3:] + b"-future-fields", RemoteParent(TRACE, SPAN, True)),
        (TP[:-2] + b"03", RemoteParent(TRACE, SPAN, True)),  # other flag bits ignored
        (TP + b"-extra", None),  # version 00 has exactly four fields
        (b"ff-" + TP[3:], None),
        (TP.upper(), None),
        (b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01", None),
        (b"00-4bf92f3577b34da6a3ce929d0e0e4736-" + b"0" * 16 + b"-01", None),
        (TP[:-1], None),
        (b"", None),
    ],
)
def test_traceparent_parsing(value: bytes, expected: RemoteParent | None) -> None:
    assert parse_traceparent(value) == expected


@pytest.mark.parametrize(
    ("value", "parent", "hint"),
    [
        (b"4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1", (TRACE, SPAN, True), None),
        (
            b"a3ce929d0e0e4736-00f067aa0ba902b7-0-0000000000000001",
            (0xA3CE929D0E0E4736, SPAN, False),
            None,
        ),
        (b"a3ce929d0e0e4736-00f067aa0ba902b7", (0xA3CE929D0E0E4736, SPAN, True), None),
        (b"A3CE929D0E0E4736-00F067AA0BA902B7-d", (0xA3CE929D0E0E4736, SPAN, True), None),
        (b"0", None, False),
        (b"d", None, True),
        (b"a3ce929d0e0e4736-00f067aa0ba902b7-2", None, None),
        (b"xyz", None, None),
    ],
)
def test_b3_single_parsing(
    value: bytes, parent: tuple[int, int, bool] | None, hint: bool | None
) -> None:
    got, got_hint = parse_b3_single(value)
    assert (None if got is None else (got.trace_id, got.span_id, got.sampled)) == parent
    assert got_hint == hint


def test_b3_multi_and_precedence() -> None:
    multi: Headers = [
        (b"x-b3-traceid", b"a3ce929d0e0e4736"),
        (b"x-b3-spanid", b"00f067aa0ba902b7"),
        (b"x-b3-sampled", b"0"),
    ]
    got = extract(multi)
    assert got.parent == RemoteParent(0xA3CE929D0E0E4736, SPAN, False)
    assert extract([*multi, (b"x-b3-flags", b"1")]).parent == RemoteParent(
        0xA3CE929D0E0E4736, SPAN, True
    )
    assert extract([(b"x-b3-sampled", b"0")]) == (None, False, None)
    # W3C wins over B3 when both came; a disabled format is not read.
    both = [*multi, (b"traceparent", TP), (b"tracestate", b"a=1"), (b"tracestate", b"b=2")]
    assert extract(both) == (RemoteParent(TRACE, SPAN, True, b"a=1,b=2"), None, None)
    assert extract(both, B3_MULTI).parent == got.parent
    assert extract(both, 0).parent is None
    # A broken traceparent falls back to the next format.
    assert extract([(b"traceparent", b"junk"), *multi]).parent == got.parent
    assert extract([(b"x-request-id", b"r1")]) == (None, None, b"r1")


@pytest.mark.parametrize("fmt", [TRACECONTEXT, B3_SINGLE, B3_MULTI])
@pytest.mark.parametrize("sampled", [True, False])
def test_our_injection_is_read_by_opentelemetry(fmt: int, sampled: bool) -> None:
    old: Headers = [(b":path", b"/"), (b"x-b3-spanid", b"1111111111111111"), (b"b3", b"0")]
    headers = without_context(old)
    append_context(headers, fmt, TRACE, SPAN, sampled, tracestate=b"v=1", parent_span_id=7)
    names = [k for k, _ in headers]
    assert names[0] == b":path" and len(names) == len(set(names))  # stale ones gone
    carrier = {k.decode(): v.decode() for k, v in headers}
    ctx = trace.get_current_span(OFFICIAL[fmt].extract(carrier)).get_span_context()
    assert (ctx.trace_id, ctx.span_id, ctx.trace_flags.sampled) == (TRACE, SPAN, sampled)
    assert extract(headers, fmt).parent == RemoteParent(
        TRACE, SPAN, sampled, b"v=1" if fmt == TRACECONTEXT else b""
    )


@pytest.mark.parametrize("fmt", [TRACECONTEXT, B3_SINGLE, B3_MULTI])
@pytest.mark.parametrize("sampled", [True, False])
def test_opentelemetry_injection_is_read_by_us(fmt: int, sampled: bool) -> None:
    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
    state = TraceState([("vendor", "x")])
    sc = SpanContext(TRACE, SPAN, is_remote=False, trace_flags=flags, trace_state=state)
    carrier: dict[str, str] = {}
    OFFICIAL[fmt].inject(carrier, context=trace.set_span_in_context(NonRecordingSpan(sc)))
    headers = [(k.lower().encode(), v.encode()) for k, v in carrier.items()]
    got = extract(headers, ALL_FORMATS)
    assert got.parent is not None
    assert (got.parent.trace_id, got.parent.span_id, got.parent.sampled) == (TRACE, SPAN, sampled)
    if fmt == TRACECONTEXT:
        assert got.parent.tracestate == b"vendor=x"


def test_formats_and_request_ids() -> None:
    assert parse_formats("tracecontext, baggage ,B3") == TRACECONTEXT | B3_SINGLE
    assert parse_formats(("b3multi",)) == B3_MULTI
    assert parse_formats("none") == 0
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    pattern = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
    assert all(pattern.fullmatch(i) for i in ids)


def test_request_ids_stay_unique_in_a_forked_child() -> None:
    """Ids are a per-process random part and a count: a forked child must not repeat its
    parent's sequence."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, then out without running the parent's cleanup
        os.write(write, new_request_id())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 64)
    os.close(read)
    parent = new_request_id()
    assert len(child) == len(parent) == 36
    assert child[:23] != parent[:23]  # the random part differs, so the sequences do
