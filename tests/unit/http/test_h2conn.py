"""Two HTTP/2 connections relaying a response, on recording transports: when frames are
written, and how (one block, or large payloads by ``writelines``)."""

from __future__ import annotations

import asyncio
import importlib.util
import os
from typing import Any

import hyperframe.frame as hf
import pytest

from sidecar.codec.frames import PREFACE
from sidecar.http import h2conn
from sidecar.http.h2conn import H2_CODEC, H2Connection, H2Stream
from sidecar.http.streams import Headers, OnSent, ResetReason
from tests.codec.factory import REQUEST, RESPONSE, Peer

WINDOW = 1 << 20
TRAILERS = [(b"grpc-status", b"0")]
# Early writes and writes without joining are the lean codec's (the h2 library's output is bytes).
# The write batching these tests check is the adapter's with ngh2 and with our codec; the h2
# library fallback has no early write.
not_h2_library = pytest.mark.skipif(H2_CODEC == "h2", reason="PILOTFISH_H2_CODEC=h2")


class RecordingTransport:
    """Each ``write`` or ``writelines`` call is one entry of ``writes``, as its chunks."""

    def __init__(self) -> None:
        self.writes: list[list[bytes]] = []

    def write(self, data: bytes) -> None:
        self.writes.append([bytes(data)])

    def writelines(self, chunks: list[Any]) -> None:
        self.writes.append([bytes(chunk) for chunk in chunks])

    def wire(self) -> bytes:
        return b"".join(b"".join(chunks) for chunks in self.writes)

    def close(self) -> None:
        pass

    abort = close


class Relay:
    """Forwards an upstream stream to a downstream one, as the router does, and notes how many
    writes the downstream transport had when each message ended (its bookkeeping starts)."""

    def __init__(self, downstream: H2Stream, transport: RecordingTransport) -> None:
        self.downstream = downstream
        self.transport = transport
        self.writes_at_end: list[int] = []

    def on_headers(self, headers: Headers, end_stream: bool) -> None:
        self.downstream.send_headers(headers, end_stream)
        if end_stream:
            self.writes_at_end.append(len(self.transport.writes))

    def on_data(self, data: bytes, flow_len: int, end_stream: bool) -> None:
        on_sent: OnSent = None
        self.downstream.send_data(data, end_stream, on_sent)
        if end_stream:
            self.writes_at_end.append(len(self.transport.writes))

    def on_trailers(self, trailers: Headers) -> None:
        self.downstream.send_trailers(trailers)
        self.writes_at_end.append(len(self.transport.writes))

    def on_reset(self, reason: ResetReason, code: int) -> None:
        pass


class Proxy:
    """A downstream connection with requests on ``stream_ids``, each relayed from an upstream
    stream of the same id whose request has been sent."""

    def __init__(self, stream_ids: list[int]) -> None:
        windows: dict[str, Any] = {"stream_window": WINDOW, "connection_window": WINDOW}
        self.down = H2Connection(client_side=False, max_concurrent_streams=10, **windows)
        self.up = H2Connection(client_side=True, max_concurrent_streams=10, **windows)
        self.down_transport, self.up_transport = RecordingTransport(), RecordingTransport()
        self.down.connection_made(self.down_transport)  # type: ignore[arg-type]
        self.up.connection_made(self.up_transport)  # type: ignore[arg-type]
        self.client, self.server = Peer(), Peer()
        # The peers acknowledge our SETTINGS, as real ones do before relying on them
        # (libnghttp2 holds to the defaults until then).
        self.down.data_received(
            PREFACE
            + self.client.settings(initial_window_size=WINDOW)
            + self.client.settings_ack()
            + b"".join(self.client.headers(sid, REQUEST, end_stream=True) for sid in stream_ids)
        )
        self.up.data_received(
            self.server.settings(initial_window_size=WINDOW) + self.server.settings_ack()
        )
        self.relays: dict[int, Relay] = {}
        for sid in stream_ids:
            downstream = H2Stream(self.down, sid, None)
            self.down.streams[sid] = downstream
            relay = self.relays[sid] = Relay(downstream, self.down_transport)
            upstream = H2Stream(self.up, sid, relay)
            self.up.streams[sid] = upstream
            upstream.send_headers(REQUEST, end_stream=True)
        self.down_transport.writes.clear()

    def response(self, sid: int, body: bytes = b"body") -> bytes:
        server = self.server
        return (
            server.headers(sid, RESPONSE)
            + server.data(sid, body)
            + server.headers(sid, TRAILERS, end_stream=True)
        )

    def frames_to_client(self) -> list[Any]:
        return self.client.parse(self.down_transport.wire())


def run(scenario: Any) -> Any:
    return asyncio.run(scenario())


@not_h2_library
def test_a_response_ending_a_read_is_written_before_its_bookkeeping() -> None:
    async def scenario() -> Proxy:
        proxy = Proxy([1])
        proxy.up.data_received(proxy.response(1))
        await asyncio.sleep(0)
        return proxy

    proxy = run(scenario)
    assert proxy.relays[1].writes_at_end == [1]  # written by then, in one write
    assert len(proxy.down_transport.writes) == 1  # and nothing was left for a second one
    frames = proxy.frames_to_client()
    assert [type(fr) for fr in frames] == [hf.HeadersFrame, hf.DataFrame, hf.HeadersFrame]
    assert "END_STREAM" in frames[2].flags


@not_h2_library
def test_an_early_write_leaves_no_flush_callback_behind() -> None:
    flushes: list[int] = []

    async def scenario() -> Proxy:
        proxy = Proxy([1])
        down = proxy.down
        real_flush = down.flush

        def counted_flush() -> None:
            flushes.append(len(proxy.down_transport.writes))
            real_flush()

        down.flush = counted_flush  # type: ignore[method-assign]
        proxy.up.data_received(proxy.response(1))
        written_by_the_read = len(flushes)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert len(flushes) == written_by_the_read  # the loop ran no flush of its own
        return proxy

    proxy = run(scenario)
    # The response's headers asked for a flush callback; the trailers' early write made it
    # redundant, and it was cancelled.
    assert len(flushes) == 1
    assert len(proxy.down_transport.writes) == 1


@not_h2_library
def test_trailers_wait_behind_data_that_waits_for_window() -> None:
    body = b"x" * 1000

    async def scenario() -> tuple[Proxy, int]:
        proxy = Proxy([1])
        # The client's stream window allows 100 bytes: the rest of the body waits, and the
        # trailers behind it.
        proxy.down.data_received(proxy.client.settings(initial_window_size=100))
        proxy.up.data_received(proxy.response(1, body))
        await asyncio.sleep(0)
        sent_before_window = sum(
            len(fr.data) for fr in proxy.frames_to_client() if isinstance(fr, hf.DataFrame)
        )
        window_update = hf.WindowUpdateFrame(1, window_increment=10_000)
        proxy.down.data_received(bytes(window_update.serialize()))
        await asyncio.sleep(0)
        return proxy, sent_before_window

    proxy, sent_before_window = run(scenario)
    assert sent_before_window == 100
    frames = [fr for fr in proxy.frames_to_client() if fr.stream_id == 1]
    assert b"".join(fr.data for fr in frames if isinstance(fr, hf.DataFrame)) == body
    assert isinstance(frames[-1], hf.HeadersFrame) and "END_STREAM" in frames[-1].flags
    assert [type(fr) for fr in frames].count(hf.HeadersFrame) == 2  # headers, then trailers


@not_h2_library
def test_responses_finished_by_one_read_still_leave_together() -> None:
    async def scenario() -> Proxy:
        proxy = Proxy([1, 3])
        proxy.up.data_received(proxy.response(1) + proxy.response(3))
        await asyncio.sleep(0)
        return proxy

    proxy = run(scenario)
    # The first end is not the read's last message: it waits to share the second's write.
    assert proxy.relays[1].writes_at_end == [0]
    assert proxy.relays[3].writes_at_end == [1]
    assert len(proxy.down_transport.writes) == 1
    ends = [fr.stream_id for fr in proxy.frames_to_client() if "END_STREAM" in fr.flags]
    assert ends == [1, 3]


@not_h2_library
def test_a_message_ending_mid_read_is_written_after_the_read() -> None:
    async def scenario() -> tuple[Proxy, int]:
        proxy = Proxy([1, 3])
        server = proxy.server
        # Stream 1 ends; stream 3's response starts later in the same read but does not end.
        proxy.up.data_received(proxy.response(1) + server.headers(3, RESPONSE))
        written_by_the_read = len(proxy.down_transport.writes)
        await asyncio.sleep(0)
        return proxy, written_by_the_read

    proxy, written_by_the_read = run(scenario)
    assert proxy.relays[1].writes_at_end == [0]
    assert written_by_the_read == 0  # left to the loop callback, with stream 3's headers
    assert len(proxy.down_transport.writes) == 1
    assert [fr.stream_id for fr in proxy.frames_to_client()] == [1, 1, 1, 3]


def test_large_payloads_are_written_without_being_joined(monkeypatch: pytest.MonkeyPatch) -> None:
    # Our codec's output path (libnghttp2 serializes frames into one buffer of its own).
    monkeypatch.setattr(h2conn, "H2_CODEC", "python")
    body = bytes(range(256)) * 128  # 32 KiB: two DATA frames of 16 KiB towards the client

    async def scenario() -> Proxy:
        proxy = Proxy([1])
        server = proxy.server
        proxy.up.data_received(
            server.headers(1, RESPONSE)
            + server.data(1, body[:16384])
            + server.data(1, body[16384:], end_stream=True)
        )
        await asyncio.sleep(0)
        return proxy

    proxy = run(scenario)
    (chunks,) = proxy.down_transport.writes
    assert [len(chunk) for chunk in chunks if len(chunk) >= 4096] == [16384, 16384]
    frames = proxy.frames_to_client()
    assert b"".join(fr.data for fr in frames if isinstance(fr, hf.DataFrame)) == body


def test_bytes_read_before_the_hand_over_are_parsed_like_reads() -> None:
    async def scenario() -> list[Any]:
        conn = H2Connection(
            client_side=False, stream_window=WINDOW, connection_window=WINDOW,
            max_concurrent_streams=10,
        )  # fmt: skip
        transport = RecordingTransport()
        conn.connection_made(transport)  # type: ignore[arg-type]
        client = Peer()
        wire = PREFACE + client.settings() + client.headers(1, REQUEST)
        conn.data_received(wire[:30])  # what protocol detection had read
        room = conn.get_buffer(-1)
        rest = wire[30:]
        room[: len(rest)] = rest
        conn.buffer_updated(len(rest))
        return client.parse(transport.wire())

    frames = run(scenario)
    # Our SETTINGS and WINDOW_UPDATE, then the ACK of the client's SETTINGS.
    assert [type(fr) for fr in frames] == [hf.SettingsFrame, hf.WindowUpdateFrame, hf.SettingsFrame]
    assert "ACK" in frames[2].flags


@pytest.mark.xfail(
    H2_CODEC == "h2",
    strict=True,
    reason="BUG: the h2 library's HPACK encoder Huffman-codes every literal value",
)
def test_large_header_values_are_sent_as_plain_literals() -> None:
    # Huffman coding in pure Python takes time quadratic in the value's length: measured on the
    # h2 library's encoder, a 40 KB value cost the event loop about 0.3 s per hop, stalling every
    # stream of the sidecar. Tokens and -bin metadata are unique, so no table entry helps.
    # A plain literal is the value's own bytes on the wire.
    value = os.urandom(20_000).hex().encode()

    async def scenario() -> Proxy:
        proxy = Proxy([1])
        proxy.up.data_received(
            proxy.server.headers(1, [*RESPONSE, (b"x-blob", value)])
            + proxy.server.headers(1, TRAILERS, end_stream=True)
        )
        await asyncio.sleep(0)
        return proxy

    proxy = run(scenario)
    blocks = (hf.HeadersFrame, hf.ContinuationFrame)
    fragments = [fr.data for fr in proxy.frames_to_client() if isinstance(fr, blocks)]
    if H2_CODEC == "ngh2":
        # libnghttp2's Huffman coder is C and linear: coding the value costs nothing notable.
        frame = hf.HeadersFrame(1)
        frame.data = b"".join(fragments)
        assert (b"x-blob", value) in proxy.client.decode(frame)
    else:
        assert value in b"".join(fragments)


def test_codec_choice_defaults_to_ngh2_when_installed_and_names_the_variable_on_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert h2conn._choose_codec(None) == "ngh2"  # the dev install has it
    assert h2conn._choose_codec("lean") == "python"  # the older name of ours
    assert h2conn._choose_codec("h2") == "h2"
    with pytest.raises(ValueError, match="PILOTFISH_H2_CODEC must be ngh2, python or h2"):
        h2conn._choose_codec("nghttp2")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert h2conn._choose_codec(None) == "python"  # the fallback without the fast extra
    with pytest.raises(ValueError, match=r"ngh2 is not installed \(pip install 'pilotfish\[fast"):
        h2conn._choose_codec("ngh2")
