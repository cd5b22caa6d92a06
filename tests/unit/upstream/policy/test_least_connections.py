"""Least connections, plain and weighted: the counts come from the caller's pools."""

from __future__ import annotations

import random
from collections import Counter

from pilotfish.config.cluster_policy import LbKind, LbPolicy
from sidecar.upstream.policy.balancers import LeastConnections, make_balancer
from sidecar.upstream.policy.lb import NO_CONTEXT
from tests.unit.upstream.policy.support import FakeClock, make_hosts


def balancer(open_: dict[str, int], weights: list[int] | None = None) -> LeastConnections:
    lb = make_balancer(
        LbPolicy(kind=LbKind.LEAST_CONNECTIONS),
        random.Random(1),
        FakeClock(),
        lambda key: open_.get(key, 0),
    )
    assert isinstance(lb, LeastConnections)
    lb.set_hosts(make_hosts(len(weights) if weights else 3, weights))
    return lb


def test_the_host_with_fewest_connections_wins() -> None:
    open_ = {"10.0.0.0:8080": 5, "10.0.0.1:8080": 1, "10.0.0.2:8080": 3}
    lb = balancer(open_)
    assert [lb.choose(NO_CONTEXT) for _ in range(4)] == [1, 1, 1, 1]
    open_["10.0.0.1:8080"] = 9  # it opened more: the next fewest takes over
    assert lb.choose(NO_CONTEXT) == 2


def test_ties_go_round_robin_so_a_cold_cluster_spreads() -> None:
    lb = balancer({})
    assert Counter(lb.choose(NO_CONTEXT) for _ in range(30)) == {0: 10, 1: 10, 2: 10}


def test_picks_fill_hosts_evenly_as_connections_open() -> None:
    open_: dict[str, int] = {}
    lb = balancer(open_)
    for _ in range(30):
        index = lb.choose(NO_CONTEXT)
        key = f"10.0.0.{index}:8080"
        open_[key] = open_.get(key, 0) + 1  # each pick opens one (an HTTP/1.1 request)
    assert sorted(open_.values()) == [10, 10, 10]


def test_weighted_connections_follow_the_weights() -> None:
    open_: dict[str, int] = {}
    lb = balancer(open_, weights=[1, 3])
    for _ in range(40):
        key = f"10.0.0.{lb.choose(NO_CONTEXT)}:8080"
        open_[key] = open_.get(key, 0) + 1
    assert open_ == {"10.0.0.0:8080": 10, "10.0.0.1:8080": 30}


def test_retry_exclusion_and_no_hosts() -> None:
    lb = balancer({"10.0.0.1:8080": 0, "10.0.0.0:8080": 4, "10.0.0.2:8080": 4})
    assert lb.choose(NO_CONTEXT, exclude={1}) in (0, 2)
    assert lb.choose(NO_CONTEXT, exclude={0, 1, 2}) == 1  # nothing else left: a tried host
    lb.set_hosts([])
    assert lb.choose(NO_CONTEXT) is None
