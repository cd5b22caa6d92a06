"""The codec under hostile input: budgets, frames per turn, content-length and validation."""

from __future__ import annotations

import struct
from typing import Any

import hyperframe.frame as hf
import pytest

from pilotfish.config.model import ConnectionLimits
from sidecar.codec import CodecProtocolError, DataReceived, H2Codec, RequestReceived, StreamReset
from sidecar.codec.errors import ENHANCE_YOUR_CALM, PROTOCOL_ERROR
from sidecar.codec.validate import REQUEST, problem
from sidecar.http.budget import FrameBudget
from tests.codec.factory import REQUEST as GET
from tests.codec.factory import Peer, on_ngh2, server


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return struct.pack(">BHBBL", n >> 16, n & 0xFFFF, ftype, flags, sid) + payload


PING = frame(6, 0, 0, b"\0" * 8)


def budgeted(**limits: Any) -> tuple[H2Codec, Peer, FrameBudget]:
    budget = FrameBudget(ConnectionLimits(**limits), lambda: 0.0)
    codec, peer = server(budget=budget)
    return codec, peer, budget


def goaway_code(out: bytes) -> int | None:
    frames = Peer().parse(out)
    codes = [f.error_code for f in frames if isinstance(f, hf.GoAwayFrame)]
    return codes[-1] if codes else None


def test_rapid_reset_is_a_connection_error_after_the_burst() -> None:
    codec, peer, budget = budgeted(stream_reset_burst=20)
    pairs = b"".join(
        peer.headers(sid, GET) + frame(3, 0, sid, b"\0\0\0\x08") for sid in range(1, 200, 2)
    )
    with pytest.raises(CodecProtocolError) as info:
        codec.receive_data(pairs)
    assert info.value.error_code == ENHANCE_YOUR_CALM
    assert goaway_code(codec.data_to_send()) == ENHANCE_YOUR_CALM
    assert budget.tripped == "rapid_reset"
    assert codec.streams == {}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(("age", "trips"), [(1.5, False), (0.5, True)])
def test_resets_of_streams_open_a_second_are_not_rapid_resets(age: float, trips: bool) -> None:
    """A client cancelling calls at their deadline, none completed (a hung upstream): 100
    resets against a burst of 20 are rapid only if the streams were young."""
    clock = Clock()
    codec, peer = server(budget=(budget := FrameBudget(
        ConnectionLimits(stream_reset_burst=20, stream_reset_rate=1.0), clock
    )))
    sids = range(1, 200, 2)
    events = codec.receive_data(b"".join(peer.headers(sid, GET) for sid in sids))
    assert sum(isinstance(e, RequestReceived) for e in events) == len(sids)
    clock.now += age
    resets = b"".join(frame(3, 0, sid, b"\0\0\0\x08") for sid in sids)
    if trips:
        with pytest.raises(CodecProtocolError) as info:
            codec.receive_data(resets)
        assert info.value.error_code == ENHANCE_YOUR_CALM
        assert budget.tripped == "rapid_reset"
    else:
        events = codec.receive_data(resets)
        assert sum(isinstance(e, StreamReset) for e in events) == len(sids)
        assert budget.tripped is None and codec.streams == {}
        assert goaway_code(codec.data_to_send()) is None


def test_streams_we_reset_for_malformed_requests_count_as_resets() -> None:
    codec, peer, budget = budgeted(stream_reset_burst=5)
    bad = [*GET[:3], (b":path", b"no-slash")]
    with pytest.raises(CodecProtocolError):
        codec.receive_data(b"".join(peer.headers(s, bad) for s in range(1, 40, 2)))
    assert budget.tripped == "rapid_reset"


@pytest.mark.parametrize(
    "unit",
    [
        PING,
        frame(4, 0, 0),  # SETTINGS
        frame(2, 0, 3, b"\0\0\0\0\x0f"),  # PRIORITY
        frame(8, 0, 0, b"\0\0\0\x01"),  # WINDOW_UPDATE
        frame(0x42, 0, 0, b"xx"),  # unknown type
    ],
)
def test_control_frame_flood_is_enhance_your_calm(unit: bytes) -> None:
    codec, _, budget = budgeted(control_frame_burst=100)
    with pytest.raises(CodecProtocolError) as info:
        codec.receive_data(unit * 150)
    assert info.value.error_code == ENHANCE_YOUR_CALM
    assert budget.tripped == "flood"
    out = codec.data_to_send()
    assert goaway_code(out) == ENHANCE_YOUR_CALM
    acks = [f for f in Peer().parse(out) if isinstance(f, hf.PingFrame)]
    assert len(acks) <= 100


def test_empty_data_flood_is_enhance_your_calm() -> None:
    codec, peer, _ = budgeted(control_frame_burst=100)
    with pytest.raises(CodecProtocolError):
        codec.receive_data(
            peer.headers(1, GET) and peer.headers(1, GET, end_stream=False) + frame(0, 0, 1) * 150
        )


def test_frames_per_turn_are_bounded_and_the_rest_waits() -> None:
    codec, _ = server(max_frames_per_turn=1000)
    room = codec.get_buffer()
    data = PING * 2500
    room[: len(data)] = data
    codec.buffer_updated(len(data))
    assert codec.backlogged
    assert len(Peer().parse(codec.data_to_send())) == 1000
    turns = 1
    while codec.backlogged:
        codec.get_buffer()
        codec.buffer_updated(0)
        turns += 1
    assert turns == 3
    assert len(Peer().parse(codec.data_to_send())) == 1500


@pytest.mark.parametrize(
    ("declared", "chunks"),
    [(b"10", [b"12345"]), (b"3", [b"12", b"34"]), (b"5", [b"123456789"])],
)
def test_body_that_disagrees_with_content_length_resets_the_stream(
    declared: bytes, chunks: list[bytes]
) -> None:
    codec, peer = server()
    post = [(b":method", b"POST"), *GET[1:], (b"content-length", declared)]
    events = codec.receive_data(peer.headers(1, post, end_stream=False))
    assert isinstance(events[0], RequestReceived)
    events = []
    for i, chunk in enumerate(chunks):
        events += codec.receive_data(peer.data(1, chunk, end_stream=i == len(chunks) - 1))
    resets = [e for e in events if isinstance(e, StreamReset)]
    assert [(e.error_code, e.remote_reset) for e in resets] == [(PROTOCOL_ERROR, False)]
    assert codec.streams == {}
    # The body never got past the codec beyond what agreed with the declared length.
    relayed = sum(len(e.data) for e in events if isinstance(e, DataReceived))
    assert relayed <= int(declared)


def test_body_that_agrees_with_content_length_passes() -> None:
    codec, peer = server()
    post = [(b":method", b"POST"), *GET[1:], (b"content-length", b"4")]
    codec.receive_data(peer.headers(1, post, end_stream=False))
    events = codec.receive_data(peer.data(1, b"12") + peer.data(1, b"34", end_stream=True))
    relayed = [e.data for e in events if isinstance(e, DataReceived)]
    assert b"".join(relayed) == b"1234"
    if not on_ngh2():  # libnghttp2 gives an event per DATA frame
        assert relayed == [b"1234"]
    assert not [e for e in events if isinstance(e, StreamReset)]


def test_content_length_without_a_body_is_refused() -> None:
    codec, peer = server()
    post = [(b":method", b"POST"), *GET[1:], (b"content-length", b"4")]
    events = codec.receive_data(peer.headers(1, post, end_stream=True))
    assert events == []
    resets = [f for f in peer.parse(codec.data_to_send()) if isinstance(f, hf.RstStreamFrame)]
    assert [f.error_code for f in resets] == [PROTOCOL_ERROR]


R = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")]


@pytest.mark.parametrize(
    ("fields", "fine"),
    [
        (R, True),
        ([*R, (b"content-length", b"0")], True),
        ([*R, (b"content-length", b"7"), (b"content-length", b"7")], True),
        ([(b":method", b"OPTIONS"), *R[1:3], (b":path", b"*")], True),
        ([(b":method", b"GET"), *R[1:3], (b":path", b"*")], False),
        ([(b":method", b"CONNECT"), (b":authority", b"a:443")], True),
        ([*R, (b"content-length", b"-1")], False),
        ([*R, (b"content-length", b"1,1")], False),
        ([*R, (b"content-length", b"1"), (b"content-length", b"2")], False),
        ([*R, (b"x-a", b"a\tb")], True),
        ([*R, (b"x-a", b"a\x0bb")], False),
        ([*R, (b"x-a", b"\x80 obs-text")], True),
        ([(b":method", b"PATCH-X"), *R[1:]], True),
        ([(b":method", b"Get"), *R[1:]], False),
        ([(b":method", b"G(T"), *R[1:]], False),
        ([*R[:3], (b":path", b"/a?b=c%20d")], True),
        ([*R[:3], (b":path", b"/a\tb")], False),
        ([R[0], (b":scheme", b"ht tp"), *R[2:]], False),
        ([*R[:2], (b":authority", b"a b"), R[3]], False),
    ],
)
def test_request_validation(fields: list[tuple[bytes, bytes]], fine: bool) -> None:
    assert (problem(REQUEST, tuple(fields)) is None) == fine
