from __future__ import annotations

import random

import pytest

from pilotfish.config.route_policy import RetryBackoff, RetryOn, RetryPolicy
from sidecar.route.policy.retry import (
    ATTEMPT_COUNT_HEADER,
    Failure,
    Outcome,
    RetryState,
    Verdict,
    matches,
    peer_not_processed,
    response_outcome,
)
from sidecar.upstream.policy.breaker import CircuitBreakers, Permit


def state(
    policy: RetryPolicy, method: str = "GET", grpc: bool = False, seed: int = 1
) -> RetryState:
    return RetryState(policy, method=method, grpc=grpc, random=random.Random(seed).random)


RESET = Outcome(failure=Failure.RESET)
CONNECT = Outcome(failure=Failure.CONNECT_FAILURE)


@pytest.mark.parametrize(
    ("condition", "outcome", "expected"),
    [
        (RetryOn.HTTP_5XX, Outcome(http_status=500), True),
        (RetryOn.HTTP_5XX, Outcome(http_status=404), False),
        (RetryOn.HTTP_5XX, RESET, True),
        (RetryOn.HTTP_5XX, Outcome(failure=Failure.PER_TRY_TIMEOUT), True),
        (RetryOn.GATEWAY_ERROR, Outcome(http_status=503), True),
        (RetryOn.GATEWAY_ERROR, Outcome(http_status=500), False),
        (RetryOn.GATEWAY_ERROR, Outcome(failure=Failure.PER_TRY_TIMEOUT), True),
        (RetryOn.RESET, RESET, True),
        (RetryOn.RESET, CONNECT, False),
        (RetryOn.CONNECT_FAILURE, CONNECT, True),
        (RetryOn.REFUSED_STREAM, Outcome(failure=Failure.BEYOND_GOAWAY), True),
        (RetryOn.UNAVAILABLE, Outcome(http_status=200, grpc_status=14), True),
        (RetryOn.UNAVAILABLE, Outcome(http_status=200, grpc_status=13), False),
        (RetryOn.INTERNAL, Outcome(grpc_status=13), True),
        (RetryOn.CANCELLED, Outcome(grpc_status=1), True),
        (RetryOn.DEADLINE_EXCEEDED, Outcome(grpc_status=4), True),
        (RetryOn.RESOURCE_EXHAUSTED, Outcome(grpc_status=8), True),
        (RetryOn.RETRIABLE_STATUS_CODES, Outcome(http_status=409), True),
        (RetryOn.RETRIABLE_STATUS_CODES, Outcome(http_status=410), False),
    ],
)
def test_conditions(condition: RetryOn, outcome: Outcome, expected: bool) -> None:
    policy = RetryPolicy(retry_on=frozenset({condition}), retriable_status_codes=frozenset({409}))
    assert matches(policy, outcome) is expected


def test_success_is_not_retried() -> None:
    s = state(RetryPolicy(retry_on=frozenset(RetryOn)))
    assert s.should_retry(Outcome(http_status=200, grpc_status=0)).verdict is Verdict.NOT_RETRIABLE


def test_attempts_are_counted_and_exhausted() -> None:
    s = state(RetryPolicy(attempts=2))
    assert s.attempt_header() == (ATTEMPT_COUNT_HEADER, b"1")
    assert s.should_retry(RESET).retry
    assert s.should_retry(RESET).retry
    assert s.attempt_header() == (ATTEMPT_COUNT_HEADER, b"3")
    assert s.should_retry(RESET).verdict is Verdict.EXHAUSTED
    assert s.retries == 2


def test_zero_attempts_never_retries_but_still_retries_transparently() -> None:
    s = state(RetryPolicy(attempts=0))
    assert s.should_retry(RESET).verdict is Verdict.EXHAUSTED
    assert s.should_retry(CONNECT).retry
    assert s.should_retry(Outcome(failure=Failure.REFUSED_STREAM)).retry
    assert s.should_retry(Outcome(failure=Failure.PEER_NOT_PROCESSED, grpc_status=14)).retry
    assert s.retries == 0 and s.transparent_retries == 3


def test_backoff_is_full_jitter_growing_to_the_cap() -> None:
    policy = RetryPolicy(attempts=10, backoff=RetryBackoff(base=0.025, max=0.25))
    s = state(policy, seed=42)
    expected_rng = random.Random(42)
    ceilings = [0.025, 0.075, 0.175, 0.25, 0.25, 0.25]
    for ceiling in ceilings:
        decision = s.should_retry(RESET)
        assert decision.retry
        assert decision.backoff == pytest.approx(expected_rng.random() * ceiling)
        assert 0 <= decision.backoff < ceiling


def test_non_idempotent_only_when_it_never_reached_the_upstream() -> None:
    policy = RetryPolicy(attempts=5, retry_on=frozenset(RetryOn))
    post = state(policy, method="POST")
    assert post.should_retry(RESET).verdict is Verdict.NON_IDEMPOTENT
    assert post.should_retry(Outcome(http_status=503)).verdict is Verdict.NON_IDEMPOTENT
    assert post.should_retry(Outcome(failure=Failure.PER_TRY_TIMEOUT)).verdict is (
        Verdict.NON_IDEMPOTENT
    )
    assert post.should_retry(CONNECT).retry
    assert post.should_retry(Outcome(failure=Failure.RESET, request_sent=False)).retry
    grpc = state(policy, method="POST", grpc=True)
    assert grpc.should_retry(Outcome(grpc_status=13)).verdict is Verdict.NON_IDEMPOTENT
    assert grpc.should_retry(RESET).verdict is Verdict.NON_IDEMPOTENT
    get_over_grpc = state(policy, method="GET", grpc=True)  # gRPC is never idempotent by method
    assert get_over_grpc.should_retry(RESET).verdict is Verdict.NON_IDEMPOTENT


def test_grpc_unavailable_is_retried_within_attempts_and_budget_as_istio_does() -> None:
    """A trailers-only UNAVAILABLE: the server declined the call before answering it."""
    s = state(RetryPolicy(attempts=1), method="POST", grpc=True)
    unavailable = Outcome(http_status=200, grpc_status=14)
    assert s.should_retry(unavailable, admit=lambda: None).verdict is Verdict.OVERFLOW
    decision = s.should_retry(unavailable, admit=CircuitBreakers().try_acquire_retry)
    assert decision.retry and decision.permit is not None
    assert s.should_retry(unavailable).verdict is Verdict.EXHAUSTED
    # Over HTTP, a POST answered 503 may have done its work: not repeated.
    post = state(RetryPolicy(attempts=1, retry_on=frozenset(RetryOn)), method="POST")
    assert post.should_retry(Outcome(http_status=503)).verdict is Verdict.NON_IDEMPOTENT


def test_a_peer_sidecars_own_reply_is_retried_free_even_without_retry_on() -> None:
    s = state(RetryPolicy(attempts=0, retry_on=frozenset()), method="POST", grpc=True)
    peer = Outcome(http_status=200, grpc_status=14, failure=Failure.PEER_NOT_PROCESSED)
    decision = s.should_retry(peer, admit=lambda: None)
    assert decision.retry and decision.permit is None and decision.backoff == 0.0


@pytest.mark.parametrize(
    ("flags", "expected"),
    [(b"UF", True), (b"UH", True), (b"NR", True), (b"DR", True), (b"URX,UF", True),
     (b"UT", False), (b"UR", False), (b"FI", False), (b"", False), (b"UFX", False)],
)
def test_peer_flags_that_mean_the_app_never_saw_the_call(flags: bytes, expected: bool) -> None:
    assert peer_not_processed(flags) is expected


def test_route_opt_in_retries_non_idempotent_requests() -> None:
    policy = RetryPolicy(attempts=1, retry_non_idempotent=True)
    assert state(policy, method="POST", grpc=True).should_retry(Outcome(grpc_status=14)).retry


def test_transparent_retries_do_not_use_attempts_or_admission() -> None:
    s = state(RetryPolicy(attempts=1), method="POST", grpc=True)
    refused = Outcome(failure=Failure.REFUSED_STREAM)
    for _ in range(3):
        decision = s.should_retry(refused, admit=lambda: None)
        assert decision.retry and decision.backoff == 0.0
    assert s.transparent_retries == 3 and s.retries == 0
    # Past the transparent limit, refused-stream is an ordinary (admitted) retry.
    breakers = CircuitBreakers()
    decision = s.should_retry(refused, admit=breakers.try_acquire_retry)
    assert decision.retry and decision.permit is not None
    assert s.retries == 1
    assert s.should_retry(Outcome(failure=Failure.BEYOND_GOAWAY)).verdict is Verdict.EXHAUSTED


def test_connect_failures_are_free_only_with_another_host_to_try() -> None:
    s = state(RetryPolicy(attempts=1), method="POST", grpc=True)
    decision = s.should_retry(CONNECT, admit=lambda: None, other_host=False)
    assert decision.verdict is Verdict.OVERFLOW  # an ordinary retry, asked to the budget
    assert s.should_retry(CONNECT, admit=lambda: None, other_host=True).retry
    # A refused stream costs nothing even on the same host: a new stream, maybe a new connection.
    assert s.should_retry(Outcome(failure=Failure.REFUSED_STREAM), other_host=False).retry
    assert s.transparent_retries == 2


def test_body_not_replayable() -> None:
    s = state(RetryPolicy())
    gone = Outcome(failure=Failure.RESET, body_replayable=False)
    assert s.should_retry(gone).verdict is Verdict.BODY_NOT_REPLAYABLE
    refused = Outcome(failure=Failure.REFUSED_STREAM, body_replayable=False)
    assert s.should_retry(refused).verdict is Verdict.BODY_NOT_REPLAYABLE
    assert s.retries == 0 and s.attempt == 1


def test_no_retry_past_the_deadline() -> None:
    s = state(RetryPolicy(backoff=RetryBackoff(base=1.0, max=1.0)), seed=3)
    assert s.should_retry(RESET, remaining=0.0001).verdict is Verdict.DEADLINE
    assert s.should_retry(Outcome(failure=Failure.REFUSED_STREAM), remaining=0.0).verdict is (
        Verdict.DEADLINE
    )
    assert s.should_retry(RESET, remaining=5.0).retry


def test_admission_is_asked_last_and_only_for_real_candidates() -> None:
    asked: list[bool] = []

    def deny() -> Permit | None:
        asked.append(True)
        return None

    s = state(RetryPolicy())
    assert s.should_retry(Outcome(http_status=404), admit=deny).verdict is Verdict.NOT_RETRIABLE
    assert not asked
    assert s.should_retry(RESET, admit=deny).verdict is Verdict.OVERFLOW
    assert asked == [True]
    assert s.retries == 0


def test_grpc_pushback() -> None:
    s = state(RetryPolicy(attempts=3, retry_non_idempotent=True), method="POST", grpc=True)
    assert s.should_retry(Outcome(grpc_status=14, pushback=-1.0)).verdict is Verdict.PUSHBACK
    decision = s.should_retry(Outcome(grpc_status=14, pushback=0.4))
    assert decision.retry and decision.backoff == 0.4
    assert s.should_retry(Outcome(grpc_status=14, pushback=2.0), remaining=1.0).verdict is (
        Verdict.DEADLINE
    )


def test_defaults_are_conservative() -> None:
    policy = RetryPolicy()
    assert policy.attempts == 1
    assert not matches(policy, Outcome(http_status=500))
    assert matches(policy, Outcome(grpc_status=14))
    assert not policy.retry_non_idempotent


def test_response_outcome() -> None:
    trailers_only = response_outcome(200, grpc=True, grpc_status=b"14", pushback_ms=b"250")
    assert (trailers_only.grpc_status, trailers_only.pushback) == (14, 0.25)
    assert response_outcome(503, grpc=True).grpc_status == 14  # no grpc-status: mapped
    assert response_outcome(200, grpc=True).grpc_status is None  # the body follows
    assert response_outcome(503, grpc=False).grpc_status is None
    assert response_outcome(200, grpc=True, grpc_status=b"x").grpc_status == 2
    assert response_outcome(200, grpc=True, grpc_status=b"14", pushback_ms=b"-1").pushback == -1.0
    s = state(RetryPolicy(retry_non_idempotent=True), method="POST", grpc=True)
    assert s.should_retry(response_outcome(200, grpc=True, grpc_status=b"0")).verdict is (
        Verdict.NOT_RETRIABLE
    )
