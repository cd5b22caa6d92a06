"""ClusterBalancer: health checks, ejections and panic mode decide what the balancer sees."""

from __future__ import annotations

import random
from collections import Counter

from pilotfish.config.cluster_policy import (
    LOCAL_ORIGIN_ONLY,
    HealthCheckConfig,
    LbKind,
    LbPolicy,
    OutlierDetectionConfig,
    SlowStartConfig,
)
from sidecar.upstream.policy.cluster import ClusterBalancer
from sidecar.upstream.policy.lb import NO_CONTEXT
from tests.unit.upstream.policy.support import FakeClock

HOSTS = [(f"10.0.0.{i}:8080", 1) for i in range(4)]


def cluster(clock: FakeClock, **kwargs: object) -> ClusterBalancer:
    cb = ClusterBalancer(
        LbPolicy(kind=LbKind.ROUND_ROBIN),
        clock=clock,
        rng=random.Random(2),
        **kwargs,  # type: ignore[arg-type]
    )
    cb.set_hosts(HOSTS)
    return cb


def chosen(cb: ClusterBalancer, count: int = 40) -> set[int]:
    return {i for _ in range(count) if (i := cb.choose(NO_CONTEXT)) is not None}


def test_without_checks_every_host_is_eligible() -> None:
    cb = cluster(FakeClock())
    assert chosen(cb) == {0, 1, 2, 3}
    assert cb.evaluate_outliers() == [] and cb.next_outlier_evaluation_at is None


def test_hosts_join_as_health_checks_pass() -> None:
    clock = FakeClock()
    cb = cluster(clock, health_check=HealthCheckConfig(), outlier_detection=None)
    hc = cb.health_checker
    assert hc is not None
    assert cb.in_panic and chosen(cb) == {0, 1, 2, 3}  # nothing checked yet: all, in panic
    for key, _ in HOSTS[:3]:
        event = hc.result(key, True, clock.now)
        assert event is not None
        cb.health_changed(event)
    assert not cb.in_panic and chosen(cb) == {0, 1, 2}


def test_an_ejected_host_leaves_and_returns() -> None:
    clock = FakeClock()
    cb = cluster(clock, outlier_detection=OutlierDetectionConfig(max_ejection_percent=50))
    for _ in range(5):
        cb.request_started(HOSTS[1][0])
        cb.request_finished(HOSTS[1][0], 0.01, 503)
    assert chosen(cb) == {0, 2, 3}
    clock.advance(30.0)
    assert cb.next_outlier_evaluation_at is not None
    clock.now = max(clock.now, cb.next_outlier_evaluation_at)
    assert len(cb.evaluate_outliers()) == 1
    assert chosen(cb) == {0, 1, 2, 3}


def test_ejections_below_the_panic_threshold_balance_over_all() -> None:
    clock = FakeClock()
    config = OutlierDetectionConfig(max_ejection_percent=100)
    cb = cluster(clock, outlier_detection=config)
    for index in (0, 1, 2):
        for _ in range(5):
            cb.request_finished(HOSTS[index][0], 0.01, None)  # connect failures
    assert cb.in_panic
    assert Counter(cb.choose(NO_CONTEXT) for _ in range(8)) == {0: 2, 1: 2, 2: 2, 3: 2}


def test_membership_change_keeps_survivor_state() -> None:
    clock = FakeClock()
    cb = cluster(clock, outlier_detection=OutlierDetectionConfig())
    cb.request_started(HOSTS[2][0])
    for _ in range(4):
        cb.request_finished(HOSTS[2][0], 0.01, 500)
    cb.set_hosts([HOSTS[2], HOSTS[3], ("10.0.0.9:8080", 1)])  # host 2 is now index 0
    cb.request_finished(HOSTS[2][0], 0.01, 500)  # the fifth 5xx, from before the change
    assert chosen(cb) == {1, 2}


def test_in_flight_counts_follow_the_host_through_a_membership_change() -> None:
    cb = ClusterBalancer(
        LbPolicy(kind=LbKind.LEAST_REQUEST), clock=FakeClock(), rng=random.Random(3)
    )
    busy, other = HOSTS[1][0], HOSTS[2][0]
    cb.set_hosts([HOSTS[0], HOSTS[1]])
    for _ in range(3):
        cb.request_started(busy)  # at index 1
    cb.set_hosts([HOSTS[1], HOSTS[2]])  # busy moves to index 0; index 1 is another host now
    cb.request_started(other)
    for _ in range(3):
        cb.request_finished(busy, 0.01, 200)
    # busy has nothing in flight, other has one: least request must pick busy. Booked by
    # index, the three ends would have gone to other and busy would look loaded for good.
    picks = Counter(cb.choose(NO_CONTEXT) for _ in range(20))
    assert picks == {0: 20}


def test_slow_start_ramps_only_endpoints_that_join_later() -> None:
    clock = FakeClock()
    slow = SlowStartConfig(window=10.0, aggression=1.0, min_weight_percent=10.0)
    cb = ClusterBalancer(LbPolicy(slow_start=slow), clock=clock, rng=random.Random(2))
    cb.set_hosts(HOSTS[:2])
    assert cb.next_ramp_at is None  # the first set is not ramped
    assert [h.weight for h in cb.eligible] == [100, 100]
    clock.now += 1
    cb.set_hosts(HOSTS[:3])
    assert [h.weight for h in cb.eligible] == [100, 100, 10]  # min_weight_percent
    assert cb.next_ramp_at == clock.now + 0.5
    picks = Counter(cb.choose(NO_CONTEXT) for _ in range(210))
    assert picks == {0: 100, 1: 100, 2: 10}
    clock.now += 5
    cb.ramp()
    assert [h.weight for h in cb.eligible] == [100, 100, 50]  # linear: half way
    clock.now += 5
    cb.ramp()
    assert [h.weight for h in cb.eligible] == [100, 100, 100]
    assert cb.next_ramp_at is None
    cb.set_hosts(HOSTS[1:3])  # a host leaving starts nobody's ramp
    assert cb.next_ramp_at is None


def test_slow_start_aggression_ramps_faster_at_first() -> None:
    slow = SlowStartConfig(window=100.0, aggression=2.0, min_weight_percent=0.0)
    assert slow.factor(25.0) == 0.5 and slow.factor(0.0) == 0.0 and slow.factor(100.0) == 1.0
    assert SlowStartConfig(window=100.0).factor(25.0) == 0.25


def test_local_origin_detection_alone_needs_no_sweeps_until_it_ejects() -> None:
    clock = FakeClock()
    cb = ClusterBalancer(LbPolicy(), outlier_detection=LOCAL_ORIGIN_ONLY, clock=clock,
                         rng=random.Random(2))
    cb.set_hosts(HOSTS)
    assert not cb.sweeps_periodically and cb.next_outlier_evaluation_at is None
    for _ in range(50):
        assert not cb.request_finished(HOSTS[0][0], 0.01, 503)  # answers never eject
    assert cb.next_outlier_evaluation_at is None
    ejected = [cb.request_finished(HOSTS[1][0], 0.01, None) for _ in range(5)]
    assert ejected == [False] * 4 + [True]
    assert cb.next_outlier_evaluation_at is not None
    # Swept until it is back and its ejection count has decayed; then quiet again.
    for _ in range(20):
        when = cb.next_outlier_evaluation_at
        if when is None:
            break
        clock.now = max(clock.now, when)
        cb.evaluate_outliers()
    assert cb.next_outlier_evaluation_at is None
    assert 1 in chosen(cb)
