from __future__ import annotations

import random
from collections import Counter

from pilotfish.config.model import HeaderMatcher
from pilotfish.config.route_policy import FaultAbort, FaultConfig, FaultDelay
from sidecar.route.policy.fault import NO_FAULT, FaultInjector

GATE = HeaderMatcher(name="x-pilotfish-fault", exact="on")


def test_always_delay_and_abort() -> None:
    injector = FaultInjector(
        FaultConfig(delay=FaultDelay(duration=2.0), abort=FaultAbort(http_status=503))
    )
    decision = injector.decide({}, random.Random(1).random)
    assert decision.injects and decision.delay == 2.0
    assert decision.abort is not None
    assert (decision.abort.http_status, decision.abort.grpc_status) == (503, 14)
    assert decision.abort.flag_code == "FI"


def test_grpc_status_abort_maps_to_http() -> None:
    injector = FaultInjector(FaultConfig(abort=FaultAbort(grpc_status=8)))
    decision = injector.decide({}, random.Random(1).random)
    assert decision.abort is not None
    assert (decision.abort.http_status, decision.abort.grpc_status) == (429, 8)
    headers = dict(decision.abort.headers(grpc=True))
    assert headers[b"grpc-status"] == b"8" and headers[b":status"] == b"200"
    assert headers[b"x-pilotfish-response-flags"] == b"FI"


def test_header_gate() -> None:
    injector = FaultInjector(FaultConfig(abort=FaultAbort(http_status=500), header=GATE))
    rng = random.Random(1).random
    assert injector.decide({}, rng) is NO_FAULT
    assert injector.decide({"x-pilotfish-fault": "off"}, rng) is NO_FAULT
    assert injector.decide({"x-pilotfish-fault": "on"}, rng).abort is not None


def test_percentages_are_independent_and_deterministic() -> None:
    config = FaultConfig(
        delay=FaultDelay(duration=0.5, percentage=30.0),
        abort=FaultAbort(http_status=503, percentage=10.0),
    )
    injector = FaultInjector(config)

    def tally(seed: int) -> Counter[tuple[bool, bool]]:
        rng = random.Random(seed).random
        out: Counter[tuple[bool, bool]] = Counter()
        for _ in range(10_000):
            d = injector.decide({}, rng)
            out[(d.delay is not None, d.abort is not None)] += 1
        return out

    counts = tally(7)
    assert counts == tally(7)
    delayed = counts[(True, False)] + counts[(True, True)]
    aborted = counts[(False, True)] + counts[(True, True)]
    assert 2800 < delayed < 3200
    assert 850 < aborted < 1150
    assert 200 < counts[(True, True)] < 400  # about 3% both


def test_zero_percent_never_and_coins_follow_the_source() -> None:
    never = FaultInjector(FaultConfig(abort=FaultAbort(http_status=503, percentage=0.0)))
    assert never.decide({}, lambda: 0.0) is NO_FAULT
    half = FaultInjector(FaultConfig(delay=FaultDelay(duration=1.0, percentage=50.0)))
    assert half.decide({}, lambda: 0.49).delay == 1.0
    assert half.decide({}, lambda: 0.5) is NO_FAULT
