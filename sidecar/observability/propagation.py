"""Trace context on the wire: W3C ``traceparent``/``tracestate`` and B3 (single and multi).

Works on the proxy's own header lists (``list[tuple[bytes, bytes]]``, lower-case names) so a
request pays one pass over its headers, with no text-map carrier, context object or string
decoding. Extraction accepts every enabled format (W3C first, then ``b3``, then ``x-b3-*``);
injection strips every trace header the request came with and writes the enabled formats
afresh, so an upstream never sees a stale parent id in one format and a new one in another.

B3's debug flag (``d`` / ``x-b3-flags: 1``) is read as "sampled" and not passed on.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

Headers = list[tuple[bytes, bytes]]

TRACEPARENT = b"traceparent"
TRACESTATE = b"tracestate"
B3 = b"b3"
B3_TRACE_ID = b"x-b3-traceid"
B3_SPAN_ID = b"x-b3-spanid"
B3_PARENT_SPAN_ID = b"x-b3-parentspanid"
B3_SAMPLED = b"x-b3-sampled"
B3_FLAGS = b"x-b3-flags"
REQUEST_ID = b"x-request-id"

TRACE_HEADERS = frozenset(
    {TRACEPARENT, TRACESTATE, B3, B3_TRACE_ID, B3_SPAN_ID, B3_PARENT_SPAN_ID, B3_SAMPLED, B3_FLAGS}
)
_WATCHED = TRACE_HEADERS | {REQUEST_ID}

_TRACEPARENT_RE = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_B3_SINGLE_RE = re.compile(
    rb"([0-9a-f]{16}|[0-9a-f]{32})-([0-9a-f]{16})(?:-([01d]))?(?:-([0-9a-f]{16}))?"
)
_B3_ID_RE = re.compile(rb"[0-9a-f]{16}|[0-9a-f]{32}")
_B3_SPAN_RE = re.compile(rb"[0-9a-f]{16}")


# Wire formats, as bit flags (plain ints: an enum.Flag test costs a microsecond per request).
Format = int
NONE: Format = 0
TRACECONTEXT: Format = 1
B3_SINGLE: Format = 2  # the ``b3`` header
B3_MULTI: Format = 4  # ``x-b3-*``
ALL_FORMATS: Format = TRACECONTEXT | B3_SINGLE | B3_MULTI
_FORMAT_NAMES = {"tracecontext": TRACECONTEXT, "b3": B3_SINGLE, "b3multi": B3_MULTI}


def parse_formats(names: str | tuple[str, ...]) -> Format:
    """``"tracecontext,b3multi"`` (``OTEL_PROPAGATORS`` names) → flags; others are skipped."""
    items = names.split(",") if isinstance(names, str) else names
    out = NONE
    for raw in items:
        out |= _FORMAT_NAMES.get(raw.strip().lower(), NONE)
    return out


class RemoteParent(NamedTuple):
    """The caller's span, as it came in on the wire."""

    trace_id: int
    span_id: int
    sampled: bool
    tracestate: bytes = b""  # passed on verbatim, and only with a W3C parent


class Extracted(NamedTuple):
    parent: RemoteParent | None
    # A sampling decision sent without ids (``b3: 0``, a lone ``x-b3-sampled``).
    sampled_hint: bool | None
    request_id: bytes | None


def extract(headers: Headers, formats: Format = ALL_FORMATS) -> Extracted:
    """One pass over ``headers``; the first valid format in W3C, b3, x-b3-* order wins."""
    found: dict[bytes, bytes] = {}
    for name, value in headers:
        if name in _WATCHED:
            if name == TRACESTATE and name in found:
                found[name] += b"," + value  # several tracestate lines make one list
            elif name not in found:
                found[name] = value
    request_id = found.get(REQUEST_ID)
    if len(found) == (request_id is not None):
        return Extracted(None, None, request_id)
    hint: bool | None = None
    if formats & TRACECONTEXT and TRACEPARENT in found:
        parent = parse_traceparent(found[TRACEPARENT], found.get(TRACESTATE, b""))
        if parent is not None:
            return Extracted(parent, None, request_id)
    if formats & B3_SINGLE and B3 in found:
        parent, hint = parse_b3_single(found[B3])
        if parent is not None:
            return Extracted(parent, None, request_id)
    if formats & B3_MULTI:
        parent, multi_hint = _parse_b3_multi(found)
        if parent is not None:
            return Extracted(parent, None, request_id)
        if hint is None:
            hint = multi_hint
    return Extracted(None, hint, request_id)


def request_id(headers: Headers) -> bytes | None:
    """The caller's ``x-request-id``, if it sent one."""
    for name, value in headers:
        if name == REQUEST_ID:
            return value
    return None


def parse_traceparent(value: bytes, tracestate: bytes = b"") -> RemoteParent | None:
    value = value.strip()
    m = _TRACEPARENT_RE.fullmatch(value)
    if m is None:
        return None
    version, trace_hex, span_hex, flags_hex, rest = m.groups()
    if version == b"ff" or (version == b"00" and rest is not None):
        return None
    trace_id = int(trace_hex, 16)
    span_id = int(span_hex, 16)
    if not trace_id or not span_id:
        return None
    return RemoteParent(trace_id, span_id, bool(int(flags_hex, 16) & 1), tracestate.strip())


def parse_b3_single(value: bytes) -> tuple[RemoteParent | None, bool | None]:
    """``{trace}-{span}[-{sampled}[-{parent}]]``, or a bare sampling state ``0``/``1``/``d``."""
    value = value.strip().lower()
    if value in (b"0", b"1", b"d"):
        return None, value != b"0"
    m = _B3_SINGLE_RE.fullmatch(value)
    if m is None:
        return None, None
    trace_id, span_id = int(m[1], 16), int(m[2], 16)
    if not trace_id or not span_id:
        return None, None
    # Without a sampling state the decision is deferred to us; we sample what we record.
    sampled = m[3] != b"0" if m[3] is not None else True
    return RemoteParent(trace_id, span_id, sampled), None


def _parse_b3_multi(found: dict[bytes, bytes]) -> tuple[RemoteParent | None, bool | None]:
    sampled: bool | None = None
    if found.get(B3_FLAGS, b"").strip() == b"1":
        sampled = True
    elif B3_SAMPLED in found:
        raw = found[B3_SAMPLED].strip().lower()
        sampled = True if raw in (b"1", b"true") else False if raw in (b"0", b"false") else None
    trace_raw = found.get(B3_TRACE_ID, b"").strip().lower()
    span_raw = found.get(B3_SPAN_ID, b"").strip().lower()
    if not (_B3_ID_RE.fullmatch(trace_raw) and _B3_SPAN_RE.fullmatch(span_raw)):
        return None, sampled
    trace_id, span_id = int(trace_raw, 16), int(span_raw, 16)
    if not trace_id or not span_id:
        return None, sampled
    return RemoteParent(trace_id, span_id, True if sampled is None else sampled), None


def without_context(headers: Headers) -> Headers:
    """A copy of ``headers`` without trace headers, ready for ``append_context``."""
    return [h for h in headers if h[0] not in TRACE_HEADERS]


def append_context(
    out: Headers,
    formats: Format,
    trace_id: int,
    span_id: int,
    sampled: bool,
    *,
    tracestate: bytes = b"",
    parent_span_id: int = 0,
    request_id: bytes | None = None,
) -> None:
    """Writes our trace context (and ``x-request-id``) into ``out`` in the enabled formats.
    ``out`` must hold no trace headers already (``without_context``): appends in place."""
    trace_hex = b"%032x" % trace_id
    span_hex = b"%016x" % span_id
    flag = b"1" if sampled else b"0"
    if formats & TRACECONTEXT:
        flags = b"01" if sampled else b"00"
        out.append((TRACEPARENT, b"00-%s-%s-%s" % (trace_hex, span_hex, flags)))
        if tracestate:
            out.append((TRACESTATE, tracestate))
    if formats & B3_SINGLE:
        single = b"%s-%s-%s" % (trace_hex, span_hex, flag)
        if parent_span_id:
            single += b"-%016x" % parent_span_id
        out.append((B3, single))
    if formats & B3_MULTI:
        out.append((B3_TRACE_ID, trace_hex))
        out.append((B3_SPAN_ID, span_hex))
        if parent_span_id:
            out.append((B3_PARENT_SPAN_ID, b"%016x" % parent_span_id))
        out.append((B3_SAMPLED, flag))
    if request_id is not None:
        out.append((REQUEST_ID, request_id))


def unsampled_writer(formats: Format) -> Callable[[int, int], Headers]:
    """``unsampled_context`` for ``formats``, as a function of the trace and span ids; the
    default formats (``tracecontext,b3multi``) get one with no tests of the formats."""
    if formats == TRACECONTEXT | B3_MULTI:
        return _unsampled_tracecontext_b3multi
    return partial(unsampled_context, formats)


_B3_NOT_SAMPLED = (B3_SAMPLED, b"0")


def _unsampled_tracecontext_b3multi(trace_id: int, span_id: int) -> Headers:
    trace_hex = b"%032x" % trace_id
    span_hex = b"%016x" % span_id
    return [
        (TRACEPARENT, b"00-%s-%s-00" % (trace_hex, span_hex)),
        (B3_TRACE_ID, trace_hex),
        (B3_SPAN_ID, span_hex),
        _B3_NOT_SAMPLED,
    ]


def unsampled_context(formats: Format, trace_id: int, span_id: int) -> Headers:
    """``append_context`` for a new trace that is not sampled (no parent, no tracestate, no
    request id): the form nearly every request takes, so it is spelled out."""
    trace_hex = b"%032x" % trace_id
    span_hex = b"%016x" % span_id
    out: Headers = []
    if formats & TRACECONTEXT:
        out.append((TRACEPARENT, b"00-%s-%s-00" % (trace_hex, span_hex)))
    if formats & B3_SINGLE:
        out.append((B3, b"%s-%s-0" % (trace_hex, span_hex)))
    if formats & B3_MULTI:
        out += ((B3_TRACE_ID, trace_hex), (B3_SPAN_ID, span_hex), (B3_SAMPLED, b"0"))
    return out


class _RequestIds:
    """Version 4 UUIDs, the form Envoy generates for ``x-request-id``: 74 random bits drawn
    once per process (again in a forked child), then a 48-bit count.

    A request id must be unique, not secret: the random part keeps processes apart, the count
    keeps one process's requests apart, and an id costs a format instead of a random draw and
    four slices (``uuid4`` would cost a system call and ~4 us per request)."""

    def __init__(self) -> None:
        self.prefix = b""
        self.count = 0
        self.reseed()

    def reseed(self) -> None:
        bits = random.getrandbits(64)
        self.prefix = b"%08x-%04x-4%03x-%04x" % (
            bits >> 32,
            (bits >> 16) & 0xFFFF,
            (bits >> 4) & 0xFFF,
            0x8000 | ((bits & 0xF) << 10) | random.getrandbits(10),
        )
        self.count = random.getrandbits(47)  # far from wrapping around 48 bits

    def next(self) -> bytes:
        self.count = count = self.count + 1
        return b"%s-%012x" % (self.prefix, count & 0xFFFFFFFFFFFF)


_request_ids = _RequestIds()
os.register_at_fork(after_in_child=_request_ids.reseed)
new_request_id = _request_ids.next
"""A new ``x-request-id`` (a version 4 UUID, unique per process and across processes)."""
