"""Active health check state: thresholds, initial state, scheduling, host churn."""

from __future__ import annotations

import random

from pilotfish.config.cluster_policy import HealthCheckConfig
from sidecar.upstream.policy.health import HealthChecker, HostBecameHealthy, HostBecameUnhealthy
from tests.unit.upstream.policy.support import FakeClock

A = "10.0.0.1:8080"
B = "10.0.0.2:8080"


def checker(clock: FakeClock, **overrides: object) -> HealthChecker:
    config = HealthCheckConfig(**overrides)  # type: ignore[arg-type]
    hc = HealthChecker(config, clock, random.Random(4))
    hc.set_hosts([A, B])
    return hc


def test_new_hosts_start_unhealthy_and_are_due_at_once() -> None:
    clock = FakeClock()
    hc = checker(clock)
    assert not hc.is_healthy(A)
    assert hc.due(clock.now) == [A, B]
    assert hc.next_due() == clock.now


def test_the_first_result_decides_at_once() -> None:
    clock = FakeClock()
    hc = checker(clock)
    assert hc.result(A, True, clock.now) == HostBecameHealthy(key=A)
    assert hc.result(B, False, clock.now) is None
    assert hc.is_healthy(A) and not hc.is_healthy(B)


def test_initially_healthy_hosts_take_traffic_before_any_check() -> None:
    clock = FakeClock()
    hc = checker(clock, initially_healthy=True)
    assert hc.is_healthy(A)
    assert hc.result(A, False, clock.now) == HostBecameUnhealthy(key=A)


def test_a_healthy_host_leaves_after_unhealthy_threshold_failures_in_a_row() -> None:
    clock = FakeClock()
    hc = checker(clock, unhealthy_threshold=3)
    hc.result(A, True, clock.now)
    assert hc.result(A, False, clock.now) is None
    assert hc.result(A, False, clock.now) is None
    assert hc.result(A, True, clock.now) is None  # a success resets the count
    assert hc.result(A, False, clock.now) is None
    assert hc.result(A, False, clock.now) is None
    assert hc.result(A, False, clock.now) == HostBecameUnhealthy(key=A)
    assert not hc.is_healthy(A)


def test_an_unhealthy_host_rejoins_after_healthy_threshold_successes_in_a_row() -> None:
    clock = FakeClock()
    hc = checker(clock, healthy_threshold=2, unhealthy_threshold=1)
    hc.result(A, True, clock.now)
    assert hc.result(A, False, clock.now) == HostBecameUnhealthy(key=A)
    assert hc.result(A, True, clock.now) is None
    assert hc.result(A, False, clock.now) is None  # a failure resets the count
    assert hc.result(A, True, clock.now) is None
    assert hc.result(A, True, clock.now) == HostBecameHealthy(key=A)


def test_next_check_follows_interval_and_unhealthy_interval() -> None:
    clock = FakeClock()
    hc = checker(clock, interval=5.0, unhealthy_interval=1.0, unhealthy_threshold=1)
    hc.result(A, True, clock.now)
    assert hc.next_check_at(A) == clock.now + 5.0
    assert hc.due(clock.now) == [B]
    clock.advance(5.0)
    assert hc.due(clock.now) == [A, B]
    hc.result(A, False, clock.now)
    assert hc.next_check_at(A) == clock.now + 1.0


def test_jitter_spreads_checks_within_its_bound_deterministically() -> None:
    clock = FakeClock()
    hc = checker(clock, interval=5.0, interval_jitter=1.0)
    times = []
    for _ in range(200):
        hc.result(A, True, clock.now)
        times.append(hc.next_check_at(A) - clock.now)
    assert all(5.0 <= t <= 6.0 for t in times)
    assert max(times) - min(times) > 0.9
    again = checker(FakeClock(), interval=5.0, interval_jitter=1.0)
    again.result(A, True, 1000.0)
    assert again.next_check_at(A) - 1000.0 == times[0]


def test_hosts_come_and_go() -> None:
    clock = FakeClock()
    hc = checker(clock)
    hc.result(A, True, clock.now)
    clock.advance(1.0)
    hc.set_hosts([A, "10.0.0.3:8080"])
    assert hc.is_healthy(A)  # survivors keep their state
    assert not hc.is_healthy(B) and not hc.is_healthy("10.0.0.3:8080")
    assert hc.due(clock.now) == ["10.0.0.3:8080"]
    assert hc.result(B, True, clock.now) is None  # a late result for a departed host
    assert B not in hc.hosts
