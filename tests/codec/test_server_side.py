"""The lean codec as a server: frames in (built with hyperframe), events and frames out."""

from __future__ import annotations

from collections.abc import Sequence

import hyperframe.frame as hf
import pytest

from sidecar.codec import (
    CodecProtocolError,
    CodecStreamClosedError,
    ConnectionTerminated,
    DataReceived,
    H2Codec,
    RemoteSettingsChanged,
    RequestReceived,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from sidecar.codec.errors import CodecUsageError
from sidecar.codec.frames import PREFACE
from tests.codec.factory import REQUEST, RESPONSE, Peer, new_codec, on_ngh2, server


def goaway_code(codec: H2Codec, peer: Peer) -> int:
    frames = peer.parse(codec.data_to_send())
    goaways = [fr for fr in frames if isinstance(fr, hf.GoAwayFrame)]
    assert len(goaways) == 1
    return int(goaways[0].error_code)


def connection_error(codec: H2Codec, peer: Peer, data: bytes) -> int:
    with pytest.raises(CodecProtocolError) as info:
        codec.receive_data(data)
    code = goaway_code(codec, peer)
    assert code == info.value.error_code
    assert codec.receive_data(data) == []  # a failed connection ignores what follows
    return code


def rst_codes(frames: list[hf.Frame]) -> list[tuple[int, int]]:
    return [(fr.stream_id, fr.error_code) for fr in frames if isinstance(fr, hf.RstStreamFrame)]


def test_initiate_sends_our_settings_and_acks_the_peers() -> None:
    codec = new_codec(client_side=False, initial_window_size=1 << 18, max_concurrent_streams=7)
    codec.initiate_connection()
    peer = Peer()
    (settings,) = peer.parse(codec.data_to_send())
    assert isinstance(settings, hf.SettingsFrame)
    assert settings.settings == {2: 0, 4: 1 << 18, 3: 7, 6: 64 * 1024}
    events = codec.receive_data(PREFACE + peer.settings(max_concurrent_streams=5))
    assert isinstance(events[0], RemoteSettingsChanged)
    assert events[0].changed_settings == {3: 5}
    assert codec.remote_settings.max_concurrent_streams == 5
    (ack,) = peer.parse(codec.data_to_send())
    assert isinstance(ack, hf.SettingsFrame) and "ACK" in ack.flags


def test_preface_may_arrive_in_pieces() -> None:
    codec = new_codec(client_side=False)
    codec.initiate_connection()
    codec.data_to_send()
    assert codec.receive_data(PREFACE[:5]) == []
    events = codec.receive_data(PREFACE[5:] + Peer().settings())
    assert isinstance(events[0], RemoteSettingsChanged)


def test_bad_preface_is_a_protocol_error() -> None:
    codec = new_codec(client_side=False)
    codec.initiate_connection()
    codec.data_to_send()
    assert connection_error(codec, Peer(), b"GET / HTTP/1.1\r\n\r\n") == 1


def test_first_frame_must_be_settings() -> None:
    codec = new_codec(client_side=False)
    codec.initiate_connection()
    codec.data_to_send()
    peer = Peer()
    assert connection_error(codec, peer, PREFACE + peer.headers(1, REQUEST, True)) == 1


def test_request_response_round_trip() -> None:
    codec, peer = server()
    (event,) = codec.receive_data(peer.headers(1, REQUEST, end_stream=True))
    assert isinstance(event, RequestReceived)
    assert (event.stream_id, event.headers, event.stream_ended) == (1, REQUEST, True)
    assert codec.highest_inbound_stream_id == 1
    codec.send_headers(1, RESPONSE)
    codec.send_data(1, b"hello", end_stream=True)
    headers, data = peer.parse(codec.data_to_send())
    assert isinstance(headers, hf.HeadersFrame) and "END_HEADERS" in headers.flags
    assert peer.decode(headers) == RESPONSE
    assert isinstance(data, hf.DataFrame) and data.data == b"hello" and "END_STREAM" in data.flags
    assert codec.streams.get(1) is None
    with pytest.raises(CodecStreamClosedError):
        codec.send_data(1, b"more")


def test_request_body_padding_counts_for_flow_control() -> None:
    codec, peer = server()
    codec.receive_data(peer.headers(1, REQUEST))
    (event,) = codec.receive_data(peer.data(1, b"abc", end_stream=True, pad=10))
    assert isinstance(event, DataReceived)
    # libnghttp2 returns the padding to the window itself: only the data is left to us.
    flow = 3 if on_ngh2() else 14
    assert (event.data, event.flow_controlled_length, event.stream_ended) == (b"abc", flow, True)
    stream = codec.streams[1]
    assert not stream.remote_open and stream.local_open and not stream.closed


def data_events(events: Sequence[object]) -> list[tuple[int, bytes, int, bool | None]]:
    return [
        (e.stream_id, e.data, e.flow_controlled_length, e.stream_ended)
        for e in events
        if isinstance(e, DataReceived)
    ]


@pytest.mark.ours_only  # how our codec batches a read (libnghttp2 has an event per frame)
def test_each_streams_data_in_one_read_makes_one_event() -> None:
    # As servers send responses: frames of several streams interleaved.
    codec, peer = server()
    codec.receive_data(peer.headers(1, REQUEST) + peer.headers(3, REQUEST))
    events = codec.receive_data(
        peer.data(1, b"a" * 16384)
        + peer.data(3, b"x")
        + peer.data(1, b"b" * 100)
        + peer.data(3, b"")
        + peer.data(1, b"c", end_stream=True)
        + peer.data(3, b"y")
    )
    assert data_events(events) == [
        (1, b"a" * 16384 + b"b" * 100 + b"c", 16485, True),
        (3, b"xy", 2, None),
    ]
    assert not codec.streams[1].remote_open and codec.streams[3].remote_open


def test_data_is_never_moved_across_frames_of_other_types() -> None:
    codec, peer = server()
    codec.receive_data(peer.headers(1, REQUEST) + peer.headers(3, REQUEST))
    events = codec.receive_data(
        peer.data(1, b"a")
        + peer.data(3, b"x")
        + peer.data(1, b"p", pad=3)  # padded: passed on alone, after what came before
        + peer.data(1, b"b")
        + peer.headers(1, [(b"grpc-status", b"0")], end_stream=True)
        + peer.data(3, b"y")
        + bytes(hf.RstStreamFrame(3, error_code=8).serialize())
    )
    summary = [
        (type(e).__name__, getattr(e, "stream_id", 0), getattr(e, "data", b"")) for e in events
    ]
    assert summary == [
        ("DataReceived", 1, b"a"),
        ("DataReceived", 3, b"x"),
        ("DataReceived", 1, b"p"),
        ("DataReceived", 1, b"b"),
        ("TrailersReceived", 1, b""),
        ("DataReceived", 3, b"y"),
        ("StreamReset", 3, b""),
    ]


def test_merged_data_beyond_the_window_is_a_flow_control_error() -> None:
    codec, peer = server()
    codec.receive_data(peer.headers(1, REQUEST))
    chunk = peer.data(1, b"z" * 16384)
    assert connection_error(codec, peer, chunk * 4 + peer.data(1, b"z" * 10)) == 3  # 65,535


def test_trailers() -> None:
    codec, peer = server()
    codec.receive_data(peer.headers(1, REQUEST) + peer.data(1, b"x"))
    (event,) = codec.receive_data(peer.headers(1, [(b"grpc-status", b"0")], end_stream=True))
    assert isinstance(event, TrailersReceived) and event.headers == [(b"grpc-status", b"0")]


def test_trailers_must_end_the_stream() -> None:
    codec, peer = server()
    codec.receive_data(peer.headers(1, REQUEST))
    (event,) = codec.receive_data(peer.headers(1, [(b"x", b"y")]))
    assert isinstance(event, StreamReset) and event.error_code == 1 and not event.remote_reset
    assert rst_codes(peer.parse(codec.data_to_send())) == [(1, 1)]


def test_data_on_stream_zero() -> None:
    codec, peer = server()
    assert connection_error(codec, peer, b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x") == 1


def test_data_on_idle_stream() -> None:
    codec, peer = server()
    assert connection_error(codec, peer, peer.data(5, b"x")) == 1


def test_data_after_end_stream_is_a_stream_error() -> None:
    codec, peer = server()
    codec.receive_data(peer.headers(1, REQUEST, end_stream=True))
    if on_ngh2():  # libnghttp2 makes it a connection error, of the same code
        assert connection_error(codec, peer, peer.data(1, b"x")) == 5
        return
    (event,) = codec.receive_data(peer.data(1, b"x"))
    assert isinstance(event, StreamReset) and event.error_code == 5
    assert rst_codes(peer.parse(codec.data_to_send())) == [(1, 5)]


def test_late_frames_on_a_stream_we_reset_are_ignored_but_paid_for() -> None:
    codec, peer = server()
    codec.receive_data(peer.headers(1, REQUEST))
    codec.reset_stream(1, 8)
    assert rst_codes(peer.parse(codec.data_to_send())) == [(1, 8)]
    late = peer.data(1, b"x" * 16000) + peer.data(1, b"x" * 16000) + peer.data(1, b"x" * 2000)
    assert codec.receive_data(late) == []
    assert codec.receive_data(peer.headers(1, [(b"x", b"y")], end_stream=True)) == []
    (update,) = peer.parse(codec.data_to_send())  # the connection window came back
    assert isinstance(update, hf.WindowUpdateFrame) and update.stream_id == 0
    assert update.window_increment == 34000


def test_connection_flow_control_violation() -> None:
    codec, peer = server(initial_window_size=1 << 20)
    codec.receive_data(peer.headers(1, REQUEST))
    chunk = peer.data(1, b"x" * 16384)
    assert connection_error(codec, peer, chunk * 5) == 3


def test_stream_flow_control_violation() -> None:
    codec, peer = server()
    codec.increment_flow_control_window(1 << 20)
    codec.receive_data(peer.headers(1, REQUEST))
    assert connection_error(codec, peer, peer.data(1, b"x" * 16384) * 5) == 3


def test_window_updates_come_when_half_the_window_is_taken() -> None:
    codec, peer = server(initial_window_size=65535)
    codec.receive_data(peer.headers(1, REQUEST))
    codec.receive_data(peer.data(1, b"x" * 16000) + peer.data(1, b"x" * 16000))
    codec.acknowledge_received_data(32000, 1)
    assert codec.data_to_send() == b""
    codec.receive_data(peer.data(1, b"x" * 1000))
    codec.acknowledge_received_data(1000, 1)
    updates = peer.parse(codec.data_to_send())
    assert [(u.stream_id, u.window_increment) for u in updates] == [(0, 33000), (1, 33000)]


@pytest.mark.ours_only  # the factory acknowledges libnghttp2's SETTINGS before the test starts
def test_our_settings_take_effect_when_acknowledged() -> None:
    codec, peer = server(initial_window_size=1000)
    codec.receive_data(peer.headers(1, REQUEST))
    codec.receive_data(peer.data(1, b"x" * 16000))  # legal: the peer may not have seen 1000 yet
    codec.receive_data(bytes(hf.SettingsFrame(0, flags=["ACK"]).serialize()))
    assert codec.streams[1].recv_window == 1000 - 16000
    assert connection_error(codec, peer, peer.data(1, b"x")) == 3


def test_oversized_header_list_is_enhance_your_calm() -> None:
    codec, peer = server(max_header_list_size=1024)
    headers = [*REQUEST, (b"x-big", b"v" * 2000)]
    assert connection_error(codec, peer, peer.headers(1, headers)) == 0xB


def test_garbage_header_block_is_a_compression_error() -> None:
    codec, peer = server()
    frame = hf.HeadersFrame(1, data=b"\xff\xff\xff\xff\xff", flags=["END_HEADERS"])
    assert connection_error(codec, peer, bytes(frame.serialize())) == 9


def continued(peer: Peer, sid: int, headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    block = peer.encoder.encode(headers)
    first = hf.HeadersFrame(sid, data=block[:3], flags=["END_STREAM"])
    middle = hf.ContinuationFrame(sid, data=block[3:6])
    last = hf.ContinuationFrame(sid, data=block[6:], flags=["END_HEADERS"])
    return [bytes(fr.serialize()) for fr in (first, middle, last)]


def test_continuation() -> None:
    codec, peer = server()
    first, middle, last = continued(peer, 1, REQUEST)
    assert codec.receive_data(first + middle) == []
    (event,) = codec.receive_data(last)
    assert isinstance(event, RequestReceived) and event.headers == REQUEST and event.stream_ended


def test_interrupted_header_block() -> None:
    codec, peer = server()
    first, _, _ = continued(peer, 1, REQUEST)
    assert connection_error(codec, peer, first + bytes(hf.PingFrame(0).serialize())) == 1


def test_continuation_on_another_stream() -> None:
    codec, peer = server()
    first, _middle, _ = continued(peer, 1, REQUEST)
    other = hf.ContinuationFrame(3, data=b"", flags=["END_HEADERS"])
    assert connection_error(codec, peer, first + bytes(other.serialize())) == 1


def test_continuation_without_headers() -> None:
    codec, peer = server()
    frame = hf.ContinuationFrame(1, data=b"", flags=["END_HEADERS"])
    assert connection_error(codec, peer, bytes(frame.serialize())) == 1


def test_endless_continuation_is_refused() -> None:
    codec, peer = server()
    first = hf.HeadersFrame(1, data=b"")
    empty = bytes(hf.ContinuationFrame(1, data=b"").serialize())
    assert connection_error(codec, peer, bytes(first.serialize()) + empty * 100) == 0xB


def test_stream_ids_must_grow() -> None:
    codec, peer = server()
    codec.receive_data(peer.headers(5, REQUEST, end_stream=True))
    if on_ngh2():  # stream 3 closed when 5 opened: libnghttp2 ignores frames on it
        assert codec.receive_data(peer.headers(3, REQUEST, end_stream=True)) == []
        assert codec.highest_inbound_stream_id == 5
        return
    assert connection_error(codec, peer, peer.headers(3, REQUEST, end_stream=True)) == 1


def test_even_stream_ids_from_a_client() -> None:
    codec, peer = server()
    assert connection_error(codec, peer, peer.headers(2, REQUEST, end_stream=True)) == 1


def test_too_many_streams_are_refused() -> None:
    codec, peer = server(max_concurrent_streams=1)
    assert len(codec.receive_data(peer.headers(1, REQUEST))) == 1
    if on_ngh2():  # a client past a limit it acknowledged: libnghttp2 ends its connection
        assert connection_error(codec, peer, peer.headers(3, REQUEST)) == 1
        return
    assert codec.receive_data(peer.headers(3, REQUEST)) == []
    assert rst_codes(peer.parse(codec.data_to_send())) == [(3, 7)]
    assert codec.highest_inbound_stream_id == 3
    codec.reset_stream(1, 8)
    (event,) = codec.receive_data(peer.headers(5, REQUEST))
    assert isinstance(event, RequestReceived) and event.stream_id == 5


@pytest.mark.parametrize(
    "headers",
    [
        [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"t")],
        [(b":method", b"GET"), (b":path", b"/"), (b":authority", b"t")],
        [(b":scheme", b"http"), (b":path", b"/")],
        [*REQUEST, (b"X-Upper", b"1")],
        [*REQUEST, (b"connection", b"keep-alive")],
        [*REQUEST, (b"transfer-encoding", b"chunked")],
        [*REQUEST, (b"te", b"gzip")],
        [*REQUEST, (b"x", b"a\r\nb")],
        [*REQUEST, (b"x", b" padded")],
        [*REQUEST, (b"", b"v")],
        [(b"x", b"y"), *REQUEST],
        [*REQUEST, (b":path", b"/again")],
        [*REQUEST, (b":status", b"200")],
        [(b":method", b"CONNECT"), (b":scheme", b"http"), (b":path", b"/")],
    ],
)
def test_malformed_requests_are_stream_errors(headers: list[tuple[bytes, bytes]]) -> None:
    codec, peer = server()
    assert codec.receive_data(peer.headers(1, headers, end_stream=True)) == []
    assert rst_codes(peer.parse(codec.data_to_send())) == [(1, 1)]
    (event,) = codec.receive_data(peer.headers(3, REQUEST, end_stream=True))
    assert isinstance(event, RequestReceived)


def test_te_trailers_and_connect_are_fine() -> None:
    codec, peer = server()
    events = codec.receive_data(
        peer.headers(1, [*REQUEST, (b"te", b"trailers")], end_stream=True)
        + peer.headers(3, [(b":method", b"CONNECT"), (b":authority", b"h:1")])
    )
    assert [type(e) for e in events] == [RequestReceived, RequestReceived]


def test_ping_is_answered() -> None:
    codec, peer = server()
    assert codec.receive_data(bytes(hf.PingFrame(0, opaque_data=b"12345678").serialize())) == []
    (ack,) = peer.parse(codec.data_to_send())
    assert isinstance(ack, hf.PingFrame) and "ACK" in ack.flags and ack.opaque_data == b"12345678"
    assert codec.receive_data(bytes(hf.PingFrame(0, flags=["ACK"]).serialize())) == []
    assert codec.data_to_send() == b""


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"\x00\x00\x04\x06\x00\x00\x00\x00\x00abcd", 6),  # PING of 4 bytes
        (b"\x00\x00\x08\x06\x00\x00\x00\x00\x01abcdefgh", 1),  # PING on a stream
        (b"\x00\x00\x06\x04\x01\x00\x00\x00\x00\x00\x03\x00\x00\x00\x01", 6),  # SETTINGS ACK+data
        (b"\x00\x00\x05\x04\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00", 6),  # SETTINGS of 5
        (b"\x00\x00\x06\x04\x00\x00\x00\x00\x01\x00\x03\x00\x00\x00\x01", 1),  # SETTINGS, stream 1
        (b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x05\x00\x00\x00\x01", 1),  # MAX_FRAME_SIZE 1
        (b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x04\x80\x00\x00\x00", 3),  # window 2**31
        (b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x02\x00\x00\x00\x02", 1),  # ENABLE_PUSH 2
        (b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00", 1),  # WINDOW_UPDATE 0
        (b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x7f\xff\xff\xff", 3),  # window overflow
        (b"\x00\x00\x03\x08\x00\x00\x00\x00\x00\x00\x00\x01", 6),  # WINDOW_UPDATE of 3
        (b"\x00\x00\x04\x03\x00\x00\x00\x00\x00\x00\x00\x00\x08", 1),  # RST_STREAM on 0
        (b"\x00\x00\x04\x03\x00\x00\x00\x00\x09\x00\x00\x00\x08", 1),  # RST_STREAM on idle
        (b"\x00\x00\x05\x02\x00\x00\x00\x00\x00\x00\x00\x00\x00\x10", 1),  # PRIORITY on 0
        (b"\x00\x00\x04\x07\x00\x00\x00\x00\x00\x00\x00\x00\x00", 6),  # GOAWAY too short
        (b"\x00\x00\x08\x05\x04\x00\x00\x00\x01\x00\x00\x00\x02\x00\x00\x00\x00", 1),  # PUSH
        (b"\x00\x40\x01\x00\x00\x00\x00\x00\x01" + b"x" * 16385, 6),  # DATA over 16384
    ],
)
def test_malformed_frames_are_connection_errors(raw: bytes, code: int) -> None:
    codec, peer = server()
    if on_ngh2() and raw[3] == 2:  # PRIORITY (deprecated by RFC 9113): libnghttp2 ignores it
        assert codec.receive_data(raw) == []
        return
    assert connection_error(codec, peer, raw) == code


def test_rst_stream_from_the_peer() -> None:
    codec, peer = server()
    codec.receive_data(peer.headers(1, REQUEST))
    rst = bytes(hf.RstStreamFrame(1, error_code=8).serialize())
    (event,) = codec.receive_data(rst)
    assert isinstance(event, StreamReset) and event.error_code == 8 and event.remote_reset
    assert codec.streams.get(1) is None
    assert codec.receive_data(rst) == []  # on a closed stream: ignored


def test_priority_is_accepted_and_ignored_but_not_on_itself() -> None:
    codec, peer = server()
    fine = hf.PriorityFrame(7, depends_on=1, stream_weight=10)
    assert codec.receive_data(bytes(fine.serialize())) == []
    codec.receive_data(peer.headers(1, REQUEST))
    itself = hf.PriorityFrame(1, depends_on=1)
    if on_ngh2():  # libnghttp2 ignores PRIORITY frames (RFC 9113 deprecates them) wholesale
        assert codec.receive_data(bytes(itself.serialize())) == []
        assert codec.streams.get(1) is not None
        return
    (event,) = codec.receive_data(bytes(itself.serialize()))
    assert isinstance(event, StreamReset)


def test_headers_depending_on_themselves_keep_hpack_in_step() -> None:
    codec, peer = server()
    block = peer.encoder.encode([*REQUEST, (b"x-new", b"1")])
    flags = ["END_HEADERS", "END_STREAM", "PRIORITY"]
    bad = bytes(hf.HeadersFrame(1, data=block, flags=flags, depends_on=1).serialize())
    if on_ngh2():  # libnghttp2: a connection error, so HPACK's state no longer matters
        assert connection_error(codec, peer, bad) == 1
        return
    assert codec.receive_data(bad) == []
    (event,) = codec.receive_data(peer.headers(3, [*REQUEST, (b"x-new", b"1")], True))
    assert isinstance(event, RequestReceived) and event.headers[-1] == (b"x-new", b"1")


def test_window_updates_and_blocked_sends() -> None:
    codec, peer = server()
    codec.receive_data(peer.headers(1, REQUEST, end_stream=True))
    codec.send_headers(1, RESPONSE)
    assert codec.local_flow_control_window(1) == 65535
    for _ in range(3):
        codec.send_data(1, b"x" * 16384)
    codec.send_data(1, b"x" * 16383)
    assert codec.local_flow_control_window(1) == 0
    if not on_ngh2():  # libnghttp2 would hold such DATA until the window opens
        with pytest.raises(CodecUsageError):
            codec.send_data(1, b"x")
        with pytest.raises(CodecUsageError):
            codec.send_data(1, b"x" * 16385)
    events = codec.receive_data(
        bytes(hf.WindowUpdateFrame(0, window_increment=100).serialize())
        + bytes(hf.WindowUpdateFrame(1, window_increment=50).serialize())
    )
    assert [(type(e), e.stream_id, e.delta) for e in events if isinstance(e, WindowUpdated)] == [
        (WindowUpdated, 0, 100),
        (WindowUpdated, 1, 50),
    ]
    assert codec.local_flow_control_window(1) == 50


def test_small_sends_count_against_the_window_before_their_frames_are_taken() -> None:
    # Small DATA may wait for the turn's output (ngh2 serializes it with the rest); the
    # window a caller is told must already leave it out, or a proxy would overcommit.
    codec, peer = server()
    for sid in (1, 3):
        codec.receive_data(peer.headers(sid, REQUEST, end_stream=True))
        codec.send_headers(sid, RESPONSE)
    codec.send_data(1, b"x" * 100)
    codec.send_data(1, b"y" * 200)
    codec.send_data(3, b"z" * 300)
    assert codec.local_flow_control_window(1) == 65535 - 600  # the connection's is smaller
    codec.receive_data(bytes(hf.WindowUpdateFrame(0, window_increment=1000).serialize()))
    assert codec.local_flow_control_window(1) == 65535 - 300
    assert codec.local_flow_control_window(3) == 65535 - 300
    sent = {1: b"", 3: b""}  # libnghttp2 may join a stream's sends into one frame
    for frame in peer.parse(codec.data_to_send()):
        if isinstance(frame, hf.DataFrame):
            sent[frame.stream_id] += frame.data
    assert sent == {1: b"x" * 100 + b"y" * 200, 3: b"z" * 300}
    assert codec.local_flow_control_window(1) == 65535 - 300


def test_a_reset_after_small_sends_leaves_after_their_data() -> None:
    codec, peer = server()
    codec.receive_data(peer.headers(1, REQUEST))
    codec.send_headers(1, RESPONSE)
    codec.send_data(1, b"the whole answer")
    codec.reset_stream(1, 0)  # NO_ERROR: the request body is not wanted, the answer stands
    frames = [fr for fr in peer.parse(codec.data_to_send()) if not isinstance(fr, hf.HeadersFrame)]
    assert [type(fr) for fr in frames] == [hf.DataFrame, hf.RstStreamFrame]
    assert frames[0].data == b"the whole answer"


def test_initial_window_change_applies_to_open_streams() -> None:
    codec, peer = server()
    codec.receive_data(peer.headers(1, REQUEST, end_stream=True))
    codec.receive_data(peer.settings(initial_window_size=100))
    assert codec.local_flow_control_window(1) == 100


def test_goaway_is_an_event_and_sending_one_closes_nothing() -> None:
    codec, peer = server()
    codec.receive_data(peer.headers(1, REQUEST, end_stream=True))
    # A client's GOAWAY names the last stream the server opened: none (libnghttp2 insists).
    goaway = hf.GoAwayFrame(0, last_stream_id=0, error_code=0, additional_data=b"bye")
    (event,) = codec.receive_data(bytes(goaway.serialize()))
    assert isinstance(event, ConnectionTerminated)
    assert (event.error_code, event.last_stream_id, event.additional_data) == (0, 0, b"bye")
    codec.send_goaway(1)
    codec.send_headers(1, RESPONSE, end_stream=True)
    frames = peer.parse(codec.data_to_send())
    assert [type(fr) for fr in frames] == [hf.GoAwayFrame, hf.HeadersFrame]
    assert frames[0].last_stream_id == 1


def test_large_header_blocks_are_sent_with_continuation() -> None:
    codec, peer = server()
    codec.receive_data(peer.headers(1, REQUEST, end_stream=True))
    big = [*RESPONSE, (b"x-big", b"v" * 40000)]
    codec.send_headers(1, big, end_stream=True)
    frames = peer.parse(codec.data_to_send())
    assert [type(fr) for fr in frames] == [hf.HeadersFrame] + [hf.ContinuationFrame] * 2
    assert ["END_HEADERS" in fr.flags for fr in frames] == [False, False, True]
    assert peer.decoder.decode(b"".join(fr.data for fr in frames), raw=True) == big


def test_reset_of_unknown_stream() -> None:
    codec, _ = server()
    with pytest.raises(CodecStreamClosedError):
        codec.reset_stream(9, 8)
