"""The retry stage: what a failed try amounts to, and whether another try replaces it.

In: a try that failed before any of its response went downstream (a connect failure, a reset,
a per-try timeout, or response headers held back: a 5xx, a gRPC trailers-only error, a peer
sidecar's own reply). Out: the backoff before the next try, or None (the exchange answers, or
its fallback does). A ``RetryStage`` is made at a request's first failed try; the requests that
succeed at once, nearly all of them, never make one. It keeps the route's ``RetryState``, the
hosts already tried (a retry prefers another) and the retry permit of the cluster's breakers
for the try it starts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pilotfish.config.route_policy import RetryPolicy
from sidecar.flags import RESPONSE_FLAGS_HEADER
from sidecar.http.streams import Headers
from sidecar.route.policy.retry import (
    Failure,
    Outcome,
    RetryState,
    Verdict,
    peer_not_processed,
    response_outcome,
)
from sidecar.route.policy.shedding import OVERLOADED_HEADER

if TYPE_CHECKING:
    from sidecar.upstream.clusters import ClusterRuntime
    from sidecar.upstream.policy.breaker import Permit


def header(headers: Headers, name: bytes) -> bytes | None:
    """The first value of ``name`` (a lower-case header name)."""
    for k, v in headers:
        if k == name:
            return v
    return None


def from_idle_peer(headers: Headers) -> bool:
    """A local reply of the called service's sidecar that says its app never saw it."""
    flags = header(headers, RESPONSE_FLAGS_HEADER)
    return flags is not None and peer_not_processed(flags)


def response_failure(
    headers: Headers, status: int, grpc_status: bytes | None, *, grpc: bool, replayable: bool
) -> Outcome:
    """What a failed response (5xx, gRPC error, a peer sidecar's reply) is to the retry policy."""
    grpc_int = int(grpc_status) if grpc_status and grpc_status.isdigit() else None
    if from_idle_peer(headers):
        # A peer sidecar's own reply that its app never saw: retried like a connect failure.
        return Outcome(
            http_status=status,
            grpc_status=grpc_int,
            failure=Failure.PEER_NOT_PROCESSED,
            body_replayable=replayable,
        )
    if header(headers, OVERLOADED_HEADER) is not None:
        # The upstream's sidecar shed it before its app saw it: another host may take it.
        # Its retry hint is for the caller, not for a retry on a different host.
        return Outcome(
            http_status=status, grpc_status=grpc_int, failure=Failure.SHED,
            body_replayable=replayable,
        )  # fmt: skip
    return response_outcome(
        status,
        grpc=grpc,
        grpc_status=grpc_status,
        pushback_ms=header(headers, b"grpc-retry-pushback-ms"),
        body_replayable=replayable,
    )


def _with_replay(outcome: Outcome, replayable: bool) -> Outcome:
    if outcome.body_replayable == replayable:
        return outcome
    return Outcome(
        http_status=outcome.http_status,
        grpc_status=outcome.grpc_status,
        failure=outcome.failure,
        request_sent=outcome.request_sent,
        body_replayable=replayable,
        pushback=outcome.pushback,
    )


class RetryStage:
    """The retry bookkeeping of one request, from its first failed try on."""

    __slots__ = ("exhausted", "permit", "state", "tried")

    def __init__(
        self, policy: RetryPolicy, *, method: str, grpc: bool, random: Callable[[], float]
    ) -> None:
        self.state = RetryState(policy, method=method, grpc=grpc, random=random)
        self.tried: set[int] = set()  # hosts of the current cluster that failed a try
        self.exhausted = False  # flagged URX at the end, after the flag of the failure itself
        self.permit: Permit | None = None  # the breakers' retry permit, for the next try

    def attempt_header(self) -> tuple[bytes, bytes]:
        return self.state.attempt_header()

    def decide(
        self,
        outcome: Outcome,
        cluster: ClusterRuntime,
        failed_host: int,
        *,
        remaining: float | None,
        replayable: bool,
    ) -> float | None:
        """The backoff before the next try, or None: no retry (the reason is counted)."""
        self.tried.add(failed_host)
        outcome = _with_replay(outcome, replayable)
        decision = self.state.should_retry(
            outcome,
            remaining=remaining,
            admit=cluster.resilience.breakers.try_acquire_retry,
            other_host=cluster.has_untried_host(self.tried),
        )
        throttle = cluster.resilience.throttle
        if throttle is not None:
            throttle.record(outcome.accepted)
        if not decision.retry:
            if decision.verdict is Verdict.EXHAUSTED:
                self.exhausted = True
            return None  # a retry the breaker refused was counted there
        cluster.scope.inc("upstream_rq_retry")
        cluster.metrics.retries.value += 1
        self.permit = decision.permit
        return decision.backoff

    def release(self) -> None:
        """The request is over: a retry permit not handed to a try goes back."""
        permit, self.permit = self.permit, None
        if permit is not None:
            permit.release()
