from __future__ import annotations

from collections import Counter

from sidecar.balancer import SmoothWeightedRoundRobin


def test_round_robin_without_weights_is_even_and_in_order() -> None:
    rr = SmoothWeightedRoundRobin([1, 1, 1])
    assert [rr.pick() for _ in range(6)] == [0, 1, 2, 0, 1, 2]


def test_weights_are_exact_over_a_cycle_and_interleaved() -> None:
    rr = SmoothWeightedRoundRobin([5, 1, 1])
    picks = [rr.pick() for _ in range(7)]
    assert Counter(picks) == {0: 5, 1: 1, 2: 1}
    assert picks == [0, 0, 1, 0, 2, 0, 0]  # the light hosts are spread, not bunched


def test_exclude_skips_hosts_unless_none_left() -> None:
    rr = SmoothWeightedRoundRobin([1, 1])
    assert {rr.pick(exclude={0}) for _ in range(4)} == {1}
    assert rr.pick(exclude={0, 1}) in (0, 1)


def test_empty() -> None:
    assert SmoothWeightedRoundRobin([]).pick() is None
