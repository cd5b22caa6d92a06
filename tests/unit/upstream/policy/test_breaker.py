from __future__ import annotations

from collections import Counter

import pytest

from pilotfish.config.route_policy import CircuitBreakerConfig, RetryBudgetConfig
from sidecar.upstream.policy.breaker import OVERFLOW_FLAG, CircuitBreakers, Permit, Resource
from sidecar.upstream.policy.budget import RetryBudget


def test_defaults_are_envoys() -> None:
    config = CircuitBreakerConfig()
    assert (config.max_connections, config.max_pending_requests) == (1024, 1024)
    assert (config.max_requests, config.max_retries) == (1024, 3)
    assert OVERFLOW_FLAG.code == "UO" and OVERFLOW_FLAG.http_status == 503


@pytest.mark.parametrize(
    ("resource", "counter"),
    [
        (Resource.CONNECTIONS, "upstream_cx_overflow"),
        (Resource.PENDING, "upstream_rq_pending_overflow"),
        (Resource.REQUESTS, "upstream_rq_pending_overflow"),
        (Resource.RETRIES, "upstream_rq_retry_overflow"),
    ],
)
def test_overflow_and_recovery(resource: Resource, counter: str) -> None:
    counters: Counter[str] = Counter()
    config = CircuitBreakerConfig(
        max_connections=2, max_pending_requests=2, max_requests=2, max_retries=2
    )
    breakers = CircuitBreakers(config, retry_budget=None, counters=counters)
    first = breakers.try_acquire(resource)
    second = breakers.try_acquire(resource)
    assert first is not None and second is not None
    assert breakers.is_open(resource) and breakers.remaining(resource) == 0
    assert breakers.try_acquire(resource) is None
    assert counters[counter] == 1
    first.release()
    first.release()  # twice is harmless
    assert breakers.active(resource) == 1 and not breakers.is_open(resource)
    third = breakers.try_acquire(resource)
    assert third is not None and not third.released
    assert breakers.try_acquire(resource) is None
    assert counters[counter] == 2


def test_named_acquirers_count_their_resource() -> None:
    b = CircuitBreakers()
    permits: list[Permit | None] = [
        b.try_acquire_connection(),
        b.try_acquire_pending(),
        b.try_acquire_request(),
        b.try_acquire_retry(),
    ]
    assert [p.resource for p in permits if p is not None] == list(Resource)
    assert all(b.active(r) == 1 for r in Resource)


def test_budget_minimum_and_percentage() -> None:
    budget = RetryBudget(RetryBudgetConfig(percent=20.0, min_concurrency=3))
    assert budget.max_active_retries(0) == 3
    assert budget.max_active_retries(14) == 3  # 2.8 → 2, the minimum wins
    assert budget.max_active_retries(15) == 3
    assert budget.max_active_retries(20) == 4
    assert budget.max_active_retries(1000) == 200
    assert budget.allows(0, 2) and not budget.allows(0, 3)
    eighth = RetryBudget(RetryBudgetConfig(percent=12.5, min_concurrency=0))
    assert eighth.max_active_retries(8) == 1 and eighth.max_active_retries(7) == 0


def test_retries_follow_the_budget_of_active_and_pending_requests() -> None:
    counters: Counter[str] = Counter()
    b = CircuitBreakers(CircuitBreakerConfig(max_retries=1), RetryBudgetConfig(), counters)
    retries = [b.try_acquire_retry() for _ in range(3)]  # the minimum, max_retries ignored
    assert all(retries) and b.try_acquire_retry() is None
    assert counters["upstream_rq_retry_overflow"] == 1
    requests = [b.try_acquire_request() for _ in range(15)]
    pending = [b.try_acquire_pending() for _ in range(5)]
    assert b.limit(Resource.RETRIES) == 4  # 20% of 20
    assert b.try_acquire_retry() is not None and b.try_acquire_retry() is None
    for permit in [*requests, *pending]:
        assert permit is not None
        permit.release()
    assert b.limit(Resource.RETRIES) == 3 and b.is_open(Resource.RETRIES)


def test_update_changes_limits_but_keeps_counts() -> None:
    b = CircuitBreakers(CircuitBreakerConfig(max_requests=3))
    held = [b.try_acquire_request() for _ in range(3)]
    b.update(CircuitBreakerConfig(max_requests=2), None)
    assert b.try_acquire_request() is None
    for permit in held:
        assert permit is not None
        permit.release()
    assert b.active(Resource.REQUESTS) == 0 and b.limit(Resource.RETRIES) == 3


def test_gauges() -> None:
    b = CircuitBreakers(CircuitBreakerConfig(max_connections=1), None)
    b.try_acquire_connection()
    gauges = b.gauges()
    assert gauges["circuit_breakers.default.cx_open"] == 1
    assert gauges["circuit_breakers.default.remaining_cx"] == 0
    assert gauges["circuit_breakers.default.rq_open"] == 0
    assert gauges["circuit_breakers.default.remaining_rq"] == 1024
    assert gauges["circuit_breakers.default.remaining_pending"] == 1024
    assert gauges["circuit_breakers.default.remaining_retries"] == 3
    assert gauges["circuit_breakers.default.rq_retry_open"] == 0


def test_the_request_paths_counters_share_the_permits_limits() -> None:
    """``try_request``/``try_pending`` count the same resources as the permits, without one."""
    counters: Counter[str] = Counter()
    config = CircuitBreakerConfig(max_requests=2, max_pending_requests=1)
    b = CircuitBreakers(config, None, counters)
    assert b.try_request() and b.try_acquire_request() is not None
    assert not b.try_request() and counters["upstream_rq_pending_overflow"] == 1
    assert b.active(Resource.REQUESTS) == 2 and b.is_open(Resource.REQUESTS)
    b.release_request()
    assert b.try_request()
    assert b.try_pending() and not b.try_pending() and b.try_acquire_pending() is None
    assert counters["upstream_rq_pending_overflow"] == 3
    b.release_pending()
    assert b.active(Resource.PENDING) == 0 and b.gauges()["circuit_breakers.default.rq_open"] == 1
