"""Timeouts at the edge (1-2 s in this module's listener): idle HTTP/2 connections, header
blocks left open, HTTP/1.1 request heads that never end; and the listen backlog."""

from __future__ import annotations

import socket
import subprocess

from tests.hostile import wire
from tests.hostile.conftest import Proxy
from tests.support import running_sidecar, simple_config


def test_idle_http2_connection_gets_goaway_no_error(proxy: Proxy) -> None:
    before = proxy.stat("http.ingress.http2.idle_timeout")
    client = wire.Client(proxy.address)
    client.send(client.headers(1, wire.GET))
    frames = client.frames(seconds=10)  # answered, then idle for http2_idle_timeout (2 s)
    client.close()
    assert wire.statuses(frames).get(1) == b"200"
    assert wire.goaway_codes(frames) == [wire.NO_ERROR]
    assert client.closed_by_peer
    assert proxy.stat("http.ingress.http2.idle_timeout") == before + 1


def test_open_header_block_is_closed_with_protocol_error(proxy: Proxy) -> None:
    before = proxy.stat("http.ingress.http2.header_timeout")
    client = wire.Client(proxy.address)
    block = client.encoder.encode(wire.GET)
    client.send(wire.frame(wire.HEADERS, wire.END_STREAM, 1, block))  # no END_HEADERS
    frames = client.frames(seconds=10)
    client.close()
    assert wire.goaway_codes(frames) == [wire.PROTOCOL_ERROR]
    assert client.closed_by_peer
    assert proxy.stat("http.ingress.http2.header_timeout") == before + 1


def test_incomplete_http1_request_head_gets_408(proxy: Proxy) -> None:
    before = proxy.stat("http.ingress.http1.header_timeout")
    host, port = proxy.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: app\r\nX-Slow: ")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408")
    assert proxy.stat("http.ingress.http1.header_timeout") == before + 1


def _listen_backlog(port: int) -> int:
    """The accept queue length the kernel has for a listening port (``ss`` shows it as the
    Send-Q of a listening socket)."""
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    return int(out.split()[2])


def test_listen_backlog_is_what_the_config_asks() -> None:
    config = simple_config(["127.0.0.1:1"], extra_listener={"backlog": 777})
    with running_sidecar(config) as sc:
        assert _listen_backlog(sc.port) == 777  # not asyncio's default of 100
