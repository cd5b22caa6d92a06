"""Rapid reset and control-frame floods: the attacker gets GOAWAY ENHANCE_YOUR_CALM within
its budget, the sidecar's memory stays bounded, and the canary keeps getting answers."""

from __future__ import annotations

import pytest

from tests.hostile import wire
from tests.hostile.conftest import Proxy

# Bounds stated by these tests: what one attacking connection may add to the sidecar's
# resident memory, and how many upstream requests a rapid reset may cause (the reset budget
# is 1000 streams; most pairs arrive in one read and are never routed at all).
MEMORY_BOUND_MIB = 40
UPSTREAM_BOUND = 1100


def test_rapid_reset_is_stopped_within_its_budget(proxy: Proxy) -> None:
    before = proxy.stats()
    memory = proxy.memory()
    with proxy.canary(memory) as canary:
        assert canary.wait_for_answers(5)
        attacker = wire.Client(proxy.address, connect=False)
        pairs = b"".join(
            attacker.headers(sid, wire.GET, end_stream=False) + wire.rst_stream(sid)
            for sid in range(1, 2 * 50_000, 2)
        )  # 50,000 pairs, prepared beforehand: 100,000 frames
        # Connected only now: a connection left idle longer than http2_idle_timeout (2 s) is
        # closed with GOAWAY NO_ERROR, and building the pairs takes that long on a busy machine.
        attacker.connect()
        attacker.send(pairs)
        frames = attacker.frames(seconds=5)
        answered_during = canary.ok
        assert canary.wait_for_answers(answered_during + 5)
    attacker.close()
    after = proxy.stats()
    assert wire.ENHANCE_YOUR_CALM in wire.goaway_codes(frames)
    assert attacker.closed_by_peer
    assert (
        after["http.ingress.http2.rapid_reset"]
        == before.get("http.ingress.http2.rapid_reset", 0) + 1
    )
    routed = after["cluster.app.upstream_rq_total"] - before.get("cluster.app.upstream_rq_total", 0)
    assert routed - canary.ok < UPSTREAM_BOUND
    assert after.get("http.ingress.http2.reset_before_routing", 0) > 0
    assert canary.failed == []
    assert memory.growth_mib < MEMORY_BOUND_MIB
    print(f"rapid reset: canary p99 {canary.p99_ms():.1f} ms, rss +{memory.growth_mib:.1f} MiB")


FLOODS = {
    "settings": lambda c: wire.settings({wire.INITIAL_WINDOW_SIZE: 65535}),
    "ping": lambda c: wire.ping(7),
    "priority": lambda c: wire.priority(3),
    "window_update": lambda c: wire.window_update(0, 1),
    "rst_closed_stream": lambda c: wire.rst_stream(1),
    "empty_data": lambda c: wire.frame(wire.DATA, 0, 1),
    "unknown_type": lambda c: wire.frame(0x42, 0, 0, b"x" * 8),
}


@pytest.mark.parametrize("kind", sorted(FLOODS))
def test_control_frame_flood_gets_enhance_your_calm(proxy: Proxy, kind: str) -> None:
    flood_before = proxy.stat("http.ingress.http2.flood")
    memory = proxy.memory()
    with proxy.canary(memory) as canary:
        assert canary.wait_for_answers(5)
        attacker = wire.Client(proxy.address)
        if kind in ("empty_data", "rst_closed_stream"):
            # A stream to send empty DATA on, or (answered and closed) to reset again and again.
            attacker.send(attacker.headers(1, wire.GET, end_stream=kind == "rst_closed_stream"))
        sent = attacker.flood(FLOODS[kind](attacker), count=100_000, seconds=20)
        frames = attacker.frames(seconds=5)
        answered_during = canary.ok
        assert canary.wait_for_answers(answered_during + 5)
    attacker.close()
    assert wire.ENHANCE_YOUR_CALM in wire.goaway_codes(frames), (kind, sent)
    assert proxy.stat("http.ingress.http2.flood") == flood_before + 1
    assert canary.failed == []
    assert memory.growth_mib < MEMORY_BOUND_MIB
    # The budget is 1000 frames plus what refills while they arrive: far below the flood.
    acks = sum(1 for t, flags, _, _ in frames if t in (wire.PING, wire.SETTINGS) and flags & 1)
    assert acks < 5000
    print(f"{kind} flood: canary p99 {canary.p99_ms():.1f} ms, rss +{memory.growth_mib:.1f} MiB")
