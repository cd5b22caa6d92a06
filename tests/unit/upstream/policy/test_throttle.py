from __future__ import annotations

import random

import pytest

from pilotfish.config.route_policy import AdaptiveThrottlingConfig
from sidecar.route.policy.retry import Failure, Outcome
from sidecar.upstream.policy.throttle import AdaptiveThrottle, reject_probability
from tests.unit.route.policy.fakes import FakeClock

ON = AdaptiveThrottlingConfig(enabled=True, min_requests=0)
UNCAPPED = AdaptiveThrottlingConfig(enabled=True, min_requests=0, max_rejection_probability=1.0)
DEFAULTS = AdaptiveThrottlingConfig(enabled=True)
OK = Outcome(http_status=200, grpc_status=0)
OVERLOADED = Outcome(http_status=200, grpc_status=14)


@pytest.mark.parametrize(
    ("requests", "accepts", "k", "expected"),
    [
        (0, 0, 2.0, 0.0),
        (100, 100, 2.0, 0.0),
        (100, 50, 2.0, 0.0),  # half rejected is still within k = 2
        (100, 40, 2.0, 20 / 101),
        (100, 0, 2.0, 100 / 101),
        (10, 4, 1.5, 4 / 11),
    ],
)
def test_formula(requests: int, accepts: int, k: float, expected: float) -> None:
    assert reject_probability(requests, accepts, k) == pytest.approx(expected)


def test_formula_is_capped() -> None:
    assert reject_probability(100, 0, 2.0, 0.8) == 0.8
    assert reject_probability(100, 40, 2.0, 0.8) == pytest.approx(20 / 101)


def test_accepts() -> None:
    assert OK.accepted
    assert Outcome(http_status=500).accepted  # answered, even if badly: not overload
    assert Outcome(grpc_status=13).accepted
    assert not OVERLOADED.accepted
    assert not Outcome(http_status=429).accepted
    assert not Outcome(http_status=503).accepted
    assert not Outcome(grpc_status=8).accepted
    assert not Outcome(failure=Failure.CONNECT_FAILURE).accepted


def run(throttle: AdaptiveThrottle, outcome: Outcome, n: int) -> int:
    """Send n requests that end in ``outcome``; return how many were admitted."""
    admitted = 0
    for _ in range(n):
        if throttle.try_admit():
            admitted += 1
            throttle.record(outcome.accepted)
    return admitted


def test_probability_follows_the_window_counts() -> None:
    clock = FakeClock()
    throttle = AdaptiveThrottle(ON, clock, random.Random(5).random)
    assert run(throttle, OK, 30) == 30
    assert throttle.probability() == 0.0
    run(throttle, OVERLOADED, 30)
    stats = throttle.stats()
    assert stats.requests == 60
    assert stats.reject_probability == pytest.approx(
        reject_probability(stats.requests, stats.accepts, 2.0)
    )


def test_rejects_by_the_seeded_coin_then_recovers_as_the_window_slides() -> None:
    clock = FakeClock(0.0)
    throttle = AdaptiveThrottle(UNCAPPED, clock, random.Random(11).random)
    admitted = run(throttle, OVERLOADED, 1000)
    assert throttle.rejected_total == 1000 - admitted
    assert admitted < 100  # a dead backend quickly gets only a trickle
    assert throttle.probability() > 0.9
    clock.advance(6.0)  # the window has forgotten everything
    assert throttle.probability() == 0.0
    assert run(throttle, OK, 100) == 100


def test_coin_is_compared_with_the_probability() -> None:
    throttle = AdaptiveThrottle(UNCAPPED, FakeClock(), iter([0.4, 0.6]).__next__)
    for _ in range(9):  # p = 9 / 10 = 0.9 with no accepts...
        throttle._requests[throttle._slot(throttle._clock())] += 1
    assert throttle.probability() == pytest.approx(0.9)
    assert not throttle.try_admit()  # 0.4 < 0.9: rejected
    assert throttle.probability() == pytest.approx(10 / 11)
    assert not throttle.try_admit()  # 0.6 < 0.909


def test_min_requests_and_disabled() -> None:
    clock = FakeClock()
    guarded = AdaptiveThrottle(DEFAULTS, clock, random.Random(1).random)
    assert run(guarded, OVERLOADED, 20) == 20  # the 20th still saw only 19 requests
    assert guarded.probability() == 0.8  # 20 / 21, capped
    off = AdaptiveThrottle(AdaptiveThrottlingConfig(), clock, random.Random(1).random)
    assert run(off, OVERLOADED, 500) == 500


def test_a_dead_backend_still_gets_a_fifth_of_the_requests() -> None:
    throttle = AdaptiveThrottle(ON, FakeClock(), random.Random(3).random)
    admitted = run(throttle, OVERLOADED, 1000)
    assert throttle.probability() == 0.8
    assert 150 < admitted < 260  # about 200: the cap, not requests / (requests + 1)


RATE = 50  # calls per second, paced on the fake clock


def paced(throttle: AdaptiveThrottle, clock: FakeClock, outcome: Outcome, seconds: float) -> int:
    """Offer RATE calls a second for ``seconds``; how many were admitted."""
    admitted = 0
    for _ in range(round(seconds * RATE)):
        if throttle.try_admit():
            admitted += 1
            throttle.record(outcome.accepted)
        clock.advance(1 / RATE)
    return admitted


@pytest.mark.parametrize("history", [0.0, 30.0])  # a fresh caller, or one with healthy history
@pytest.mark.parametrize("seed", range(10))
def test_defaults_admit_most_calls_again_within_ten_seconds_of_an_eight_second_outage(
    history: float, seed: int
) -> None:
    clock = FakeClock(0.0)
    throttle = AdaptiveThrottle(DEFAULTS, clock, random.Random(seed).random)
    paced(throttle, clock, OK, history)
    during = paced(throttle, clock, Outcome(failure=Failure.CONNECT_FAILURE), 8.0)
    assert during < 0.6 * 8 * RATE  # the outage was throttled...
    assert throttle.probability() == pytest.approx(0.8)  # ...as hard as the cap allows
    first_eight = paced(throttle, clock, OK, 8.0)
    last_two = paced(throttle, clock, OK, 2.0)
    assert first_eight >= 0.2 * 8 * RATE  # never below the cap's fifth
    assert last_two > 0.9 * 2 * RATE  # the outage has left the window: (almost) no throttling


def test_the_uncapped_formula_with_a_long_window_barely_recovers() -> None:
    """Why the cap and the short window: the SRE book's settings after the same outage."""
    clock = FakeClock(0.0)
    book = AdaptiveThrottlingConfig(
        enabled=True, window=120.0, buckets=12, max_rejection_probability=1.0
    )
    throttle = AdaptiveThrottle(book, clock, random.Random(7).random)
    paced(throttle, clock, Outcome(failure=Failure.CONNECT_FAILURE), 8.0)
    assert paced(throttle, clock, OK, 10.0) < 0.1 * 10 * RATE
