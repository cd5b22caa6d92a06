"""Frames built with hyperframe and hpack, and our output parsed back with them."""

from __future__ import annotations

from typing import Any

import hpack
import hyperframe.frame as hf

from sidecar.codec import H2Codec
from sidecar.codec.frames import PREFACE

REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"t"), (b":path", b"/")]
RESPONSE = [(b":status", b"200"), (b"content-type", b"text/plain")]


class Peer:
    """The other end of the connection: encodes frames for the codec and decodes its output."""

    def __init__(self) -> None:
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()

    def settings(self, **values: int) -> bytes:
        frame = hf.SettingsFrame(0)
        codes = {
            "initial_window_size": 4,
            "max_concurrent_streams": 3,
            "max_frame_size": 5,
            "header_table_size": 1,
            "enable_push": 2,
        }
        frame.settings = {codes[k]: v for k, v in values.items()}
        return bytes(frame.serialize())

    def settings_ack(self) -> bytes:
        return bytes(hf.SettingsFrame(0, flags=["ACK"]).serialize())

    def headers(
        self, sid: int, headers: list[tuple[bytes, bytes]], end_stream: bool = False, **kw: Any
    ) -> bytes:
        frame = hf.HeadersFrame(sid)
        frame.data = self.encoder.encode(headers)
        frame.flags.add("END_HEADERS")
        if end_stream:
            frame.flags.add("END_STREAM")
        for key, value in kw.items():
            setattr(frame, key, value)
        return bytes(frame.serialize())

    def data(self, sid: int, data: bytes, end_stream: bool = False, pad: int = 0) -> bytes:
        frame = hf.DataFrame(sid)
        frame.data = data
        if end_stream:
            frame.flags.add("END_STREAM")
        if pad:
            frame.flags.add("PADDED")
            frame.pad_length = pad
        return bytes(frame.serialize())

    def parse(self, data: bytes) -> list[Any]:
        if data.startswith(PREFACE):
            data = data[len(PREFACE) :]
        frames: list[Any] = []
        while data:
            frame, length = hf.Frame.parse_frame_header(memoryview(data[:9]))
            frame.parse_body(memoryview(data[9 : 9 + length]))
            frames.append(frame)
            data = data[9 + length :]
        return frames

    def decode(self, frame: Any) -> list[tuple[bytes, bytes]]:
        return list(self.decoder.decode(frame.data, raw=True))


class _UnderTest:
    """Which codec ``new_codec``, ``server`` and ``client`` make: set per test by the
    ``codec_impl`` fixture (tests/codec/conftest.py), so the conformance suite runs on each."""

    name = "python"
    codec_class: Any = H2Codec


under_test = _UnderTest()


def new_codec(**kw: Any) -> H2Codec:
    codec: H2Codec = under_test.codec_class(**kw)
    return codec


def on_ngh2() -> bool:
    return under_test.name == "ngh2"


def server(**kw: Any) -> tuple[H2Codec, Peer]:
    """A server codec that has seen the client preface and SETTINGS; its output drained.
    libnghttp2 applies its own SETTINGS only once acknowledged: that codec gets the ACK too."""
    codec = new_codec(client_side=False, **kw)
    codec.initiate_connection()
    peer = Peer()
    ack = peer.settings_ack() if on_ngh2() else b""
    codec.receive_data(PREFACE + peer.settings() + ack)
    codec.data_to_send()
    return codec, peer


def client(**kw: Any) -> tuple[H2Codec, Peer]:
    codec = new_codec(client_side=True, **kw)
    codec.initiate_connection()
    peer = Peer()
    ack = peer.settings_ack() if on_ngh2() else b""
    codec.receive_data(peer.settings() + ack)
    codec.data_to_send()
    return codec, peer
