"""The downstream HTTP/2 connection on a fake transport: requests reset within their read are
never routed (and their bytes' credit goes back), and a large read is parsed over several
turns of the loop with reading paused meanwhile."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import hyperframe.frame as hf
import pytest

from sidecar.codec import H2Codec
from sidecar.codec.frames import PREFACE
from sidecar.http.h2conn import H2_CODEC
from sidecar.listen.listener import H2ServerConnection
from sidecar.stats import Scope
from tests.codec.factory import REQUEST, Peer
from tests.support import simple_config
from tests.unit.sidecar_fakes import listener_for

lean_only = pytest.mark.skipif(H2_CODEC == "h2", reason="PILOTFISH_H2_CODEC=h2")


class Transport:
    def __init__(self) -> None:
        self.written = b""
        self.reading = True
        self.pauses = 0

    def write(self, data: bytes) -> None:
        self.written += bytes(data)

    def writelines(self, chunks: list[Any]) -> None:
        self.written += b"".join(bytes(c) for c in chunks)

    def set_write_buffer_limits(self, high: int) -> None:
        pass

    def pause_reading(self) -> None:
        self.pauses += self.reading
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        pass

    abort = close


def _connection(**limits: Any) -> tuple[H2ServerConnection, Transport, list[Any], Scope]:
    listener = listener_for(simple_config(["127.0.0.1:1"], extra_listener={"limits": limits}))
    routed: list[Any] = []

    def new_exchange(stream: Any) -> Any:
        routed.append(stream)
        raise AssertionError("routed")

    listener.new_exchange = new_exchange  # type: ignore[method-assign,assignment]
    conn = H2ServerConnection(listener)
    transport = Transport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport, routed, listener.scope


def rst(sid: int) -> bytes:
    return struct.pack(">BHBBL", 0, 4, 3, 0, sid) + struct.pack(">L", 8)


@lean_only
def test_a_request_reset_in_its_own_read_is_never_routed_and_its_bytes_are_credited() -> None:
    acked: list[tuple[int, int]] = []

    async def run() -> tuple[H2Codec, list[Any], Scope]:
        conn, _, routed, scope = _connection()
        codec = conn.h2
        acknowledge = codec.acknowledge_received_data

        def recorded(size: int, stream_id: int) -> None:
            acked.append((size, stream_id))
            acknowledge(size, stream_id)

        codec.acknowledge_received_data = recorded  # type: ignore[method-assign,assignment]
        peer = Peer()
        post = [(b":method", b"POST"), *REQUEST[1:]]
        conn.data_received(
            PREFACE + peer.settings() + peer.headers(1, post) + peer.data(1, b"x" * 1000) + rst(1)
        )
        return conn.h2, routed, scope  # type: ignore[return-value]

    codec, routed, scope = asyncio.run(run())
    assert routed == []
    assert scope.counters["http2.reset_before_routing"] == 1
    assert acked == [(1000, 1)]  # the connection window gets the bytes back
    if H2_CODEC == "python":
        assert codec._recv_processed == 1000


@lean_only
def test_a_large_read_is_parsed_over_several_turns_with_reading_paused() -> None:
    async def run() -> tuple[Transport, list[int]]:
        conn, transport, _, _ = _connection(control_frame_burst=5000)
        ping = struct.pack(">BHBBL", 0, 8, 6, 0, 0) + b"12345678"
        acks: list[int] = []
        conn.data_received(PREFACE + Peer().settings() + ping * 2500)
        for _ in range(4):
            acks.append(sum(isinstance(f, hf.PingFrame) for f in Peer().parse(transport.written)))
            await asyncio.sleep(0)
        return transport, acks

    transport, acks = asyncio.run(run())
    assert acks[0] < 2500  # not all at once: other connections run in between
    assert acks[-1] == 2500
    assert transport.pauses == 1 and transport.reading
