from __future__ import annotations

import pytest

from pilotfish.config.route_policy import RateLimitConfig
from sidecar.route.policy.ratelimit import LocalRateLimiter, RateLimitDecision, TokenBucket
from tests.unit.route.policy.fakes import FakeClock


def test_bucket_bursts_then_refills_on_whole_intervals() -> None:
    bucket = TokenBucket(max_tokens=3, tokens_per_fill=2, fill_interval=1.0, now=0.0)
    assert [bucket.try_take(0.0).allowed for _ in range(4)] == [True, True, True, False]
    denied = bucket.try_take(0.25)
    assert not denied.allowed and denied.retry_after == pytest.approx(0.75)
    assert not bucket.try_take(0.999).allowed  # no partial refill before the tick
    assert [bucket.try_take(1.0).allowed for _ in range(3)] == [True, True, False]
    # Ticks keep their phase: at 2.5 one more tick (at 2.0) has happened, not 1.5.
    assert bucket.try_take(2.5).allowed
    assert bucket.try_take(2.5).allowed
    assert bucket.try_take(2.5).retry_after == pytest.approx(0.5)


def test_bucket_never_exceeds_max_tokens() -> None:
    bucket = TokenBucket(max_tokens=2, tokens_per_fill=1, fill_interval=0.1, now=0.0)
    bucket.try_take(0.0)
    bucket.try_take(100.0)
    assert bucket.tokens == 1


def test_route_bucket_is_shared() -> None:
    clock = FakeClock()
    limiter = LocalRateLimiter(RateLimitConfig(max_tokens=2, tokens_per_fill=2), clock)
    assert limiter.caller_key({"x-user": "a"}, "10.0.0.1") is None
    assert limiter.check().allowed and limiter.check().allowed
    assert not limiter.check().allowed
    clock.advance(1.0)
    assert limiter.check().allowed


def test_per_caller_header_buckets_with_a_bounded_lru() -> None:
    clock = FakeClock()
    config = RateLimitConfig(
        max_tokens=1,
        tokens_per_fill=1,
        fill_interval=60.0,
        per_caller_header="x-user",
        max_callers=2,
    )
    limiter = LocalRateLimiter(config, clock)
    assert limiter.caller_key({"x-user": "alice"}, "10.0.0.1") == "alice"
    assert limiter.caller_key({}, "10.0.0.1") is None
    assert limiter.check("alice").allowed
    assert not limiter.check("alice").allowed
    assert limiter.check("bob").allowed
    assert not limiter.check("alice").allowed  # alice is now the most recently used
    assert limiter.check("carol").allowed  # evicts bob, the least recently used
    assert limiter.tracked_callers == 2
    assert limiter.check("bob").allowed  # a fresh, full bucket: lenient but bounded
    assert not limiter.check("carol").allowed  # carol stayed; alice was pushed out
    assert limiter.tracked_callers == 2


def test_per_source_address() -> None:
    config = RateLimitConfig(max_tokens=1, tokens_per_fill=1, per_source=True)
    limiter = LocalRateLimiter(config, FakeClock())
    assert limiter.caller_key({}, "10.0.0.9") == "10.0.0.9"


def test_reply_hints() -> None:
    decision = RateLimitDecision(False, 0.2501)
    assert decision.reply_headers(grpc=False) == [(b"retry-after", b"1")]
    assert decision.reply_headers(grpc=True) == [
        (b"retry-after", b"1"),
        (b"grpc-retry-pushback-ms", b"251"),
    ]
    assert RateLimitDecision(False, 2.5).reply_headers(False) == [(b"retry-after", b"3")]


def test_denied_local_reply() -> None:
    reply = RateLimitDecision(False, 0.5).local_reply(grpc=True)
    assert (reply.http_status, reply.grpc_status, reply.flag_code) == (429, 8, "RL")
    headers = dict(reply.headers(grpc=True))
    assert headers[b"grpc-status"] == b"8"
    assert headers[b"grpc-retry-pushback-ms"] == b"500"
    http = dict(RateLimitDecision(False, 0.5).local_reply(grpc=False).headers(grpc=False))
    assert http[b":status"] == b"429" and http[b"retry-after"] == b"1"
    assert b"grpc-retry-pushback-ms" not in http
