"""ngh2's events delivered straight to a sink: one call each, in order, with the codec's stream
state already updated, and requests reset in the read that opened them withheld on request."""

from __future__ import annotations

import struct
from typing import Any

from sidecar.codec import DataReceived, RequestReceived
from sidecar.codec.errors import CANCEL, PROTOCOL_ERROR
from sidecar.codec.frames import PREFACE
from sidecar.codec.ngh2_codec import Ngh2Codec
from tests.codec.factory import REQUEST, RESPONSE, Peer

POST = [(b":method", b"POST"), *REQUEST[1:]]


class RecordingSink:
    """Each call as a tuple; ``open_at_delivery`` says whether the codec still had the stream."""

    def __init__(self, codec: Ngh2Codec) -> None:
        self.codec = codec
        self.calls: list[tuple[Any, ...]] = []
        self.open_at_delivery: list[bool] = []

    def on_request_received(self, stream_id: int, headers: Any, end_stream: bool) -> None:
        self.calls.append(("request", stream_id, end_stream))

    def on_response_received(self, stream_id: int, headers: Any, end_stream: bool) -> None:
        self.calls.append(("response", stream_id, end_stream))

    def on_data_received(self, stream_id: int, data: bytes, flow: int, end_stream: bool) -> None:
        self.calls.append(("data", stream_id, data, end_stream))
        self.open_at_delivery.append(stream_id in self.codec.streams)

    def on_trailers_received(self, stream_id: int, headers: Any) -> None:
        self.calls.append(("trailers", stream_id))
        self.open_at_delivery.append(stream_id in self.codec.streams)

    def on_stream_reset(self, stream_id: int, error_code: int, remote_reset: bool) -> None:
        self.calls.append(("reset", stream_id, error_code, remote_reset))

    def on_window_updated(self, stream_id: int, delta: int) -> None:
        self.calls.append(("window", stream_id, delta))

    def on_settings_received(self, changed_settings: dict[int, int]) -> None:
        self.calls.append(("settings",))

    def on_goaway_received(self, error_code: int, last_stream_id: int, data: Any) -> None:
        self.calls.append(("goaway", error_code, last_stream_id))

    def on_request_withdrawn(self, stream_id: int) -> None:
        self.calls.append(("withdrawn", stream_id))

    def on_last_message(self) -> None:
        self.calls.append(("last",))


def rst(sid: int, code: int = CANCEL) -> bytes:
    return struct.pack(">BHBBL", 0, 4, 3, 0, sid) + struct.pack(">L", code)


def attached_server(screen_resets: bool = False) -> tuple[Ngh2Codec, Peer, RecordingSink]:
    codec = Ngh2Codec(client_side=False)
    sink = RecordingSink(codec)
    codec.sink = sink
    codec.screen_resets = screen_resets
    codec.initiate_connection()
    peer = Peer()
    codec.receive_data(PREFACE + peer.settings() + peer.settings_ack())
    codec.data_to_send()
    sink.calls.clear()
    return codec, peer, sink


def test_events_go_to_the_sink_in_order_and_none_are_returned() -> None:
    codec, peer, sink = attached_server()
    read = peer.headers(1, POST) + peer.data(1, b"abc", end_stream=True)
    read += peer.headers(3, REQUEST, end_stream=True)
    assert codec.receive_data(read) == []
    assert sink.calls == [
        ("request", 1, False),
        ("data", 1, b"abc", True),
        ("last",),  # announced before the read's last request or response event only
        ("request", 3, True),
    ]


def test_a_stream_that_ends_is_gone_from_the_codec_before_its_owner_hears_of_it() -> None:
    codec, peer, sink = attached_server()
    codec.receive_data(peer.headers(1, POST))
    codec.send_headers(1, RESPONSE)
    codec.send_data(1, b"done", end_stream=True)
    codec.receive_data(peer.data(1, b"x", end_stream=False))
    codec.receive_data(peer.data(1, b"y", end_stream=True))
    assert sink.open_at_delivery == [True, False]
    assert 1 not in codec.streams


def test_a_request_reset_in_its_own_read_is_withheld_and_its_bytes_credited() -> None:
    codec, peer, sink = attached_server(screen_resets=True)
    read = peer.headers(1, POST) + peer.headers(3, POST) + peer.data(1, b"x" * 1000)
    read += peer.data(3, b"y", end_stream=True) + rst(1)
    codec.receive_data(read)
    assert sink.calls == [
        ("withdrawn", 1),
        ("request", 3, False),
        ("last",),
        ("data", 3, b"y", True),
    ]
    assert codec.streams_reset == 1  # counted and charged as any reset, only not delivered
    assert 1 not in codec.streams
    assert codec.progress_mark(3) is not None


def test_a_reset_of_a_stream_from_an_earlier_read_is_delivered() -> None:
    codec, peer, sink = attached_server(screen_resets=True)
    codec.receive_data(peer.headers(1, POST))
    codec.receive_data(peer.headers(3, REQUEST, end_stream=True) + rst(1))
    assert sink.calls == [
        ("last",),
        ("request", 1, False),
        ("last",),
        ("request", 3, True),
        ("reset", 1, CANCEL, True),
    ]


def test_a_request_libnghttp2_resets_for_its_content_length_in_the_same_read_is_withheld() -> None:
    codec, peer, sink = attached_server(screen_resets=True)
    post = [*POST, (b"content-length", b"2")]
    codec.receive_data(peer.headers(1, post) + peer.data(1, b"too long", end_stream=True))
    assert sink.calls == [("last",), ("withdrawn", 1)]
    assert 1 not in codec.streams


def test_without_screening_the_same_read_is_delivered_as_it_came() -> None:
    codec, peer, sink = attached_server(screen_resets=False)
    post = [*POST, (b"content-length", b"2")]
    codec.receive_data(peer.headers(1, post) + peer.data(1, b"too long", end_stream=True))
    assert sink.calls == [("last",), ("request", 1, False), ("reset", 1, PROTOCOL_ERROR, False)]


def test_unattached_the_codec_returns_event_objects() -> None:
    codec = Ngh2Codec(client_side=False)
    codec.initiate_connection()
    peer = Peer()
    codec.receive_data(PREFACE + peer.settings() + peer.settings_ack())
    events = codec.receive_data(peer.headers(1, POST) + peer.data(1, b"q", end_stream=True))
    assert [type(e) for e in events] == [RequestReceived, DataReceived]
    assert codec.receive_data(b"") == []


def test_a_read_that_fills_the_receive_buffer_announces_no_last_message() -> None:
    # Another read follows a full one at once: announcing its last message would write that
    # stream's connection early and split the burst's writes in two.
    codec = Ngh2Codec(client_side=False, initial_window_size=1 << 20)
    sink = RecordingSink(codec)
    codec.sink = sink
    codec.initiate_connection()
    codec.increment_flow_control_window(1 << 20)
    peer = Peer()
    codec.receive_data(PREFACE + peer.settings() + peer.settings_ack())
    sink.calls.clear()
    body = [peer.data(1, b"x" * 16384, end_stream=(i == 19)) for i in range(20)]
    burst = peer.headers(1, POST) + b"".join(body) + peer.headers(3, REQUEST, end_stream=True)
    assert len(burst) > len(codec.get_buffer())  # two reads: a full one, then the rest
    codec.receive_data(burst)
    assert sink.calls.count(("last",)) == 1
    assert sink.calls[-2:] == [("last",), ("request", 3, True)]
