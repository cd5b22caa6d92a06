from __future__ import annotations

import heapq
from collections import deque
from pathlib import Path

import pytest

from pilotfish.config.route_policy import LoadSheddingConfig
from sidecar.listen.cgroup_cpu import CgroupCpu, quota_cpus, usage_usec
from sidecar.route.policy.shedding import OVERLOADED_HEADER, InFlight, LoadShedder
from tests.unit.route.policy.fakes import FakeClock

CONFIG = LoadSheddingConfig(enabled=True, window=10.0, buckets=10)
LIMIT = 40  # after warm_up: 200 calls/s x 0.1 s, twice (the headroom)


def wave(shedder: LoadShedder, clock: FakeClock, n: int, latency: float) -> None:
    tickets = hold(shedder, n)
    clock.advance(latency)
    for ticket in tickets:
        ticket.done()


def warm_up(shedder: LoadShedder, clock: FakeClock, seconds: int) -> None:
    """Each second: 5 waves of 40 concurrent requests of 0.1 s (200 passes, rt 0.1 s)."""
    for _ in range(seconds):
        for _ in range(5):
            wave(shedder, clock, 40, 0.1)
        clock.advance(0.5)


def hold(shedder: LoadShedder, n: int) -> list[InFlight]:
    tickets = [shedder.try_admit() for _ in range(n)]
    assert all(t is not None for t in tickets)
    return [t for t in tickets if t is not None]


def test_the_estimate_is_max_rate_times_min_latency_over_full_buckets() -> None:
    clock = FakeClock()
    shedder = LoadShedder(CONFIG, clock)
    assert shedder.max_in_flight(clock()) is None  # nothing known: nothing is shed
    warm_up(shedder, clock, 3)
    stats = shedder.stats()
    assert (stats.max_rate, stats.max_in_flight) == (200.0, LIMIT)
    assert stats.min_rt == pytest.approx(0.1)
    clock.advance(11.0)  # the whole window has passed
    assert shedder.max_in_flight(clock()) is None


def test_over_the_estimate_an_app_that_does_not_queue_is_left_alone() -> None:
    clock = FakeClock()
    shedder = LoadShedder(CONFIG, clock)
    warm_up(shedder, clock, 3)
    held = hold(shedder, LIMIT + 10)  # latency still 0.1 s: more in flight, but no queue
    assert shedder.shed_total == 0 and not shedder.stats().saturated
    for ticket in held:
        ticket.done()


def test_queueing_app_sheds_over_the_estimate_then_lets_go_after_the_cool_down() -> None:
    clock = FakeClock()
    shedder = LoadShedder(CONFIG, clock)
    warm_up(shedder, clock, 3)
    wave(shedder, clock, 20, 0.5)  # the app now takes 0.5 s: 0.4 s of queueing...
    assert not shedder.stats().saturated  # ...but one late wave may be a burst
    wave(shedder, clock, 20, 0.5)  # still late 0.5 s later: a standing queue
    assert shedder.stats().saturated
    held = hold(shedder, LIMIT)  # up to the limit: admitted
    assert shedder.try_admit() is None  # one more is shed
    assert shedder.shed_total == 1 and shedder.stats().cooling_down
    held.pop().done()
    for _ in range(15):  # answered fast again: the queue is gone
        wave(shedder, clock, 1, 0.01)
    assert not shedder.saturated(clock())
    held.append(hold(shedder, 1)[0])
    assert shedder.try_admit() is None  # in the cool-down the limit still holds
    clock.advance(1.01)  # past it (counted from the last shed)
    assert shedder.try_admit() is not None
    assert not shedder.stats().cooling_down


def test_a_stall_that_is_over_is_not_a_queue() -> None:
    """The whole machine stops for 0.3 s: the calls in flight all end late, at once, and the
    next ones are fast again. Nothing is shed, even with far more than the limit in flight."""
    clock = FakeClock()
    shedder = LoadShedder(CONFIG, clock)
    warm_up(shedder, clock, 3)
    wave(shedder, clock, LIMIT, 0.3)
    held = hold(shedder, 3 * LIMIT)  # the callers' backlog arrives in one go
    assert not shedder.stats().saturated and shedder.shed_total == 0
    for ticket in held:
        ticket.done()
    wave(shedder, clock, 1, 0.1)
    assert not shedder.stats().saturated


def test_light_traffic_never_sheds_under_the_minimum_concurrency() -> None:
    """10 calls/s of 10 ms estimate a concurrency of 0.2: far under what the app can take, so
    the limit is the floor, not 1."""
    clock = FakeClock()
    shedder = LoadShedder(LoadSheddingConfig(enabled=True, window=10.0, buckets=10), clock)
    for _ in range(30):
        wave(shedder, clock, 1, 0.01)
        clock.advance(0.09)
    assert shedder.max_in_flight(clock()) == 3
    for _ in range(3):
        wave(shedder, clock, 1, 0.2)  # late for 0.4 s: saturated
        clock.advance(0.0)
    assert shedder.stats().saturated
    held = hold(shedder, 3)  # up to the floor: admitted
    assert shedder.try_admit() is None
    for ticket in held:
        ticket.done()


def test_the_pods_cpu_past_its_threshold_is_saturation_too() -> None:
    clock = FakeClock()
    shedder = LoadShedder(CONFIG, clock)
    warm_up(shedder, clock, 2)
    shedder.record_cpu(0.95)  # the first sample is taken as it is
    assert shedder.cpu == 0.95 and shedder.saturated(clock())
    hold(shedder, LIMIT)
    assert shedder.try_admit() is None
    shedder.record_cpu(-1.0)
    assert shedder.cpu == pytest.approx(0.95 * 0.95)


def test_disabled_never_sheds() -> None:
    clock = FakeClock()
    shedder = LoadShedder(LoadSheddingConfig(), clock)
    warm_up(shedder, clock, 2)
    shedder.record_cpu(1.0)
    hold(shedder, 50)
    assert shedder.shed_total == 0 and shedder.stats().admitted_total == 2 * 200 + 50


def test_the_shed_reply_says_not_processed_and_when_to_return() -> None:
    reply = LoadShedder(LoadSheddingConfig(enabled=True, cool_down=1.5), FakeClock()).reply
    assert (reply.http_status, reply.grpc_status, reply.flag_code) == (503, 8, "OM")
    assert dict(reply.extra_headers) == {
        OVERLOADED_HEADER: b"true",
        b"retry-after": b"2",
        b"grpc-retry-pushback-ms": b"2000",
    }


# --- an app offered twice its capacity, on a fake clock ------------------------------------------


def serve(shedding: bool, seconds: float = 10.0) -> tuple[int, int, int]:
    """An app of 4 workers taking 20 ms each (200 calls/s) offered 400 calls/s, with 1 s
    deadlines. Returns (answered within the deadline, shed, late)."""
    clock = FakeClock(0.0)
    shedder = LoadShedder(LoadSheddingConfig(enabled=shedding), clock)
    queue: deque[tuple[float, InFlight]] = deque()
    busy: list[tuple[float, float, int, InFlight]] = []  # (ends, arrived, id, ticket)
    ok = shed = late = 0
    step, arrival, n = 0.0005, 0.0, 0
    while clock.now < seconds:
        while busy and busy[0][0] <= clock.now:
            _, arrived, _, ticket = heapq.heappop(busy)
            ticket.done()
            if clock.now - arrived <= 1.0:
                ok += 1
            else:
                late += 1
        while len(busy) < 4 and queue:
            arrived, ticket = queue.popleft()
            n += 1
            heapq.heappush(busy, (clock.now + 0.02, arrived, n, ticket))
        if clock.now >= arrival:
            arrival += 1 / 400
            admitted = shedder.try_admit()
            if admitted is None:
                shed += 1
            else:
                queue.append((clock.now, admitted))
        clock.advance(step)
    return ok, shed, late


def test_shedding_keeps_an_overloaded_app_serving_most_of_its_capacity() -> None:
    ok, shed, late = serve(shedding=True)
    assert ok >= 0.8 * 200 * 10
    assert shed >= 0.3 * 400 * 10
    unprotected_ok, _, unprotected_late = serve(shedding=False)
    assert late < 0.1 * ok  # the first second, before any estimate
    # Unprotected, the queue grows: most answers come after their deadline.
    assert unprotected_late > unprotected_ok
    assert unprotected_ok < 0.5 * ok


# --- the pod's CPU from its cgroup -------------------------------------------------------------


def test_cgroup_files_parse() -> None:
    assert usage_usec("usage_usec 1234\nuser_usec 1000\n") == 1234
    assert usage_usec("nothing 1\n") is None
    assert quota_cpus("200000 100000\n", 8) == 2.0
    assert quota_cpus("max 100000\n", 8) == 8.0


def test_cgroup_cpu_samples_the_share_of_the_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU
    (tmp_path / "cpu.stat").write_text("usage_usec 1000000\n")
    cpu = CgroupCpu(str(tmp_path))
    assert cpu.sample(10.0) is None  # a first reading has nothing to compare with
    (tmp_path / "cpu.stat").write_text("usage_usec 1400000\n")  # 0.4 s of CPU in 1 s
    assert cpu.sample(11.0) == pytest.approx(0.8)
    assert CgroupCpu(str(tmp_path / "absent")).sample(1.0) is None
