"""The codec's I/O buffers: reads into the shared receive buffer, large frames, and output for
``writelines`` that does not copy large payloads."""

from __future__ import annotations

import hyperframe.frame as hf
import pytest

from sidecar.codec import (
    CodecProtocolError,
    DataReceived,
    H2Codec,
    RequestReceived,
)
from sidecar.codec.connection import WRITEV_MIN
from sidecar.codec.errors import CodecUsageError
from sidecar.codec.frames import PREFACE
from tests.codec.factory import REQUEST, RESPONSE, Peer, client, server

BIG_WINDOW = 1 << 20


def read(codec: H2Codec, data: bytes) -> list[object]:
    """Deliver ``data`` as one socket read would: into the buffer ``get_buffer`` lends."""
    room = codec.get_buffer(len(data))
    assert len(room) >= len(data)
    room[: len(data)] = data
    return list(codec.buffer_updated(len(data)))


def test_a_frame_cut_across_reads_waits_for_its_end() -> None:
    peer = Peer()
    wire = peer.headers(1, REQUEST) + peer.data(1, b"x" * 1000, end_stream=True)
    for cut in (1, 8, 9, 10, len(wire) - 1):
        codec, _ = server()
        first = read(codec, wire[:cut])
        rest = read(codec, wire[cut:])
        assert [type(e) for e in first + rest] == [RequestReceived, DataReceived]
        data = (first + rest)[1]
        assert isinstance(data, DataReceived) and data.data == b"x" * 1000


def test_connections_of_one_thread_share_the_buffer_without_mixing_their_input() -> None:
    a, peer_a = server()
    b, peer_b = server()
    wire_a = peer_a.headers(1, REQUEST) + peer_a.data(1, b"a" * 5000, end_stream=True)
    wire_b = peer_b.headers(1, REQUEST) + peer_b.data(1, b"b" * 7000, end_stream=True)
    events = read(a, wire_a[:3000])  # a's DATA frame is cut off and kept
    events += read(b, wire_b)  # b's read lands in the same buffer meanwhile
    events += read(a, wire_a[3000:])
    payloads = [e.data for e in events if isinstance(e, DataReceived)]
    assert payloads == [b"b" * 7000, b"a" * 5000]


def test_a_lent_buffer_never_filled_loses_nothing() -> None:
    codec, peer = server()
    wire = peer.headers(1, REQUEST) + peer.data(1, b"z" * 300, end_stream=True)
    assert [type(e) for e in read(codec, wire[:100])] == [RequestReceived]
    codec.get_buffer(-1)  # a read that found nothing (EAGAIN): no buffer_updated follows
    other, other_peer = server()
    read(other, other_peer.headers(1, REQUEST))
    (event,) = read(codec, wire[100:])
    assert isinstance(event, DataReceived) and event.data == b"z" * 300


def test_payloads_do_not_refer_to_the_shared_buffer() -> None:
    codec, peer = server()
    events = read(codec, peer.headers(1, REQUEST) + peer.data(1, b"keep", end_stream=True))
    read(codec, bytes(hf.PingFrame(0, opaque_data=b"\xff" * 8).serialize()))
    data = events[1]
    assert isinstance(data, DataReceived) and data.data == b"keep" and type(data.data) is bytes


def test_larger_frames_when_announced() -> None:
    codec = H2Codec(client_side=False, initial_window_size=BIG_WINDOW, max_frame_size=1 << 16)
    codec.initiate_connection()
    peer = Peer()
    (settings,) = peer.parse(codec.data_to_send())
    assert settings.settings[5] == 1 << 16
    codec.receive_data(PREFACE + peer.settings() + peer.headers(1, REQUEST))
    codec.increment_flow_control_window(BIG_WINDOW)
    (event,) = codec.receive_data(peer.data(1, b"q" * (1 << 16)))
    assert isinstance(event, DataReceived) and len(event.data) == 1 << 16
    with pytest.raises(CodecProtocolError) as info:
        codec.receive_data(peer.data(1, b"q" * ((1 << 16) + 1)))
    assert info.value.error_code == 6  # FRAME_SIZE_ERROR


def test_default_frame_size_is_not_announced_and_is_enforced() -> None:
    codec, peer = server(initial_window_size=BIG_WINDOW)
    codec.receive_data(peer.headers(1, REQUEST))
    with pytest.raises(CodecProtocolError) as info:
        codec.receive_data(peer.data(1, b"q" * 16385))
    assert info.value.error_code == 6


def test_announced_frame_size_is_bounded() -> None:
    with pytest.raises(CodecUsageError):
        H2Codec(client_side=False, max_frame_size=1 << 20)


def _window_opened(codec: H2Codec, peer: Peer) -> None:
    """The peer gives a large window to the connection and every new stream."""
    codec.receive_data(
        peer.settings(initial_window_size=BIG_WINDOW)
        + bytes(hf.WindowUpdateFrame(0, window_increment=BIG_WINDOW).serialize())
    )
    codec.data_to_send()


def test_data_larger_than_the_peers_frame_size_is_split() -> None:
    codec, peer = client()
    _window_opened(codec, peer)
    codec.send_headers(1, REQUEST)
    codec.data_to_send()
    body = bytes(range(256)) * 160  # 40,960 bytes
    codec.send_data(1, body, end_stream=True)
    frames = peer.parse(codec.data_to_send())
    assert [len(fr.data) for fr in frames] == [16384, 16384, 8192]
    assert ["END_STREAM" in fr.flags for fr in frames] == [False, False, True]
    assert b"".join(fr.data for fr in frames) == body
    assert codec.local_flow_control_window(1) == BIG_WINDOW - len(body)


def test_output_keeps_large_payloads_as_they_are() -> None:
    codec, peer = server()
    _window_opened(codec, peer)
    codec.receive_data(peer.headers(1, REQUEST, end_stream=True))
    codec.data_to_send()
    payload = b"p" * WRITEV_MIN
    codec.send_headers(1, RESPONSE)
    codec.send_data(1, payload)
    codec.send_data(1, b"tail", end_stream=True)
    chunks = codec.take_output()
    assert len(chunks) == 3
    assert chunks[1] is payload  # not copied
    frames = peer.parse(b"".join(chunks))
    assert [type(fr) for fr in frames] == [hf.HeadersFrame, hf.DataFrame, hf.DataFrame]
    assert frames[1].data == payload and frames[2].data == b"tail"
    assert codec.take_output() == []


def test_output_of_small_frames_is_one_block() -> None:
    codec, peer = server()
    codec.receive_data(peer.headers(1, REQUEST, end_stream=True))
    codec.data_to_send()
    codec.send_headers(1, RESPONSE)
    codec.send_data(1, b"small", end_stream=True)
    (block,) = codec.take_output()
    assert isinstance(block, bytes)
    headers, data = peer.parse(block)
    assert isinstance(headers, hf.HeadersFrame) and data.data == b"small"


def test_split_payloads_are_views_of_the_data_not_copies() -> None:
    codec, peer = client()
    _window_opened(codec, peer)
    codec.send_headers(1, REQUEST)
    codec.take_output()
    body = b"v" * 40000
    codec.send_data(1, body)
    chunks = codec.take_output()
    views = [c for c in chunks if isinstance(c, memoryview)]
    assert [len(v) for v in views] == [16384, 16384, 7232]
    assert all(v.obj is body for v in views)
