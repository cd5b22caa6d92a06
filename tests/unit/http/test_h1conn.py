"""The upstream HTTP/1.1 codec against a fake transport: requests it cannot frame."""

from __future__ import annotations

import asyncio
from typing import Any

from sidecar.http.h1conn import H1ClientConnection, H1ServerConnection
from sidecar.http.streams import Headers, ResetReason
from tests.support import simple_config
from tests.unit.sidecar_fakes import listener_for


class FakeTransport:
    def __init__(self) -> None:
        self.written = b""
        self.aborted = False
        self.protocol: H1ClientConnection | None = None

    def write(self, data: bytes) -> None:
        self.written += data

    def abort(self) -> None:
        if not self.aborted:
            self.aborted = True
            assert self.protocol is not None
            asyncio.get_event_loop().call_soon(self.protocol.connection_lost, None)

    close = abort

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Owner:
    def __init__(self) -> None:
        self.closed: list[Any] = []

    def released(self, conn: Any) -> None:
        pass

    def connection_closed(self, conn: Any) -> None:
        self.closed.append(conn)


class Handler:
    def __init__(self) -> None:
        self.resets: list[ResetReason] = []

    def on_headers(self, headers: Headers, end_stream: bool) -> None:
        pass

    def on_data(self, data: bytes, flow_len: int, end_stream: bool) -> None:
        pass

    def on_trailers(self, trailers: Headers) -> None:
        pass

    def on_reset(self, reason: ResetReason, code: int) -> None:
        self.resets.append(reason)


def _request(content_length: bytes) -> Headers:
    return [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", b"app"),
        (b":path", b"/"),
        (b"content-length", content_length),
    ]


async def _open(content_length: bytes) -> tuple[H1ClientConnection, FakeTransport, Handler, Any]:
    conn = H1ClientConnection(Owner(), 1024, 10.0)
    transport = FakeTransport()
    transport.protocol = conn
    conn.connection_made(transport)  # type: ignore[arg-type]
    handler = Handler()
    stream = conn.open_stream(_request(content_length), False, handler)
    return conn, transport, handler, stream


def test_trailers_on_a_content_length_request_are_dropped() -> None:
    """HTTP/1.1 carries trailers only with chunked framing; the request must still end."""

    async def run() -> tuple[FakeTransport, Handler]:
        _, transport, handler, stream = await _open(b"2")
        stream.send_data(b"ab", False, None)
        stream.send_trailers([(b"x-checksum", b"1")])
        await asyncio.sleep(0)
        return transport, handler

    transport, handler = asyncio.run(run())
    assert transport.written.endswith(b"\r\n\r\nab")
    assert not transport.aborted and handler.resets == []


def test_body_shorter_than_its_content_length_resets_the_stream() -> None:
    """The error must reach the exchange (as a reset), not escape into the caller."""

    async def run() -> tuple[FakeTransport, Handler]:
        _, transport, handler, stream = await _open(b"10")
        stream.send_data(b"ab", True, None)
        await asyncio.sleep(0)
        return transport, handler

    transport, handler = asyncio.run(run())
    assert transport.aborted
    assert handler.resets == [ResetReason.PROTOCOL_ERROR]


def test_body_longer_than_its_content_length_resets_the_stream() -> None:
    """Without the reset the exchange would wait for a response until its timeout."""

    async def run() -> tuple[FakeTransport, Handler, list[int]]:
        _, transport, handler, stream = await _open(b"1")
        sent: list[int] = []
        stream.send_data(b"ab", False, lambda: sent.append(1))
        stream.send_data(b"cd", True, lambda: sent.append(2))
        await asyncio.sleep(0)
        return transport, handler, sent

    transport, handler, sent = asyncio.run(run())
    assert transport.aborted
    assert handler.resets == [ResetReason.PROTOCOL_ERROR]
    assert sent == [1, 2]  # the credit of bytes never sent still goes back


class ServerTransport(FakeTransport):
    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> Any:
        return None

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass


def test_response_trailers_with_a_content_length_keep_the_connection() -> None:
    """An upstream answer with a content-length and trailers (gRPC-Web, some HTTP/2 servers)
    reaches an HTTP/1.1 client without its trailers; the connection stays usable."""

    async def run() -> tuple[ServerTransport, H1ServerConnection]:
        listener = listener_for(simple_config(["127.0.0.1:1"]))
        listener.new_exchange = lambda stream, peer=None: Handler()  # type: ignore[method-assign,assignment]
        conn = H1ServerConnection(listener)
        transport = ServerTransport()
        conn.connection_made(transport)  # type: ignore[arg-type]
        conn.data_received(b"GET / HTTP/1.1\r\nhost: app\r\n\r\n")
        stream = conn.stream
        assert stream is not None
        stream.send_headers([(b":status", b"200"), (b"content-length", b"2")], False)
        stream.send_data(b"ok", False, None)
        stream.send_trailers([(b"grpc-status", b"0")])
        await asyncio.sleep(0)
        return transport, conn

    transport, conn = asyncio.run(run())
    assert transport.written.endswith(b"\r\n\r\nok")
    assert not transport.closed and conn.stream is None  # ready for the next request


def test_response_trailers_reach_an_http11_client_in_chunked_framing() -> None:
    async def run() -> ServerTransport:
        listener = listener_for(simple_config(["127.0.0.1:1"]))
        listener.new_exchange = lambda stream, peer=None: Handler()  # type: ignore[method-assign,assignment]
        conn = H1ServerConnection(listener)
        transport = ServerTransport()
        conn.connection_made(transport)  # type: ignore[arg-type]
        conn.data_received(b"GET / HTTP/1.1\r\nhost: app\r\n\r\n")
        stream = conn.stream
        assert stream is not None
        stream.send_headers([(b":status", b"200")], False)
        stream.send_data(b"ok", False, None)
        stream.send_trailers([(b"grpc-status", b"0")])
        await asyncio.sleep(0)
        return transport

    transport = asyncio.run(run())
    assert b"transfer-encoding: chunked" in transport.written.lower()
    assert transport.written.endswith(b"0\r\ngrpc-status: 0\r\n\r\n")
    assert not transport.closed


def test_acks_of_an_earlier_response_do_not_inflate_the_next_ones_budget() -> None:
    """The downstream takes the last bytes of a response after the connection went back to the
    pool; their acks must not count against (below zero) the next request's buffer."""

    async def run() -> tuple[int, int]:
        conn, _, _, stream = await _open(b"0")
        stream.send_data(b"", True, None)
        conn.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
        assert conn.stream is None  # recycled for the next request
        stream.ack(5)  # the downstream took the body only now
        after_stale_ack = conn.unacked
        next_stream = conn.open_stream(_request(b"0"), True, Handler())
        conn.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc")
        next_stream.ack(3)
        return after_stale_ack, conn.unacked

    after_stale_ack, after_next = asyncio.run(run())
    assert after_stale_ack == 0
    assert after_next == 0


def test_keep_alive_resumes_reading_paused_by_the_previous_request() -> None:
    """Acks of the previous request's body no longer count once its response is done, so the
    next cycle must not start with reading still paused."""

    async def run() -> tuple[ServerTransport, H1ServerConnection, list[Any]]:
        listener = listener_for(simple_config(["127.0.0.1:1"]))
        listener.new_exchange = lambda stream, peer=None: Handler()  # type: ignore[method-assign,assignment]
        conn = H1ServerConnection(listener)
        transport = ServerTransport()
        resumed: list[Any] = []
        transport.resume_reading = lambda: resumed.append(1)  # type: ignore[method-assign]
        conn.connection_made(transport)  # type: ignore[arg-type]
        body = b"x" * (listener.config.per_stream_buffer_bytes + 1)
        head = b"POST / HTTP/1.1\r\nhost: app\r\ncontent-length: %d\r\n\r\n" % len(body)
        conn.data_received(head + body)
        assert conn.read_paused  # the handler has not acked the body
        stream = conn.stream
        assert stream is not None
        stream.send_headers([(b":status", b"200"), (b"content-length", b"0")], True)
        stream.ack(len(body))  # late: the response is done, the budget is the next request's
        return transport, conn, resumed

    _, conn, resumed = asyncio.run(run())
    assert not conn.read_paused and resumed == [1]
    assert conn.unacked == 0


def test_request_http11_cannot_carry_is_a_reset_not_an_exception() -> None:
    """h11 refuses to frame these; the error must reach the exchange (which answers UPE), not
    escape into the downstream connection's read callback."""

    async def run(headers: Headers) -> tuple[FakeTransport, Handler]:
        conn = H1ClientConnection(Owner(), 1024, 10.0)
        transport = FakeTransport()
        transport.protocol = conn
        conn.connection_made(transport)  # type: ignore[arg-type]
        handler = Handler()
        conn.open_stream(headers, True, handler)
        await asyncio.sleep(0)
        return transport, handler

    base = _request(b"1")
    for bad in (
        [(n, b"/a b" if n == b":path" else v) for n, v in base],
        [(n, b"GE T" if n == b":method" else v) for n, v in base],
        [(n, b"abc" if n == b"content-length" else v) for n, v in base],
    ):
        transport, handler = asyncio.run(run(bad))
        assert transport.aborted and transport.written == b""
        assert handler.resets == [ResetReason.PROTOCOL_ERROR]


def test_request_with_content_length_and_transfer_encoding_gets_400() -> None:
    async def run() -> tuple[ServerTransport, list[Handler]]:
        listener = listener_for(simple_config(["127.0.0.1:1"]))
        handlers: list[Handler] = []

        def new_exchange(stream: Any) -> Handler:
            handlers.append(Handler())
            return handlers[-1]

        listener.new_exchange = new_exchange  # type: ignore[method-assign,assignment]
        conn = H1ServerConnection(listener)
        transport = ServerTransport()
        conn.connection_made(transport)  # type: ignore[arg-type]
        conn.data_received(
            b"POST / HTTP/1.1\r\nhost: app\r\ncontent-length: 5\r\n"
            b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n"
        )
        await asyncio.sleep(0)
        return transport, handlers

    transport, handlers = asyncio.run(run())
    assert transport.written.startswith(b"HTTP/1.1 400")
    assert handlers == []  # never routed
