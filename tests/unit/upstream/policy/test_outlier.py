"""Outlier detection: inline and interval ejections, ejection time, limits; panic mode."""

from __future__ import annotations

import random

from pilotfish.config.cluster_policy import LOCAL_ORIGIN_ONLY, OutlierDetectionConfig
from sidecar.upstream.policy.eligibility import (
    HostState,
    balancer_hosts,
    eligible_hosts,
    in_panic,
)
from sidecar.upstream.policy.lb import LbHost
from sidecar.upstream.policy.outlier import (
    EjectionReason,
    HostEjected,
    HostUnejected,
    OutlierDetector,
    OutlierEvent,
)
from tests.unit.upstream.policy.support import FakeClock

KEYS = [f"10.0.0.{i}:8080" for i in range(10)]
A = KEYS[0]


def detector(clock: FakeClock, hosts: int = 10, **overrides: object) -> OutlierDetector:
    config = OutlierDetectionConfig(**overrides)  # type: ignore[arg-type]
    od = OutlierDetector(config, clock, random.Random(9))
    od.set_hosts(KEYS[:hosts])
    return od


def fail(od: OutlierDetector, key: str, times: int, status: int | None = 500) -> list[HostEjected]:
    return [e for _ in range(times) if (e := od.report(key, status)) is not None]


def sweep(od: OutlierDetector, clock: FakeClock) -> list[OutlierEvent]:
    clock.now = od.next_evaluation_at
    return od.evaluate()


def test_five_consecutive_5xx_eject_for_the_base_time() -> None:
    clock = FakeClock()
    od = detector(clock)
    assert fail(od, A, 4) == []
    assert od.report(A, 200) is None  # a success resets the run
    assert fail(od, A, 4) == []
    assert fail(od, A, 1) == [
        HostEjected(key=A, reason=EjectionReason.CONSECUTIVE_5XX, until=clock.now + 30.0)
    ]
    assert od.is_ejected(A)


def test_connect_failures_count_as_5xx_unless_split() -> None:
    od = detector(FakeClock(), split_external_local_origin_errors=False)
    assert len(fail(od, A, 5, status=None)) == 1


def test_local_origin_failures_count_apart_by_default() -> None:
    clock = FakeClock()
    od = detector(clock, max_ejection_percent=50)
    assert fail(od, A, 4, status=500) == []
    assert fail(od, A, 4, status=None) == []  # not part of the 5xx run...
    assert fail(od, A, 1, status=500) == [
        HostEjected(key=A, reason=EjectionReason.CONSECUTIVE_5XX, until=clock.now + 30.0)
    ]
    b = KEYS[1]
    assert fail(od, b, 4, status=None) == []
    assert od.report(b, 503) is None  # ...and any answer ends a local-origin run
    assert fail(od, b, 4, status=None) == []
    assert [e.reason for e in fail(od, b, 1, status=None)] == [
        EjectionReason.CONSECUTIVE_LOCAL_ORIGIN_FAILURE
    ]


def test_clusters_without_outlier_detection_eject_only_unreachable_hosts() -> None:
    od = OutlierDetector(LOCAL_ORIGIN_ONLY, FakeClock(), random.Random(9))
    od.set_hosts(KEYS)
    assert fail(od, A, 50, status=503) == []
    for _ in range(20):
        od.report(KEYS[1], 200)
    od.report(KEYS[2], 200)
    assert [e.key for e in fail(od, KEYS[3], 5, status=None)] == [KEYS[3]]


def test_without_rate_detection_a_success_still_ends_runs_but_not_an_ejected_hosts() -> None:
    """Successes are recorded only where they change something: a run of failures to end."""
    clock = FakeClock()
    od = detector(clock, enforcing_success_rate=0, enforcing_failure_percentage=0)
    assert not od.periodic
    assert fail(od, A, 4) == [] and fail(od, A, 4, status=None) == []
    assert od.report(A, 200) is None  # ends both runs
    assert fail(od, A, 4) == [] and fail(od, A, 4, status=None) == []
    assert [e.reason for e in fail(od, A, 1, status=None)] == [
        EjectionReason.CONSECUTIVE_LOCAL_ORIGIN_FAILURE
    ]
    # An ejected host's successes (panic mode) end no run.
    assert od.report(A, 200) is None
    assert od.hosts[A].consecutive_local_origin_failures == 5
    assert od.hosts[A].successes == 0  # no rates are judged: none are counted
    assert sweep(od, clock) == []  # still ejected
    clock.now = od.hosts[A].ejected_until or 0.0
    assert od.evaluate() == [HostUnejected(key=A)]
    assert fail(od, A, 4) == []
    assert od.report(A, 200) is None and od.hosts[A].consecutive_5xx == 0
    assert fail(od, A, 4) == []
    od.set_hosts(KEYS[1:])  # A departs mid-run: a late success from it is ignored
    assert od.report(A, 200) is None and A not in od.failing


def test_gateway_failures_are_detected_but_not_enforced_by_default() -> None:
    clock = FakeClock()
    od = detector(clock, consecutive_5xx=100)
    assert fail(od, A, 10, status=503) == []
    od = detector(clock, consecutive_5xx=100, enforcing_consecutive_gateway_failure=100)
    assert fail(od, A, 4, status=502) == []
    assert fail(od, A, 1, status=500) == []  # a 500 is no gateway failure: the run restarts
    events = fail(od, A, 5, status=504)
    assert [e.reason for e in events] == [EjectionReason.CONSECUTIVE_GATEWAY_FAILURE]


def test_enforcing_percentage_is_a_seeded_chance() -> None:
    ejected = 0
    for seed in range(200):
        od = OutlierDetector(
            OutlierDetectionConfig(enforcing_consecutive_5xx=25), FakeClock(), random.Random(seed)
        )
        od.set_hosts(KEYS)
        ejected += len(fail(od, A, 5))
    assert 30 < ejected < 70


def test_the_host_returns_at_the_first_sweep_after_its_time() -> None:
    clock = FakeClock()
    od = detector(clock, interval=10.0, base_ejection_time=30.0)
    fail(od, A, 5)
    assert sweep(od, clock) == [] and sweep(od, clock) == []
    assert sweep(od, clock) == [HostUnejected(key=A)]
    assert not od.is_ejected(A)


def test_ejection_time_grows_with_repeat_ejections_up_to_the_max() -> None:
    clock = FakeClock()
    od = detector(clock, interval=10.0, base_ejection_time=30.0, max_ejection_time=70.0)
    durations = []
    for _ in range(4):
        (event,) = fail(od, A, 5)
        durations.append(event.until - clock.now)
        while not any(isinstance(e, HostUnejected) for e in sweep(od, clock)):
            pass
    assert durations == [30.0, 60.0, 70.0, 70.0]


def test_time_in_service_brings_the_ejection_time_back_down() -> None:
    clock = FakeClock()
    od = detector(clock, interval=10.0, base_ejection_time=30.0)
    for _ in range(2):
        fail(od, A, 5)
        while not any(isinstance(e, HostUnejected) for e in sweep(od, clock)):
            pass
    for _ in range(2):
        sweep(od, clock)  # two sweeps in service: the count drops from 2 to 0
    (event,) = fail(od, A, 5)
    assert event.until - clock.now == 30.0


def test_max_ejection_percent_allows_one_host_then_stops() -> None:
    clock = FakeClock()
    od = detector(clock, hosts=10, max_ejection_percent=10)
    assert len(fail(od, KEYS[0], 5)) == 1
    assert fail(od, KEYS[1], 5) == []
    od = detector(clock, hosts=4, max_ejection_percent=10)  # 10% of 4 hosts: still one
    assert len(fail(od, KEYS[0], 5)) == 1
    od = detector(clock, hosts=10, max_ejection_percent=25)
    assert [len(fail(od, k, 5)) for k in KEYS[:4]] == [1, 1, 1, 0]


def test_an_ejected_host_gets_no_new_ejection_from_panic_traffic() -> None:
    clock = FakeClock()
    od = detector(clock)
    fail(od, A, 5)
    assert fail(od, A, 20) == []


def traffic(od: OutlierDetector, rates: dict[str, float], volume: int = 200) -> None:
    """``volume`` responses per host, the given share of them successes."""
    for key, rate in rates.items():
        for n in range(volume):
            od.report(key, 200 if n < rate * volume else 500)


def test_success_rate_ejects_the_host_far_below_its_peers() -> None:
    clock = FakeClock()
    od = detector(clock, hosts=6, consecutive_5xx=1000)
    rates = dict.fromkeys(KEYS[:6], 0.99)
    rates[KEYS[5]] = 0.6
    traffic(od, rates)
    events = sweep(od, clock)
    assert events == [
        HostEjected(key=KEYS[5], reason=EjectionReason.SUCCESS_RATE, until=clock.now + 30.0)
    ]


def test_success_rate_needs_enough_hosts_with_enough_requests() -> None:
    clock = FakeClock()
    od = detector(clock, hosts=6, consecutive_5xx=1000)
    rates = dict.fromkeys(KEYS[:6], 0.99)
    rates[KEYS[5]] = 0.6
    traffic(od, rates, volume=99)  # below success_rate_request_volume: no verdict
    assert sweep(od, clock) == []
    od = detector(clock, hosts=4, consecutive_5xx=1000)  # below success_rate_minimum_hosts
    traffic(od, {k: 0.99 for k in KEYS[:3]} | {KEYS[3]: 0.1})
    assert sweep(od, clock) == []


def test_counts_start_over_each_interval() -> None:
    clock = FakeClock()
    od = detector(clock, hosts=6, consecutive_5xx=1000)
    rates = dict.fromkeys(KEYS[:6], 0.99)
    rates[KEYS[5]] = 0.6
    traffic(od, rates, volume=60)
    assert sweep(od, clock) == []
    traffic(od, rates, volume=60)
    assert sweep(od, clock) == []


def test_failure_percentage_when_enforced() -> None:
    clock = FakeClock()
    od = detector(
        clock,
        hosts=5,
        consecutive_5xx=1000,
        enforcing_success_rate=0,
        enforcing_failure_percentage=100,
        max_ejection_percent=50,
    )
    # All hosts fail a lot, so success rate sees no outlier; failure percentage does.
    traffic(od, {KEYS[0]: 0.1, KEYS[1]: 0.14, KEYS[2]: 0.5, KEYS[3]: 0.5, KEYS[4]: 0.5})
    events = sweep(od, clock)
    assert {e.key for e in events} == {KEYS[0], KEYS[1]}
    assert {e.reason for e in events if isinstance(e, HostEjected)} == {
        EjectionReason.FAILURE_PERCENTAGE
    }


def test_hosts_come_and_go() -> None:
    clock = FakeClock()
    od = detector(clock, hosts=3)
    fail(od, A, 5)
    od.set_hosts([A, KEYS[5]])
    assert od.is_ejected(A) and not od.is_ejected(KEYS[5])
    assert od.report(KEYS[1], 500) is None  # a late response from a departed host


# Eligibility and panic.


def states(usable: list[bool]) -> list[HostState]:
    return [HostState(KEYS[i], health_check_ok=u) for i, u in enumerate(usable)]


def test_eligible_hosts_leave_out_failed_and_ejected_ones() -> None:
    hosts = [
        HostState(KEYS[0]),
        HostState(KEYS[1], health_check_ok=False),
        HostState(KEYS[2], ejected=True),
        HostState(KEYS[3], weight=3),
    ]
    assert eligible_hosts(hosts) == [0, 3]
    assert balancer_hosts(hosts) == [LbHost(0, KEYS[0]), LbHost(3, KEYS[3], 3)]


def test_below_the_panic_threshold_all_hosts_are_eligible() -> None:
    half = states([True, True, False, False])
    assert not in_panic(half) and eligible_hosts(half) == [0, 1]
    below = states([True, False, False, False])
    assert in_panic(below) and eligible_hosts(below) == [0, 1, 2, 3]
    assert eligible_hosts(states([False, False])) == [0, 1]


def test_panic_threshold_zero_disables_panic() -> None:
    assert eligible_hosts(states([True, False, False, False]), panic_threshold=0) == [0]
    assert eligible_hosts(states([False, False]), panic_threshold=0) == []
    assert eligible_hosts([]) == []
