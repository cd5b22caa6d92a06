"""Load protection end to end: real grpcio apps behind a real sidecar, under outages and overload.

Each test counts calls and their statuses and flags; none asserts a timing. The upstreams and
the caller come from ``tests.test_resilience_e2e``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc
import pytest

from tests.test_resilience_e2e import (
    OK,
    UNAVAILABLE,
    Reply,
    call,
    mesh,
    proxied,
    upstreams,
)

pytestmark = pytest.mark.timeout(90)


@dataclass(frozen=True)
class Timed:
    at: float  # seconds since the paced run began
    reply: Reply


def paced(channel: grpc.Channel, seconds: float, rate: float) -> list[Timed]:
    """One call after another, started at ``rate`` a second for ``seconds`` (bounded: at most
    seconds * rate calls of at most a second each; a slow machine just makes fewer)."""
    start = time.monotonic()
    replies: list[Timed] = []
    for i in range(round(seconds * rate)):
        now = time.monotonic() - start
        if now >= seconds:
            break
        if now < i / rate:
            time.sleep(i / rate - now)
        replies.append(Timed(time.monotonic() - start, call(channel, timeout=1.0)))
    return replies


def test_adaptive_throttling_with_defaults_lets_calls_back_soon_after_an_outage() -> None:
    cluster = {"adaptive_throttling": True}
    with upstreams("a") as (a,), proxied(mesh([a.address], cluster=cluster)) as (sc, channel):
        healthy = paced(channel, 2.0, 40)
        a.die()
        outage = paced(channel, 8.0, 40)
        a.restart()
        recovery = paced(channel, 10.0, 40)
        local = sum(t.reply.flags == "AT" for t in outage + recovery)
        assert sc.stat("cluster.app.upstream_rq_throttled") == local

    assert all(t.reply.code is OK for t in healthy)
    # Down: every call fails, flagged; most are thrown locally, a fifth or so still probe.
    assert all(t.reply.code is UNAVAILABLE and t.reply.flags for t in outage)
    throttled = sum(t.reply.flags == "AT" for t in outage)
    assert throttled > 0.4 * len(outage)
    assert throttled < 0.9 * len(outage)  # the 80% cap keeps probing
    # Back: whatever still fails is a local throttle, and 8-10 s after recovery most calls pass.
    assert all(t.reply.code is OK or t.reply.flags == "AT" for t in recovery)
    late = [t.reply for t in recovery if t.at >= 8.0]
    assert len(late) >= 10
    assert sum(r.code is OK for r in late) > 0.5 * len(late)
    assert sum(t.reply.code is OK for t in recovery) > 0.3 * len(recovery)
