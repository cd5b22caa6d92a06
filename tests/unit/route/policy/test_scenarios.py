"""The cores together, driven the way the router is meant to drive them (a sketch to integrate).

A fake upstream answers each try from a script; time is a fake clock; nothing touches I/O.
"""

from __future__ import annotations

import random
from collections import Counter

from pilotfish.config.route_policy import (
    CircuitBreakerConfig,
    ClusterResilience,
    FallbackConfig,
    RetryBackoff,
    RetryOn,
    RetryPolicy,
    RoutePolicy,
    StaticResponse,
)
from sidecar.route.policy.deadline import DEADLINE_FLAG, RequestDeadline, TimerKind
from sidecar.route.policy.fallback import trigger_for
from sidecar.route.policy.reply import LocalReply
from sidecar.route.policy.retry import Failure, Outcome, RetryState, Verdict
from sidecar.route.policy.runtime import RoutePolicyRuntime
from sidecar.upstream.policy.breaker import OVERFLOW_FLAG, Permit, Resource
from sidecar.upstream.policy.resilience import ClusterResilienceRuntime
from tests.unit.route.policy.fakes import FakeClock

READ_ONLY_RPC = RetryPolicy(
    attempts=2,
    retry_on=frozenset({RetryOn.UNAVAILABLE, RetryOn.RESET}),
    per_try_timeout=0.3,
    backoff=RetryBackoff(base=0.025, max=0.25),
    retry_non_idempotent=True,
)


def drive(
    clock: FakeClock,
    cluster: ClusterResilienceRuntime,
    policy: RetryPolicy,
    script: list[Outcome | float],
    grpc_timeout: bytes | None,
) -> tuple[str, list[tuple[bytes, bytes]]]:
    """One unary request: each script entry is an outcome, or the seconds until a reply that
    never comes (the per-try or the whole deadline fires first). Returns the end and the
    headers each try sent upstream."""
    deadline = RequestDeadline(clock(), route_timeout=15.0, grpc_timeout=grpc_timeout)
    deadline.request_ended(clock())  # unary: the request ends with its headers
    retry = RetryState(policy, method="POST", grpc=True, random=random.Random(3).random)
    request = cluster.breakers.try_acquire_request()
    if request is None:
        return "local reply UO", []
    sent: list[tuple[bytes, bytes]] = []
    retry_permit: Permit | None = None
    try:
        for step in script:
            timer = deadline.attempt_timer(clock(), retry.per_try_timeout)
            header = deadline.upstream_header(clock(), retry.per_try_timeout, grpc=True)
            assert header is not None
            sent += [retry.attempt_header(), header]
            if isinstance(step, float):  # the upstream is silent
                assert timer is not None and timer.delay <= step
                clock.advance(timer.delay)
                if timer.kind is TimerKind.DEADLINE:
                    return f"local reply {DEADLINE_FLAG.code}", sent
                outcome = Outcome(failure=Failure.PER_TRY_TIMEOUT)
            else:
                clock.advance(0.01)
                outcome = step
            if retry_permit is not None:
                retry_permit.release()  # the retried try is over
                retry_permit = None
            decision = retry.should_retry(
                outcome,
                remaining=deadline.remaining(clock()),
                admit=cluster.breakers.try_acquire_retry,
            )
            if not decision.retry:
                end = "ok" if outcome.grpc_status == 0 else f"failed: {decision.verdict.value}"
                return end, sent
            retry_permit = decision.permit
            clock.advance(decision.backoff)
        raise AssertionError("script ran out")
    finally:
        request.release()
        if retry_permit is not None:
            retry_permit.release()


def test_unavailable_then_timeout_then_ok() -> None:
    clock = FakeClock()
    cluster = ClusterResilienceRuntime(ClusterResilience(), clock, random.Random(1).random)
    end, sent = drive(
        clock,
        cluster,
        READ_ONLY_RPC,
        [Outcome(grpc_status=14), 5.0, Outcome(grpc_status=0)],
        grpc_timeout=b"2S",
    )
    assert end == "ok"
    counts = [v for k, v in sent if k == b"x-pilotfish-attempt-count"]
    assert counts == [b"1", b"2", b"3"]
    budgets = [v for k, v in sent if k == b"grpc-timeout"]
    assert budgets == [b"300000u"] * 3  # the per-try timeout is shorter than what is left
    assert all(cluster.breakers.active(r) == 0 for r in Resource)


def test_the_caller_deadline_ends_it_as_deadline_exceeded() -> None:
    clock = FakeClock()
    cluster = ClusterResilienceRuntime(ClusterResilience(), clock, random.Random(1).random)
    end, sent = drive(clock, cluster, READ_ONLY_RPC, [5.0, 5.0, 5.0], grpc_timeout=b"500m")
    assert end == "local reply UT"
    budgets = [v for k, v in sent if k == b"grpc-timeout"]
    assert budgets[0] == b"300000u" and len(budgets) == 2  # the second try had < 200ms
    assert int(budgets[1][:-1]) < 200_000
    assert all(cluster.breakers.active(r) == 0 for r in Resource)


def test_default_policy_does_not_repeat_a_grpc_call_that_reached_the_upstream() -> None:
    clock = FakeClock()
    cluster = ClusterResilienceRuntime(ClusterResilience(), clock, random.Random(1).random)
    end, _ = drive(clock, cluster, RetryPolicy(), [Outcome(failure=Failure.RESET)],
                   grpc_timeout=None)
    assert end == f"failed: {Verdict.NON_IDEMPOTENT.value}"
    # A trailers-only UNAVAILABLE is the exception (as in Istio): retried once by default.
    end, _ = drive(clock, cluster, RetryPolicy(),
                   [Outcome(grpc_status=14), Outcome(grpc_status=14)], grpc_timeout=None)
    assert end == f"failed: {Verdict.EXHAUSTED.value}"
    end, _ = drive(
        clock,
        cluster,
        RetryPolicy(),
        [Outcome(failure=Failure.CONNECT_FAILURE), Outcome(grpc_status=0)],
        grpc_timeout=None,
    )
    assert end == "ok"


def test_breaker_overflow_falls_back_to_a_static_reply() -> None:
    clock = FakeClock()
    counters: Counter[str] = Counter()
    cluster = ClusterResilienceRuntime(
        ClusterResilience(circuit_breakers=CircuitBreakerConfig(max_requests=1)),
        clock,
        random.Random(1).random,
        counters,
    )
    route = RoutePolicyRuntime(
        RoutePolicy(
            fallback=FallbackConfig(response=StaticResponse(grpc_status=14, grpc_message="later"))
        ),
        clock,
    )
    busy = cluster.breakers.try_acquire_request()
    end, _ = drive(clock, cluster, READ_ONLY_RPC, [Outcome(grpc_status=0)], grpc_timeout=None)
    assert end == "local reply UO" and counters["upstream_rq_pending_overflow"] == 1
    assert route.fallback is not None
    reply = route.fallback.decide(trigger_for(OVERFLOW_FLAG), grpc=True)
    assert isinstance(reply, LocalReply) and reply.flag_code == "FB"
    assert dict(reply.headers(grpc=True))[b"grpc-message"] == b"later"
    assert busy is not None
    busy.release()
