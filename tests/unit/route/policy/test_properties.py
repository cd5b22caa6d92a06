"""Properties over many inputs: grpc-timeout round trips, token bucket bounds, breaker counts."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from pilotfish.config.route_policy import CircuitBreakerConfig
from sidecar.route.policy.deadline import format_grpc_timeout, parse_grpc_timeout
from sidecar.route.policy.ratelimit import TokenBucket
from sidecar.upstream.policy.breaker import CircuitBreakers, Permit, Resource

FAST = settings(max_examples=100, deadline=None, derandomize=True)


@FAST
@given(st.floats(min_value=0.0, max_value=99_999_999 * 3600.0, allow_nan=False))
def test_grpc_timeout_round_trip_never_shortens_and_barely_lengthens(seconds: float) -> None:
    encoded = format_grpc_timeout(seconds)
    assert re.fullmatch(rb"[0-9]{1,8}[HMSmun]", encoded)
    decoded = parse_grpc_timeout(encoded)
    assert decoded >= seconds - 1e-9
    assert decoded - seconds <= max(seconds * 1e-5, 1e-9)


@FAST
@given(
    st.integers(1, 20),
    st.integers(1, 20),
    st.floats(0.01, 5.0),
    st.lists(st.floats(0.0, 3.0), max_size=200),
)
def test_bucket_never_allows_more_than_burst_plus_refills(
    max_tokens: int, per_fill: int, interval: float, gaps: list[float]
) -> None:
    bucket = TokenBucket(max_tokens, per_fill, interval, now=0.0)
    now = 0.0
    allowed = 0
    for gap in gaps:
        now += gap
        decision = bucket.try_take(now)
        if decision.allowed:
            allowed += 1
        else:
            assert 0.0 < decision.retry_after <= interval + 1e-9
        assert 0 <= bucket.tokens <= max_tokens
    assert allowed <= max_tokens + int(now / interval + 1e-9) * per_fill


@FAST
@given(st.lists(st.tuples(st.sampled_from(list(Resource)), st.booleans()), max_size=300))
def test_breaker_counts_match_outstanding_permits(steps: list[tuple[Resource, bool]]) -> None:
    config = CircuitBreakerConfig(
        max_connections=3, max_pending_requests=3, max_requests=3, max_retries=2
    )
    breakers = CircuitBreakers(config, retry_budget=None)
    held: list[Permit] = []
    for resource, acquire in steps:
        if acquire:
            permit = breakers.try_acquire(resource)
            if permit is not None:
                held.append(permit)
        else:
            mine = [p for p in held if p.resource is resource]
            if mine:
                mine[0].release()
                held.remove(mine[0])
        for r in Resource:
            active = sum(1 for p in held if p.resource is r)
            assert breakers.active(r) == active <= breakers.limit(r)
