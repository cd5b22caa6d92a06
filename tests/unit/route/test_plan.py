"""Route plans: what is baked per route must act as the per-request work it replaces."""

from __future__ import annotations

import itertools

from pilotfish.config.model import (
    HeaderMutation,
    PathMatch,
    RouteAction,
    RouteEntry,
    RouteMatch,
    VirtualHost,
    WeightedCluster,
)
from pilotfish.config.route_policy import FaultConfig, RetryPolicy, RoutePolicy
from sidecar.route.plan import STRIPPED_UPSTREAM, HeaderEdit, RoutePlan
from sidecar.route.table import apply_mutation

MUTATIONS = [
    HeaderMutation(),
    HeaderMutation(add=(("x-a", "1", True),)),
    HeaderMutation(add=(("x-a", "2", False),)),  # replaces x-a
    HeaderMutation(remove=frozenset({"x-a", "x-b"})),
    HeaderMutation(add=(("x-b", "3", True), ("x-c", "4", False)), remove=frozenset({"x-d"})),
]
REQUESTS = [
    [],
    [(b"x-a", b"0"), (b"x-b", b"0")],
    [(b"x-d", b"0"), (b"grpc-timeout", b"1S"), (b"x-c", b"0"), (b"x-a", b"9")],
]


def test_merged_edits_equal_the_mutations_applied_one_after_the_other() -> None:
    for first, second in itertools.product(MUTATIONS, repeat=2):
        edit = HeaderEdit(first, second, drop=STRIPPED_UPSTREAM)
        for headers in REQUESTS:
            stripped = [h for h in headers if h[0] not in STRIPPED_UPSTREAM]
            expected = apply_mutation(apply_mutation(stripped, first), second)
            assert edit.apply(headers) == expected, (first, second, headers)
            # Told the names present, it may skip its pass: the same result.
            assert edit.apply(headers, dict(headers)) == expected
            assert edit.apply(headers) is not headers  # the caller's list is left alone


def route(policy: RoutePolicy = RoutePolicy(), timeout: float | None = 15.0) -> RouteEntry:
    return RouteEntry(
        name="r",
        match=RouteMatch(PathMatch(prefix="/")),
        action=RouteAction(clusters=(WeightedCluster("app", 1),), timeout=timeout),
        policy=policy,
    )


def test_a_plan_knows_which_stages_its_route_needs() -> None:
    vhost = VirtualHost(name="v", domains=("*",), routes=())
    assert not RoutePlan(vhost, route()).policies
    fault = RoutePlan(vhost, route(RoutePolicy(fault=FaultConfig())))
    assert fault.policies
    bulkhead = RoutePlan(vhost, route(RoutePolicy(max_concurrent_requests=3)))
    assert bulkhead.policies


def test_the_baked_budget_headers_are_the_whole_timeout_or_the_per_try_timeout() -> None:
    vhost = VirtualHost(name="v", domains=("*",), routes=())
    plan = RoutePlan(vhost, route())
    assert plan.budget_http == (b"x-pilotfish-expected-rq-timeout-ms", b"15000")
    assert plan.budget_grpc == (b"grpc-timeout", b"15000000u")
    per_try = RoutePlan(vhost, route(RoutePolicy(retry=RetryPolicy(per_try_timeout=0.25))))
    assert per_try.budget_http == (b"x-pilotfish-expected-rq-timeout-ms", b"250")
    unbounded = RoutePlan(vhost, route(timeout=None))
    assert unbounded.budget_http is None and unbounded.timeout is None
