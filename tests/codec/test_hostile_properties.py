"""Hypothesis: random sequences of well-framed but hostile frames into a server codec with a
budget. The codec raises nothing but ``CodecProtocolError``, its stream bookkeeping stays
consistent, and once the application has answered every stream it was told of, no stream is
left behind (nothing leaks, whatever the peer sent)."""

from __future__ import annotations

import struct
from typing import NamedTuple

import hpack
from hypothesis import event as note_event
from hypothesis import given, settings
from hypothesis import strategies as st

from pilotfish.config.model import ConnectionLimits
from sidecar.codec import (
    CodecProtocolError,
    DataReceived,
    H2Codec,
    RequestReceived,
    StreamReset,
    TrailersReceived,
)
from sidecar.codec.frames import PREFACE
from sidecar.http.budget import FrameBudget

GOOD = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")]
HEADER_LISTS = [
    GOOD,
    [*GOOD, (b"content-length", b"3")],
    [*GOOD, (b"content-length", b"abc")],
    [(b":method", b"get"), *GOOD[1:]],
    [(b"x-a", b"1"), *GOOD],
    [(b"te", b"trailers"), (b"x-b", b"a\x01")],
    [(b"grpc-status", b"0")],
]


class Spec(NamedTuple):
    kind: str
    sid: int = 0
    flags: int = 0
    value: int = 0  # frame type (raw), header list (headers), error code, increment
    payload: bytes = b""


sids = st.sampled_from([0, 1, 3, 5, 7, 9, 0x7FFFFFFF])
stream_ids = st.sampled_from([1, 3, 5, 7, 9])  # mostly the streams each example opens first
flags = st.integers(0, 0xFF)
settings_payloads = st.lists(
    st.tuples(st.integers(1, 7), st.integers(0, 2**32 - 1)), max_size=3
).map(lambda pairs: b"".join(struct.pack(">HL", k, v) for k, v in pairs))
headers = st.builds(
    Spec, st.just("headers"), stream_ids, st.sampled_from([4, 5, 4, 5, 0]), st.integers(0, 6)
)
data = st.builds(
    Spec, st.just("data"), stream_ids, st.sampled_from([0, 1]), st.just(0), st.binary(max_size=8)
)
frame_specs = st.one_of(
    headers,
    headers,
    data,
    data,
    st.builds(Spec, st.just("headers"), sids, flags, st.integers(0, len(HEADER_LISTS) - 1)),
    st.builds(Spec, st.just("raw"), sids, flags, st.integers(0, 0x0C), st.binary(max_size=24)),
    st.builds(Spec, st.just("data"), sids, flags, st.just(0), st.binary(max_size=8)),
    st.builds(Spec, st.just("rst"), sids, st.just(0), st.integers(0, 12)),
    st.builds(Spec, st.just("window"), sids, st.just(0), st.integers(0, 2**31 - 1)),
    st.builds(Spec, st.just("settings"), st.just(0), st.just(0), st.just(0), settings_payloads),
)


def header(length: int, ftype: int, fl: int, sid: int) -> bytes:
    return struct.pack(">BHBBL", length >> 16, length & 0xFFFF, ftype, fl, sid)


def encode(spec: Spec, encoder: hpack.Encoder) -> bytes:
    """The frame's bytes; header blocks are encoded in wire order, keeping HPACK in step."""
    if spec.kind == "headers":
        block = encoder.encode(HEADER_LISTS[spec.value])
        # No PADDED or PRIORITY flag: the payload must be the block as encoded.
        return header(len(block), 1, spec.flags & ~0x28, spec.sid) + block
    if spec.kind == "raw":
        return header(len(spec.payload), spec.value, spec.flags, spec.sid) + spec.payload
    if spec.kind == "data":
        return header(len(spec.payload), 0, spec.flags & ~0x08, spec.sid) + spec.payload
    if spec.kind in ("rst", "window"):
        ftype = 3 if spec.kind == "rst" else 8
        return header(4, ftype, 0, spec.sid) + struct.pack(">L", spec.value)
    return header(len(spec.payload), 4, 0, 0) + spec.payload


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(0, len(HEADER_LISTS) - 1), max_size=4),
    st.lists(frame_specs, max_size=40),
    st.integers(1, 64),
)
def test_hostile_frames_never_escape_and_never_leak(
    opening: list[int], specs: list[Spec], cut: int
) -> None:
    """``opening``: header lists sent on streams 1, 3, 5, 7 first (not all of them valid
    requests), so that most of the random frames that follow meet streams in some state."""
    budget = FrameBudget(
        ConnectionLimits(stream_reset_burst=8, control_frame_burst=16), lambda: 0.0
    )
    codec = H2Codec(
        client_side=False, max_concurrent_streams=4, budget=budget, max_frames_per_turn=5
    )
    codec.initiate_connection()
    encoder = hpack.Encoder()
    opened = [Spec("headers", 2 * i + 1, 4, which) for i, which in enumerate(opening)]
    wire = PREFACE + header(0, 4, 0, 0) + b"".join(encode(s, encoder) for s in opened + specs)
    known: set[int] = set()  # streams the application was told of and not yet told are gone
    dead = False
    try:
        for start in range(0, len(wire), cut):  # reads of ``cut`` bytes
            events = codec.receive_data(wire[start : start + cut])
            for event in events:
                if isinstance(event, RequestReceived):
                    assert event.stream_id not in known
                    known.add(event.stream_id)
                elif isinstance(event, StreamReset):
                    known.discard(event.stream_id)
                elif isinstance(event, (DataReceived, TrailersReceived)):
                    assert event.stream_id in known
            inbound = [s for s in codec.streams.values() if s.inbound]
            assert len(inbound) == codec._inbound_open <= 4
            assert set(codec.streams) <= known
    except CodecProtocolError:
        dead = True
    note_event("connection error" if dead else f"streams left to answer: {min(len(known), 3)}")
    if dead:
        return
    # The application answers every stream it knows of: nothing may be left open after.
    for sid in sorted(known):
        stream = codec.streams.get(sid)
        if stream is not None and stream.local_open:
            codec.send_headers(sid, [(b":status", b"200")], end_stream=True)
        if sid in codec.streams:
            codec.reset_stream(sid, 8)
    assert codec.streams == {}
    assert codec._inbound_open == 0
