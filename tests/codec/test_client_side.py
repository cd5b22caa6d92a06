"""The lean codec as a client (the sidecar's upstream side)."""

from __future__ import annotations

import hyperframe.frame as hf
import pytest

from sidecar.codec import (
    CodecProtocolError,
    CodecStreamClosedError,
    DataReceived,
    ResponseReceived,
    StreamReset,
    TrailersReceived,
)
from sidecar.codec.errors import CodecUsageError
from sidecar.codec.frames import PREFACE
from tests.codec.factory import REQUEST, RESPONSE, Peer, client, new_codec


def test_initiate_sends_the_preface_and_settings() -> None:
    codec = new_codec(client_side=True, initial_window_size=1 << 18, max_concurrent_streams=100)
    codec.initiate_connection()
    codec.increment_flow_control_window(1 << 20)
    data = codec.data_to_send()
    assert data.startswith(PREFACE)
    settings, update = Peer().parse(data)
    assert isinstance(settings, hf.SettingsFrame) and settings.settings[4] == 1 << 18
    assert isinstance(update, hf.WindowUpdateFrame) and update.window_increment == 1 << 20


def test_request_and_response_with_trailers() -> None:
    codec, peer = client()
    sid = codec.get_next_available_stream_id()
    assert sid == 1
    codec.send_headers(sid, REQUEST, end_stream=True)
    assert codec.get_next_available_stream_id() == 3
    (headers,) = peer.parse(codec.data_to_send())
    assert peer.decode(headers) == REQUEST and "END_STREAM" in headers.flags
    events = codec.receive_data(
        peer.headers(1, [(b":status", b"100")])
        + peer.headers(1, RESPONSE)
        + peer.data(1, b"body")
        + peer.headers(1, [(b"grpc-status", b"0")], end_stream=True)
    )
    assert [type(e) for e in events] == [ResponseReceived, DataReceived, TrailersReceived]
    response = events[0]
    assert isinstance(response, ResponseReceived)
    assert response.headers == RESPONSE and response.stream_ended is None
    assert codec.streams.get(1) is None


def test_response_ending_the_stream() -> None:
    codec, peer = client()
    codec.send_headers(1, REQUEST, end_stream=True)
    (event,) = codec.receive_data(peer.headers(1, RESPONSE, end_stream=True))
    assert isinstance(event, ResponseReceived) and event.stream_ended is True


@pytest.mark.parametrize(
    "headers",
    [
        [(b"content-type", b"x")],
        [(b":status", b"2000")],
        [(b":status", b"200"), (b":path", b"/")],
        [(b":status", b"200"), (b"Content-Type", b"x")],
        [(b":status", b"200"), (b"connection", b"close")],
    ],
)
def test_malformed_responses_reset_the_stream(headers: list[tuple[bytes, bytes]]) -> None:
    codec, peer = client()
    codec.send_headers(1, REQUEST, end_stream=True)
    codec.data_to_send()
    (event,) = codec.receive_data(peer.headers(1, headers))
    assert isinstance(event, StreamReset) and event.error_code == 1
    (rst,) = peer.parse(codec.data_to_send())
    assert isinstance(rst, hf.RstStreamFrame) and rst.error_code == 1


def test_pseudo_headers_in_trailers_reset_the_stream() -> None:
    codec, peer = client()
    codec.send_headers(1, REQUEST, end_stream=True)
    codec.receive_data(peer.headers(1, RESPONSE))
    (event,) = codec.receive_data(peer.headers(1, [(b":status", b"200")], end_stream=True))
    assert isinstance(event, StreamReset)


def test_headers_on_a_stream_we_never_opened() -> None:
    codec, peer = client()
    with pytest.raises(CodecProtocolError):
        codec.receive_data(peer.headers(2, RESPONSE))
    codec, peer = client()
    with pytest.raises(CodecProtocolError):
        codec.receive_data(peer.headers(1, RESPONSE))


def test_stream_ids_must_be_used_in_order() -> None:
    codec, _ = client()
    with pytest.raises(CodecStreamClosedError):
        codec.send_headers(3, REQUEST)


def test_peer_stream_limit() -> None:
    codec, peer = client()
    codec.receive_data(peer.settings(max_concurrent_streams=1))
    assert codec.remote_settings.max_concurrent_streams == 1
    codec.send_headers(1, REQUEST)
    with pytest.raises(CodecUsageError):
        codec.send_headers(3, REQUEST)


def test_frame_size_and_header_table_size_from_the_peer() -> None:
    codec, peer = client()
    codec.receive_data(peer.settings(max_frame_size=32768, header_table_size=0))
    assert codec.max_outbound_frame_size == 32768
    codec.data_to_send()
    codec.send_headers(1, REQUEST)
    (headers,) = peer.parse(codec.data_to_send())
    peer.decoder.max_allowed_table_size = 0
    assert peer.decode(headers) == REQUEST
    assert headers.data[:1] == b"\x20"  # the block starts with a table size update to 0


def test_repeated_requests_reuse_the_cached_block() -> None:
    codec, peer = client()
    blocks = []
    for sid in (1, 3, 5):
        codec.send_headers(sid, [*REQUEST, (b"x-a", b"1")], end_stream=True)
        (frame,) = peer.parse(codec.data_to_send())
        assert peer.decode(frame) == [*REQUEST, (b"x-a", b"1")]
        blocks.append(frame.data)
    assert blocks[1] == blocks[2] and blocks[0] != blocks[1]


def test_rst_stream_refused() -> None:
    codec, _peer = client()
    codec.send_headers(1, REQUEST, end_stream=True)
    (event,) = codec.receive_data(bytes(hf.RstStreamFrame(1, error_code=7).serialize()))
    assert isinstance(event, StreamReset) and event.error_code == 7
