"""The TCP relay through a real sidecar on loopback: integrity, half-close, backpressure, resets.

Each test runs on uvloop (as ``pilotfish sidecar`` does) and on the standard asyncio loop, with
splice(2) and with the copying fallback. No test asserts on timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import select
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.main import serve
from sidecar.server import Sidecar
from sidecar.upstream import pump, tcp
from tests.support import ThreadedSidecar, free_port, wait_for

MiB = 1024 * 1024
IO_TIMEOUT = 30.0


class StdlibLoopSidecar(ThreadedSidecar):
    """A threaded sidecar on asyncio's own event loop instead of uvloop."""

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)

        def started(sidecar: Sidecar) -> None:
            self.sidecar = sidecar
            self._ready.set()

        loop.run_until_complete(serve(self.bootstrap, signals=False, started=started))
        loop.close()


def tcp_config(upstream_port: int) -> dict[str, Any]:
    return {
        "admin": {"address": "127.0.0.1", "port": free_port()},
        "drain_timeout": "1s",
        "access_log": {"sink": "off"},
        "listeners": [
            {
                "name": "ingress",
                "address": f"127.0.0.1:{free_port()}",
                "mode": "tcp",
                "tcp_passthrough": {"cluster": "raw"},
            }
        ],
        "clusters": [
            {"name": "raw", "protocol": "tcp", "endpoints": [f"127.0.0.1:{upstream_port}"]}
        ],
    }


Start = Callable[[int], contextlib.AbstractContextManager[ThreadedSidecar]]

VARIANTS = [
    pytest.param(("uvloop", True), id="uvloop-splice"),
    pytest.param(("uvloop", False), id="uvloop-copy"),
    pytest.param(("asyncio", True), id="asyncio-splice"),
    pytest.param(("asyncio", False), id="asyncio-copy"),
]


@pytest.fixture(params=VARIANTS)
def start_relay(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Start:
    loop_kind, splice = request.param
    if splice and not pump.splice_supported():
        pytest.skip("no splice(2) here")
    monkeypatch.setattr(tcp, "SPLICE", splice)
    kind = ThreadedSidecar if loop_kind == "uvloop" else StdlibLoopSidecar

    @contextlib.contextmanager
    def start(upstream_port: int) -> Iterator[ThreadedSidecar]:
        sc = kind(tcp_config(upstream_port)).start()
        try:
            yield sc
        finally:
            sc.stop()

    return start


@pytest.fixture
def upstream() -> Iterator[socket.socket]:
    """A listening socket; each test accepts and plays the server itself."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(IO_TIMEOUT)
    try:
        yield srv
    finally:
        srv.close()


def connect(sc: ThreadedSidecar) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", sc.port), timeout=IO_TIMEOUT)
    sock.settimeout(IO_TIMEOUT)
    return sock


def accept(srv: socket.socket) -> socket.socket:
    conn, _ = srv.accept()
    conn.settimeout(IO_TIMEOUT)
    return conn


def read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(MiB):
        chunks.append(chunk)
    return b"".join(chunks)


def send_and_finish(sock: socket.socket, data: bytes) -> None:
    """Send ``data``, then a FIN."""
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


def echo_to_eof(sock: socket.socket) -> None:
    """Send back all that arrives, once it has all arrived, then close."""
    sock.sendall(read_to_eof(sock))
    sock.close()


def in_thread(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Start ``fn`` in a thread; the returned call joins it and gives its result (or raises)."""
    result: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # handed to the joining test
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join() -> Any:
        thread.join(IO_TIMEOUT * 2)
        assert not thread.is_alive(), "a peer did not finish"
        if errors:
            raise errors[0]
        return result[0]

    return join


def relays(sc: ThreadedSidecar) -> list[tcp.TcpRelay]:
    def collect() -> list[tcp.TcpRelay]:
        assert sc.sidecar is not None
        return [
            c for c in sc.sidecar.listeners["ingress"].connections if isinstance(c, tcp.TcpRelay)
        ]

    found: list[tcp.TcpRelay] = sc.call(collect)
    return found


def all_closed(sc: ThreadedSidecar) -> bool:
    return (
        sc.stat("http.ingress.downstream_cx_active") == 0
        and sc.stat("cluster.raw.upstream_cx_active") == 0
    )


def test_large_transfers_both_ways_at_once_arrive_intact(
    start_relay: Start, upstream: socket.socket
) -> None:
    size = 24 * MiB
    up_data = random.Random(1).randbytes(size)
    down_data = random.Random(2).randbytes(size + 12345)
    with start_relay(upstream.getsockname()[1]) as sc:
        client = connect(sc)
        server = accept(upstream)
        joins = [
            in_thread(lambda: send_and_finish(client, up_data)),
            in_thread(lambda: send_and_finish(server, down_data)),
            in_thread(lambda: read_to_eof(server)),
            in_thread(lambda: read_to_eof(client)),
        ]
        _, _, at_server, at_client = (join() for join in joins)
        assert at_server == up_data
        assert at_client == down_data
        assert wait_for(lambda: all_closed(sc))
        assert sc.stat("cluster.raw.upstream_cx_tx_bytes_total") == len(up_data)
        assert sc.stat("cluster.raw.upstream_cx_rx_bytes_total") == len(down_data)
        assert sc.stat("cluster.raw.upstream_cx_total") == 1
        assert sc.stat("http.ingress.downstream_cx_tcp_passthrough") == 1
        client.close()
        server.close()


def test_client_fin_is_passed_on_and_the_answer_still_comes_back(
    start_relay: Start, upstream: socket.socket
) -> None:
    with start_relay(upstream.getsockname()[1]) as sc:
        client = connect(sc)
        server = accept(upstream)
        client.sendall(b"question")
        client.shutdown(socket.SHUT_WR)
        assert read_to_eof(server) == b"question"  # the FIN arrived
        server.sendall(b"an answer sent after the client's FIN")
        server.close()
        assert read_to_eof(client) == b"an answer sent after the client's FIN"
        assert wait_for(lambda: all_closed(sc))
        client.close()


def test_server_fin_is_passed_on_and_the_client_keeps_talking(
    start_relay: Start, upstream: socket.socket
) -> None:
    with start_relay(upstream.getsockname()[1]) as sc:
        client = connect(sc)
        server = accept(upstream)
        server.sendall(b"220 banner, and nothing more from me")
        server.shutdown(socket.SHUT_WR)
        assert read_to_eof(client) == b"220 banner, and nothing more from me"
        client.sendall(b"still talking")
        client.shutdown(socket.SHUT_WR)
        assert read_to_eof(server) == b"still talking"
        assert wait_for(lambda: all_closed(sc))
        client.close()
        server.close()


def _kernel_buffer_limit() -> int:
    """The most the kernel may buffer for one socket (receive plus send), from the sysctls."""
    limit = 0
    for name in ("tcp_rmem", "tcp_wmem"):
        limit += int(Path(f"/proc/sys/net/ipv4/{name}").read_text().split()[2])
    return limit


@pytest.mark.parametrize("slow", ["upstream", "downstream"])
def test_a_slow_reader_holds_the_writer_back(
    slow: str, start_relay: Start, upstream: socket.socket
) -> None:
    upstream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # inherited on accept
    with start_relay(upstream.getsockname()[1]) as sc:
        client = connect(sc)
        server = accept(upstream)
        writer, reader = (client, server) if slow == "upstream" else (server, client)
        writer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        pattern = random.Random(3).randbytes(MiB)
        writer.setblocking(False)
        sent = 0
        # Write until the writer has been blocked for a second: nothing reads the far end.
        while select.select([], [writer], [], 1.0)[1]:
            with contextlib.suppress(BlockingIOError):
                sent += writer.send(pattern[sent % MiB :])
        [relay] = relays(sc)
        assert relay.pumps is not None
        moving = relay.pumps[0] if slow == "upstream" else relay.pumps[1]
        # The pump stops reading once it cannot write, and holds at most one read meanwhile.
        assert wait_for(lambda: bool(sc.call(lambda: moving.waiting_to_write)))
        assert sc.call(lambda: moving.held) <= pump.CHUNK_BYTES
        # Everything else is in kernel buffers, each bounded by the sysctls.
        assert sent <= 2 * _kernel_buffer_limit() + pump.CHUNK_BYTES + 2 * MiB
        writer.setblocking(True)
        writer.settimeout(IO_TIMEOUT)
        extra = b"the end"
        done = in_thread(lambda: send_and_finish(writer, extra))
        got = read_to_eof(reader)
        done()
        expected = (pattern * (sent // MiB + 1))[:sent] + extra
        assert got == expected
        client.close()
        server.close()


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_an_upstream_reset_resets_the_client(start_relay: Start, upstream: socket.socket) -> None:
    with start_relay(upstream.getsockname()[1]) as sc:
        client = connect(sc)
        server = accept(upstream)
        client.sendall(b"hello")
        assert server.recv(100) == b"hello"
        _reset(server)
        with pytest.raises(ConnectionResetError):
            read_to_eof(client)
        assert wait_for(lambda: all_closed(sc))
        client.close()


def test_a_client_reset_resets_the_upstream(start_relay: Start, upstream: socket.socket) -> None:
    with start_relay(upstream.getsockname()[1]) as sc:
        client = connect(sc)
        server = accept(upstream)
        client.sendall(b"hello")
        assert server.recv(100) == b"hello"
        _reset(client)
        with pytest.raises(ConnectionResetError):
            read_to_eof(server)
        assert wait_for(lambda: all_closed(sc))
        server.close()


def test_a_refused_upstream_closes_the_client_and_is_counted(start_relay: Start) -> None:
    closed_port = free_port()
    with start_relay(closed_port) as sc:
        client = connect(sc)
        with contextlib.suppress(ConnectionResetError):
            assert read_to_eof(client) == b""
        assert wait_for(lambda: all_closed(sc))
        assert sc.stat("cluster.raw.upstream_cx_connect_fail") == 1
        assert sc.stat("cluster.raw.upstream_cx_total") == 0
        client.close()


def test_without_pipes_the_bytes_are_copied(
    monkeypatch: pytest.MonkeyPatch, upstream: socket.socket
) -> None:
    if not pump.splice_supported():
        pytest.skip("no splice(2) here")

    def no_pipe() -> pump.Pipe:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(pump.Pipe, "open", staticmethod(no_pipe))
    monkeypatch.setattr(tcp, "SPLICE", True)
    data = random.Random(4).randbytes(4 * MiB)
    sc = ThreadedSidecar(tcp_config(upstream.getsockname()[1])).start()
    try:
        client = connect(sc)
        server = accept(upstream)
        echo = in_thread(lambda: echo_to_eof(server))
        sent = in_thread(lambda: send_and_finish(client, data))
        assert read_to_eof(client) == data
        sent()
        echo()
        client.close()
    finally:
        sc.stop()


def test_the_pipe_pool_keeps_a_few_empty_pipes_and_closes_the_rest() -> None:
    if not pump.splice_supported():
        pytest.skip("no splice(2) here")
    pool = pump.PipePool(spare=2)
    pipes = [pool.take() for _ in range(3)]
    assert all(p is not None and p.size >= 4096 for p in pipes)
    fds = [(p.read_fd, p.write_fd) for p in pipes if p is not None]
    for p in pipes:
        assert p is not None
        pool.give(p)
    assert len(pool.pipes) == 2
    with pytest.raises(OSError):
        os.fstat(fds[2][0])  # the third went back closed
    assert pool.take() is pipes[1]
