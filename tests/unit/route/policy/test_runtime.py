from __future__ import annotations

import random
from collections import Counter

from pilotfish.config.route_policy import (
    AdaptiveThrottlingConfig,
    CircuitBreakerConfig,
    ClusterResilience,
    FallbackConfig,
    RateLimitConfig,
    RoutePolicy,
    StaticResponse,
)
from sidecar.route.policy.runtime import RoutePolicyRuntime
from sidecar.upstream.policy.breaker import Resource
from sidecar.upstream.policy.resilience import ClusterResilienceRuntime
from tests.unit.route.policy.fakes import FakeClock

LIMIT = RateLimitConfig(max_tokens=1, tokens_per_fill=1, fill_interval=60.0)


def test_route_runtime_builds_only_what_is_configured() -> None:
    plain = RoutePolicyRuntime(RoutePolicy(), FakeClock())
    assert (plain.rate_limiter, plain.faults, plain.fallback) == (None, None, None)
    full = RoutePolicyRuntime(
        RoutePolicy(rate_limit=LIMIT, fallback=FallbackConfig(response=StaticResponse())),
        FakeClock(),
    )
    assert full.rate_limiter is not None and full.fallback is not None


def test_route_update_keeps_buckets_unless_the_limit_changed() -> None:
    runtime = RoutePolicyRuntime(RoutePolicy(rate_limit=LIMIT), FakeClock())
    assert runtime.rate_limiter is not None and runtime.rate_limiter.check().allowed
    same = runtime.updated(RoutePolicy(rate_limit=LIMIT, fallback=FallbackConfig(cluster="b")))
    assert same.rate_limiter is runtime.rate_limiter and same.fallback is not None
    changed = runtime.updated(RoutePolicy(rate_limit=RateLimitConfig(2, 2)))
    assert changed.rate_limiter is not None and changed.rate_limiter.check().allowed


def test_cluster_update_keeps_counts_and_throttle_window() -> None:
    counters: Counter[str] = Counter()
    throttled = ClusterResilience(adaptive_throttling=AdaptiveThrottlingConfig(enabled=True))
    runtime = ClusterResilienceRuntime(throttled, FakeClock(), random.Random(1).random, counters)
    throttle = runtime.throttle
    assert throttle is not None
    permit = runtime.breakers.try_acquire_request()
    assert permit is not None
    runtime.update(
        ClusterResilience(
            circuit_breakers=CircuitBreakerConfig(max_requests=1),
            adaptive_throttling=throttled.adaptive_throttling,
        )
    )
    assert runtime.throttle is throttle
    assert runtime.breakers.try_acquire_request() is None
    assert counters["upstream_rq_pending_overflow"] == 1
    assert runtime.breakers.active(Resource.REQUESTS) == 1
    runtime.update(ClusterResilience())
    assert runtime.throttle is None
