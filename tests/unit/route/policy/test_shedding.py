from __future__ import annotations

import pytest

from pilotfish.config.route_policy import LoadSheddingConfig
from sidecar.route.policy.shedding import InFlight, LoadShedder
from tests.unit.route.policy.fakes import FakeClock

CONFIG = LoadSheddingConfig(enabled=True, cpu_threshold=0.8, window=10.0, buckets=10)


def warm_up(shedder: LoadShedder, clock: FakeClock, seconds: int) -> None:
    """Each second: 5 waves of 40 concurrent requests of 0.1 s (200 passes, rt 0.1 s)."""
    for _ in range(seconds):
        for _ in range(5):
            wave = [shedder.try_admit() for _ in range(40)]
            clock.advance(0.1)
            for ticket in wave:
                assert ticket is not None
                ticket.done()
        clock.advance(0.5)


def heat(shedder: LoadShedder, usage: float, samples: int = 100) -> None:
    for _ in range(samples):
        shedder.record_cpu(usage)


def hold(shedder: LoadShedder, n: int) -> list[InFlight]:
    tickets = [shedder.try_admit() for _ in range(n)]
    assert all(t is not None for t in tickets)
    return [t for t in tickets if t is not None]


def test_cpu_is_an_ewma_of_clamped_samples() -> None:
    shedder = LoadShedder(CONFIG, FakeClock())
    shedder.record_cpu(1.0)
    assert shedder.cpu == pytest.approx(0.05)
    shedder.record_cpu(7.0)
    assert shedder.cpu == pytest.approx(0.05 * 0.95 + 0.05)
    heat(shedder, -1.0, 500)
    assert shedder.cpu == pytest.approx(0.0, abs=1e-9)


def test_limit_is_littles_law_over_full_buckets() -> None:
    clock = FakeClock()
    shedder = LoadShedder(CONFIG, clock)
    assert shedder.max_in_flight(clock()) == 1  # no history yet
    warm_up(shedder, clock, 3)
    stats = shedder.stats()
    assert (stats.max_pass, stats.max_in_flight) == (200, 20)
    assert stats.min_rt == pytest.approx(0.1)
    clock.advance(11.0)  # the whole window has passed
    assert shedder.max_in_flight(clock()) == 1


def test_sheds_only_when_cpu_is_high_and_over_the_limit_then_recovers() -> None:
    clock = FakeClock()
    shedder = LoadShedder(CONFIG, clock)
    warm_up(shedder, clock, 3)
    held = hold(shedder, 25)  # cool CPU: nothing is shed, whatever the concurrency
    for ticket in held[20:]:
        ticket.done()
    heat(shedder, 1.0)
    assert shedder.cpu > 0.8
    held = held[:20]
    assert shedder.try_admit() is not None  # 20 in flight is not over the limit of 20
    assert shedder.try_admit() is None  # 21 is
    assert shedder.shed_total == 1 and shedder.stats().cooling_down
    # CPU falls, but during the cool-down the limit still holds.
    heat(shedder, 0.0)
    clock.advance(0.5)
    assert shedder.try_admit() is None
    assert shedder.shed_total == 2
    clock.advance(1.01)  # past the cool-down (counted from the last shed)
    assert shedder.try_admit() is not None
    assert not shedder.stats().cooling_down
    for ticket in held:
        ticket.done()


def test_below_the_limit_a_hot_cpu_sheds_nothing() -> None:
    clock = FakeClock()
    shedder = LoadShedder(CONFIG, clock)
    warm_up(shedder, clock, 2)
    heat(shedder, 1.0)
    held = hold(shedder, 21)
    assert shedder.in_flight == 21
    held[0].done()
    held[0].done()  # twice is harmless
    assert shedder.in_flight == 20


def test_disabled_never_sheds() -> None:
    clock = FakeClock()
    shedder = LoadShedder(LoadSheddingConfig(), clock)
    heat(shedder, 1.0)
    hold(shedder, 50)
    assert shedder.shed_total == 0 and shedder.stats().admitted_total == 50
