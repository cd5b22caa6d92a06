"""Idle timeouts: the timer logic on a fake clock, then real connections through a sidecar."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any, cast

import pytest

from sidecar.idle import IdleTimer
from tests.fake_loop import FakeLoop
from tests.h2_upstream import H2Upstream
from tests.support import running_sidecar, simple_config, wait_for


def make_timer(timeout: float) -> tuple[FakeLoop, IdleTimer, list[float]]:
    loop = FakeLoop()
    fired: list[float] = []
    clock = cast(asyncio.AbstractEventLoop, loop)
    timer = IdleTimer(clock, timeout, lambda: fired.append(loop.now))
    return loop, timer, fired


def test_fires_after_a_whole_idle_period() -> None:
    loop, timer, fired = make_timer(10.0)
    timer.idle()
    loop.advance(9.0)
    assert fired == []
    loop.advance(1.0)
    assert fired == [10.0]


def test_busy_spells_move_the_deadline_without_new_timers() -> None:
    loop, timer, fired = make_timer(10.0)
    timer.idle()
    for _ in range(1000):  # a request every 5 ms for 5 s: one timer throughout
        timer.busy()
        loop.advance(0.004)
        timer.idle()
        loop.advance(0.001)
        assert loop.live == 1
    loop.advance(9.0)
    assert fired == []  # idle since 5.0 only
    loop.advance(1.0)
    assert fired == [pytest.approx(15.0)]


def test_busy_when_the_timer_fires_waits_for_the_next_idle_period() -> None:
    loop, timer, fired = make_timer(1.0)
    timer.idle()
    timer.busy()
    loop.advance(5.0)
    assert fired == [] and loop.live == 0
    timer.idle()
    loop.advance(1.0)
    assert fired == [6.0]


def test_cancel_stops_it() -> None:
    loop, timer, fired = make_timer(1.0)
    timer.idle()
    timer.cancel()
    loop.advance(5.0)
    assert fired == [] and not timer.armed


# -- real connections ------------------------------------------------------------------------


def h1_exchange(sock: socket.socket) -> bytes:
    sock.sendall(b"GET /x HTTP/1.1\r\nhost: app\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data or not data.endswith(b"ok"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def closed_by_peer(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False


def test_upstream_connection_closes_only_after_a_real_idle_period() -> None:
    upstream = H2Upstream()
    config: dict[str, Any] = simple_config([upstream.address])
    config["clusters"][0]["idle_timeout"] = "0.4s"
    try:
        with running_sidecar(config) as sc:
            start = time.monotonic()
            while time.monotonic() - start < 1.2:  # busy three times over the timeout
                with socket.create_connection((sc.bootstrap.listeners[0].host, sc.port)) as s:
                    assert h1_exchange(s).startswith(b"HTTP/1.1 200")
                time.sleep(0.1)
            assert upstream.connections == 1 and upstream.connections_closed == 0
            assert wait_for(lambda: upstream.connections_closed == 1, timeout=3.0)
            assert sc.stat("cluster.app.upstream_cx_active") == 0
    finally:
        upstream.stop()


def test_http1_keepalive_connection_closes_when_idle_not_while_used() -> None:
    upstream = H2Upstream()
    config: dict[str, Any] = simple_config([upstream.address])
    config["listeners"][0]["http1_idle_timeout"] = "0.4s"
    try:
        with (
            running_sidecar(config) as sc,
            socket.create_connection((sc.bootstrap.listeners[0].host, sc.port)) as s,
        ):
            for _ in range(12):  # 1.2 s of requests 0.1 s apart on one connection
                assert h1_exchange(s).startswith(b"HTTP/1.1 200")
                time.sleep(0.1)
            assert closed_by_peer(s, within=3.0)
    finally:
        upstream.stop()
