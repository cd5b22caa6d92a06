"""The router's ``Exchange`` driven in process: a real sidecar config, a fake downstream sink."""

from __future__ import annotations

import asyncio

from sidecar.http.streams import Headers, OnSent
from sidecar.route.exchange import Exchange
from tests.support import free_port, simple_config
from tests.unit.sidecar_fakes import listener_for


class FakeDownstream:
    """A ``StreamSink`` that records what the exchange wrote and acknowledged."""

    def __init__(self) -> None:
        self.headers: list[Headers] = []
        self.acked = 0
        self.resets: list[int] = []

    def send_headers(self, headers: Headers, end_stream: bool) -> None:
        self.headers.append(headers)

    def send_data(self, data: bytes, end_stream: bool, on_sent: OnSent) -> None:
        if on_sent is not None:
            on_sent()

    def send_trailers(self, trailers: Headers) -> None:
        pass

    def reset(self, code: int) -> None:
        self.resets.append(code)

    def reset_when_sent(self, code: int) -> None:
        self.resets.append(code)

    def ack(self, flow_len: int) -> None:
        self.acked += flow_len


REQUEST: Headers = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":authority", b"app"),
    (b":path", b"/upload"),
]


def test_body_still_held_when_the_exchange_ends_is_credited_back() -> None:
    """Request bytes waiting for an upstream stream must be acknowledged to the client when
    the exchange answers for itself; otherwise each such request shrinks the downstream
    connection's window for good, and the connection eventually stalls."""

    async def run() -> tuple[FakeDownstream, Exchange]:
        # Nothing listens on the endpoint: the connect fails and the exchange replies UF.
        listener = listener_for(simple_config([f"127.0.0.1:{free_port()}"]))
        downstream = FakeDownstream()
        exchange = Exchange(listener, downstream)
        exchange.on_headers(REQUEST, False)
        exchange.on_data(b"x" * 1000, 1000, False)
        exchange.on_data(b"y" * 24, 30, True)  # padding counts for flow control too
        for _ in range(200):
            if exchange.done:
                break
            await asyncio.sleep(0.01)
        return downstream, exchange

    downstream, exchange = asyncio.run(run())
    assert exchange.done and "UF" in exchange.flags
    assert downstream.acked == 1030
