"""Distribution, host churn and retry exclusion of every load balancer, deterministically."""

from __future__ import annotations

import inspect
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pilotfish.config.cluster_policy import HashOn, LbKind, LbPolicy
from sidecar.upstream.policy import balancers, hashing
from sidecar.upstream.policy.balancers import (
    LeastRequest,
    PeakEwma,
    RandomChoice,
    RoundRobin,
    SmoothWeightedRoundRobin,
    WeightedRandom,
    make_balancer,
)
from sidecar.upstream.policy.lb import NO_CONTEXT, BalancerBase, LbHost, LoadBalancer
from tests.unit.upstream.policy.support import FakeClock, client, make_hosts


def build(kind: LbKind, hosts: list[LbHost], seed: int = 7) -> LoadBalancer:
    # A small prime keeps maglev table builds fast; its behaviour does not depend on size.
    policy = LbPolicy(kind=kind, maglev_table_size=4099)
    lb = make_balancer(policy, random.Random(seed), FakeClock())
    lb.set_hosts(hosts)
    return lb


def picks(lb: LoadBalancer, count: int, exclude: frozenset[int] = frozenset()) -> Counter[int]:
    # Distinct clients, so the hashing balancers spread too.
    out: Counter[int] = Counter()
    for n in range(count):
        choice = lb.choose(client(n), exclude)
        assert choice is not None
        out[choice] += 1
    return out


# Conformance: every balancer, the same contract.


@pytest.mark.parametrize("kind", list(LbKind))
def test_no_hosts_means_no_choice(kind: LbKind) -> None:
    lb = build(kind, [])
    assert lb.choose(client(1)) is None
    assert lb.choose(client(1), {0}) is None


@pytest.mark.parametrize("kind", list(LbKind))
def test_only_the_given_hosts_are_chosen_and_all_of_them(kind: LbKind) -> None:
    # Eligible hosts need not be contiguous: 1 and 3 are unhealthy here.
    hosts = [h for h in make_hosts(5) if h.index in (0, 2, 4)]
    assert set(picks(build(kind, hosts), 300)) == {0, 2, 4}


@pytest.mark.parametrize("kind", list(LbKind))
def test_exclude_is_honoured_while_another_host_exists(kind: LbKind) -> None:
    lb = build(kind, make_hosts(3))
    assert set(picks(lb, 200, frozenset({0, 1}))) == {2}
    # A retry after every host failed still gets a host rather than nothing.
    assert lb.choose(client(1), {0, 1, 2}) in (0, 1, 2)


@pytest.mark.parametrize("kind", list(LbKind))
def test_hosts_come_and_go(kind: LbKind) -> None:
    hosts = make_hosts(4)
    lb = build(kind, hosts)
    lb.on_request_start(3)
    lb.set_hosts(hosts[:3])
    assert set(picks(lb, 300)) == {0, 1, 2}
    lb.on_request_end(3, 0.01, True)  # a request to a departed host may still finish
    lb.on_request_end(42, 0.01, True)  # and an index never seen does no harm
    newcomer = LbHost(4, "10.0.0.99:8080")
    lb.set_hosts([*hosts[:3], newcomer])
    assert set(picks(lb, 400)) == {0, 1, 2, 4}


def test_make_balancer_builds_the_named_kind() -> None:
    expected = {
        LbKind.ROUND_ROBIN: RoundRobin,
        LbKind.WEIGHTED_ROUND_ROBIN: SmoothWeightedRoundRobin,
        LbKind.LEAST_REQUEST: LeastRequest,
        LbKind.PEAK_EWMA: PeakEwma,
        LbKind.RANDOM: RandomChoice,
        LbKind.WEIGHTED_RANDOM: WeightedRandom,
    }
    for kind, cls in expected.items():
        assert type(build(kind, [])) is cls


# Round robin.


def test_round_robin_is_in_order_and_ignores_weights() -> None:
    lb = build(LbKind.ROUND_ROBIN, make_hosts(3, [5, 1, 1]))
    assert [lb.choose(NO_CONTEXT) for _ in range(6)] == [0, 1, 2, 0, 1, 2]


def test_round_robin_skips_an_excluded_host_and_goes_on_after_it() -> None:
    lb = build(LbKind.ROUND_ROBIN, make_hosts(3))
    assert lb.choose(NO_CONTEXT) == 0
    assert lb.choose(NO_CONTEXT, {1}) == 2
    assert lb.choose(NO_CONTEXT) == 0


# Smooth weighted round robin.


def test_weighted_round_robin_is_exact_over_a_cycle_and_interleaved() -> None:
    lb = build(LbKind.WEIGHTED_ROUND_ROBIN, make_hosts(3, [5, 1, 1]))
    sequence = [lb.choose(NO_CONTEXT) for _ in range(7)]
    assert sequence == [0, 0, 1, 0, 2, 0, 0]


def test_weighted_round_robin_keeps_shares_when_a_host_leaves() -> None:
    hosts = make_hosts(3, [3, 2, 1])
    lb = build(LbKind.WEIGHTED_ROUND_ROBIN, hosts)
    picks(lb, 5)
    lb.set_hosts([hosts[0], hosts[2]])
    assert picks(lb, 400) == {0: 300, 2: 100}


# Least request.


def test_least_request_at_rest_spreads_evenly() -> None:
    counts = picks(build(LbKind.LEAST_REQUEST, make_hosts(4)), 4000)
    assert all(900 < c < 1100 for c in counts.values()), counts


def test_least_request_avoids_the_busiest_host() -> None:
    lb = build(LbKind.LEAST_REQUEST, make_hosts(3))
    for _ in range(5):
        lb.on_request_start(0)
    # Two distinct candidates: host 0 always loses to the other one.
    assert 0 not in picks(lb, 300)
    for _ in range(5):
        lb.on_request_end(0, 0.01, True)
    assert 0 in picks(lb, 300)


def test_least_request_keeps_concurrency_even_under_load() -> None:
    lb = build(LbKind.LEAST_REQUEST, make_hosts(4))
    active: list[int] = []
    for _ in range(400):
        choice = lb.choose(NO_CONTEXT)
        assert choice is not None
        lb.on_request_start(choice)
        active.append(choice)
    in_flight = Counter(active)
    assert max(in_flight.values()) - min(in_flight.values()) <= 10, in_flight


def test_weighted_least_request_at_rest_follows_weights_exactly() -> None:
    lb = build(LbKind.LEAST_REQUEST, make_hosts(3, [1, 2, 3]))
    assert picks(lb, 600) == {0: 100, 1: 200, 2: 300}


def test_weighted_least_request_scales_active_requests_by_weight() -> None:
    lb = build(LbKind.LEAST_REQUEST, make_hosts(2, [1, 3]))
    for _ in range(5):
        lb.on_request_start(1)
    # Effective weights 1 / (0 + 1) and 3 / (5 + 1): host 0 now takes two thirds.
    assert picks(lb, 600) == {0: 400, 1: 200}


# Peak EWMA.


def test_peak_ewma_avoids_a_slow_host_until_its_estimate_decays() -> None:
    clock = FakeClock()
    lb = PeakEwma(random.Random(3), clock, decay=10.0, default_rtt=0.01)
    lb.set_hosts(make_hosts(3))
    lb.on_request_start(0)
    lb.on_request_end(0, 1.0, True)  # one very slow response: the peak is taken at once

    def serve(rounds: int) -> Counter[int]:
        counts: Counter[int] = Counter()
        for _ in range(rounds):
            choice = lb.choose(NO_CONTEXT)
            assert choice is not None
            counts[choice] += 1
            lb.on_request_start(choice)
            clock.advance(0.1)
            lb.on_request_end(choice, 0.01, True)
        return counts

    assert serve(200)[0] == 0
    # Without fresh samples host 0's estimate decays below the others' 10 ms in ~46 s.
    assert serve(600)[0] > 0


def test_peak_ewma_counts_a_fast_failure_as_slow() -> None:
    clock = FakeClock()
    lb = PeakEwma(random.Random(3), clock, default_rtt=0.01, failure_penalty=1.0)
    hosts = make_hosts(2)
    lb.set_hosts(hosts)
    lb.on_request_start(0)
    lb.on_request_end(0, 0.0001, False)
    assert lb.cost(hosts[0]) > 50 * lb.cost(hosts[1])


def test_peak_ewma_weighs_in_requests_in_flight_and_weight() -> None:
    clock = FakeClock()
    lb = PeakEwma(random.Random(3), clock, default_rtt=0.01)
    hosts = make_hosts(3, [1, 1, 2])
    lb.set_hosts(hosts)
    for _ in range(3):
        lb.on_request_start(0)
    assert lb.cost(hosts[0]) == pytest.approx(0.04)
    assert lb.cost(hosts[1]) == pytest.approx(0.01)
    assert lb.cost(hosts[2]) == pytest.approx(0.005)


def test_peak_ewma_moves_towards_faster_samples_gradually() -> None:
    clock = FakeClock()
    lb = PeakEwma(random.Random(3), clock, decay=10.0, default_rtt=0.1)
    hosts = make_hosts(1)
    lb.set_hosts(hosts)
    clock.advance(10.0)  # one time constant: the old value keeps e^-1 of its weight
    lb.on_request_start(0)
    lb.on_request_end(0, 0.0, True)
    assert lb.cost(hosts[0]) == pytest.approx(0.1 * 0.36788, rel=1e-3)


# Random.


def test_random_is_uniform_and_ignores_weights() -> None:
    counts = picks(build(LbKind.RANDOM, make_hosts(4, [10, 1, 1, 1])), 8000)
    assert all(1800 < c < 2200 for c in counts.values()), counts


def test_weighted_random_follows_weights() -> None:
    counts = picks(build(LbKind.WEIGHTED_RANDOM, make_hosts(3, [1, 3, 6])), 10000)
    assert 900 < counts[0] < 1100 and 2800 < counts[1] < 3200 and 5800 < counts[2] < 6200


def test_weighted_random_with_exclusion_keeps_relative_weights() -> None:
    lb = build(LbKind.WEIGHTED_RANDOM, make_hosts(3, [1, 3, 6]))
    counts = picks(lb, 9000, frozenset({2}))
    assert set(counts) == {0, 1} and 2000 < counts[0] < 2500, counts


def test_same_seed_same_choices() -> None:
    for kind in (LbKind.LEAST_REQUEST, LbKind.RANDOM, LbKind.WEIGHTED_RANDOM, LbKind.PEAK_EWMA):
        lb_a, lb_b = build(kind, make_hosts(5), seed=11), build(kind, make_hosts(5), seed=11)
        sequence = [lb_a.choose(NO_CONTEXT) for _ in range(50)]
        assert sequence == [lb_b.choose(NO_CONTEXT) for _ in range(50)]
        assert len(set(sequence)) > 1


def test_policy_defaults_keep_todays_behaviour() -> None:
    assert LbPolicy().kind is LbKind.WEIGHTED_ROUND_ROBIN
    assert LbPolicy().hash_on is HashOn.SOURCE_IP


# Properties, over host sets and exclusions Hypothesis makes up (derandomized: reproducible).


@settings(derandomize=True, max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(list(LbKind)),
    weights=st.lists(st.integers(1, 5), min_size=1, max_size=6),
    eligible_mask=st.lists(st.booleans(), min_size=6, max_size=6),
    exclude=st.frozensets(st.integers(0, 5)),
)
def test_choice_is_eligible_and_avoids_exclude_when_it_can(
    kind: LbKind, weights: list[int], eligible_mask: list[bool], exclude: frozenset[int]
) -> None:
    hosts = [h for h in make_hosts(len(weights), weights) if eligible_mask[h.index]]
    lb = build(kind, hosts)
    indices = {h.index for h in hosts}
    for n in range(5):
        choice = lb.choose(client(n), exclude)
        if not hosts:
            assert choice is None
            continue
        assert choice in indices
        if indices - exclude:
            assert choice not in exclude


def test_every_balancer_with_request_hooks_says_so() -> None:
    """The cluster skips the hooks of a balancer whose ``tracks_requests`` is False: one that
    overrides them without saying so would never hear of a request."""
    seen = 0
    for module in (balancers, hashing):
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BalancerBase) and cls is not BalancerBase:
                hooks = (
                    cls.on_request_start is not BalancerBase.on_request_start
                    or cls.on_request_end is not BalancerBase.on_request_end
                )
                assert cls.tracks_requests == hooks, cls.__name__
                seen += hooks
    assert seen >= 2  # least-request and peak-EWMA
