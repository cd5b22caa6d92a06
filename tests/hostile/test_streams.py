"""Concurrent streams and stalled windows: MAX_CONCURRENT_STREAMS is enforced, and streams a
client never lets us answer (INITIAL_WINDOW_SIZE 0) are reset by the stream idle timeout
instead of holding their buffers and the cluster's breaker."""

from __future__ import annotations

import socket

from sidecar.http.h2conn import H2_CODEC
from tests.hostile import wire
from tests.hostile.conftest import Proxy
from tests.support import wait_for

MAX_STREAMS = 100  # the listener default
RESPONSE_MIB = 1 / 16  # each stream asks for 64 KiB (less than a stream's 256 KiB window)
ATTACKERS = 4
# What the stalled connections may hold at most (their open streams' responses), plus the
# interpreter's own overhead for that many streams and frames.
MEMORY_BOUND_MIB = ATTACKERS * MAX_STREAMS * RESPONSE_MIB + 48
BIG = [*wire.GET[:3], (b":path", b"/big/65536")]
# libnghttp2 answers a stream past a MAX_CONCURRENT_STREAMS the client has acknowledged with
# GOAWAY PROTOCOL_ERROR for the connection (RFC 9113 section 5.1.2 allows either that or a
# stream error; nghttpx does the same), where our codec refuses the stream alone. On ngh2 the
# attackers open only as many streams as allowed, and the refusal is checked on its own.
OPENED = MAX_STREAMS if H2_CODEC == "ngh2" else 1000


def test_zero_window_streams_are_refused_beyond_the_limit_then_reset(proxy: Proxy) -> None:
    before = proxy.stats()
    memory = proxy.memory()
    with proxy.canary(memory) as canary:
        assert canary.wait_for_answers(5)
        attackers = [
            wire.Client(proxy.address, {wire.INITIAL_WINDOW_SIZE: 0}, connect=False)
            for _ in range(ATTACKERS)
        ]
        # Every attack built before any connection: one left idle for the sidecar's
        # http2_idle_timeout (2 s) while the others' frames are encoded would be closed first.
        attacks = [
            b"".join(attacker.headers(sid, BIG) for sid in range(1, 2 * OPENED, 2))
            for attacker in attackers
        ]
        for attacker, attack in zip(attackers, attacks, strict=True):
            attacker.connect()
            attacker.send(attack)
        # Open streams are reset between one and two stream idle timeouts (1 s here).
        assert wait_for(
            lambda: (
                proxy.stat("http.ingress.http2.stream_idle_timeout")
                - before.get("http.ingress.http2.stream_idle_timeout", 0)
                >= ATTACKERS * MAX_STREAMS
            ),
            timeout=10,
        )
        answered = canary.ok
        assert canary.wait_for_answers(answered + 5)
        memory.sample()
    for attacker in attackers:
        resets = wire.resets(attacker.frames(seconds=1))
        refused = sum(1 for code in resets.values() if code == wire.REFUSED_STREAM)
        cancelled = sum(1 for code in resets.values() if code == wire.CANCEL)
        assert refused == OPENED - MAX_STREAMS
        assert cancelled == MAX_STREAMS
        attacker.close()
    if H2_CODEC == "ngh2":
        over = wire.Client(proxy.address, {wire.INITIAL_WINDOW_SIZE: 0})
        over.send(b"".join(over.headers(sid, BIG) for sid in range(1, 2 * MAX_STREAMS + 3, 2)))
        frames = over.frames(seconds=5)
        over.close()
        assert wire.goaway_codes(frames) == [wire.PROTOCOL_ERROR]
        assert over.closed_by_peer
    assert canary.failed == []  # no UO: stalled streams never filled the breaker
    assert memory.growth_mib < MEMORY_BOUND_MIB
    # Every upstream request of the stalled streams was given back.
    assert wait_for(lambda: proxy.stat("cluster.app.upstream_rq_active") == 0, timeout=5)
    p99, growth = canary.p99_ms(), memory.growth_mib
    print(f"zero window x{ATTACKERS}: canary p99 {p99:.1f} ms, rss +{growth:.1f} MiB")


def test_client_that_never_reads_is_paused_then_closed(proxy: Proxy) -> None:
    """Responses pile up until the sidecar stops reading the client; its streams then stall
    and are reset, and the connection, idle, is closed without waiting for the client."""
    before = proxy.stats()
    memory = proxy.memory()
    with proxy.canary(memory) as canary:
        assert canary.wait_for_answers(5)
        client = wire.Client(proxy.address)
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.send(b"".join(client.headers(sid, BIG) for sid in range(1, 100, 2)))
        # Only the canary's connection is left.
        assert wait_for(
            lambda: (
                proxy.stat("http.ingress.downstream_cx_active")
                <= before.get("http.ingress.downstream_cx_active", 0) + 1
            ),
            timeout=15,
        )
        answered = canary.ok
        assert canary.wait_for_answers(answered + 5)
    client.close()
    after = proxy.stats()
    stalled = after["http.ingress.http2.stream_idle_timeout"] - before.get(
        "http.ingress.http2.stream_idle_timeout", 0
    )
    assert stalled > 0
    assert canary.failed == []
    assert memory.growth_mib < MEMORY_BOUND_MIB / ATTACKERS
