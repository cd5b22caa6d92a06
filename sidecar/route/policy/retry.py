"""Retries: whether a failed try is tried again, and after how long.

The router asks ``RetryState.should_retry`` at the moment a try fails and before anything of its
response went downstream: on a connect failure, a reset, a per-try timeout, or on response
headers it is holding back (a 5xx, or a gRPC trailers-only response with its grpc-status).
A gRPC status arriving in trailers after data cannot be retried: the response has started.

Tries that provably never reached an app are retried transparently, on another host, whatever
``retry_on``, ``attempts``, the retry budget and idempotency say (up to 3 per request): a
connect failure, a refused stream, a stream beyond a GOAWAY's last stream id, and a peer
sidecar's own local reply saying it did not pass the request on (flags UF, UH, NR, DR in
``x-pilotfish-response-flags``). The upstream did no work for them.

Otherwise, safety first: a request that is not idempotent (POST, PATCH, every gRPC call unless
the route says ``retry_non_idempotent``) is not repeated once it may have reached the app, with
one exception taken from Istio's default: a gRPC trailers-only ``UNAVAILABLE`` (the server
declined the call before answering) is retried when ``retry_on`` names ``unavailable``, within
``attempts`` and the retry budget.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pilotfish.config.route_policy import RetryOn, RetryPolicy
from sidecar.route.policy import RandomSource
from sidecar.route.policy.reply import http_to_grpc

if TYPE_CHECKING:
    from sidecar.upstream.policy.breaker import Permit

ATTEMPT_COUNT_HEADER = b"x-pilotfish-attempt-count"
"""Sent upstream with the 1-based number of the try, like Envoy's x-envoy-attempt-count."""
TRANSPARENT_RETRY_LIMIT = 3
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
"""RFC 9110 section 9.2.2."""


class Failure(enum.Enum):
    """How a try failed without a usable response."""

    CONNECT_FAILURE = "connect_failure"  # never reached the upstream
    REFUSED_STREAM = "refused_stream"  # never processed (RST_STREAM REFUSED_STREAM)
    BEYOND_GOAWAY = "beyond_goaway"  # never processed (stream id above GOAWAY last_stream_id)
    RESET = "reset"  # reset or connection lost after the request was sent
    PER_TRY_TIMEOUT = "per_try_timeout"
    SHED = "shed"  # the upstream's sidecar shed it unprocessed (x-pilotfish-overloaded)
    PEER_NOT_PROCESSED = "peer_not_processed"  # a peer sidecar answered itself (UF, UH, NR, DR)


NEVER_REACHED = frozenset({
    Failure.CONNECT_FAILURE, Failure.REFUSED_STREAM, Failure.BEYOND_GOAWAY, Failure.SHED,
    Failure.PEER_NOT_PROCESSED,
})
# A shed never reached the app either, but counts as a try: an overloaded host is not retried
# for free.
TRANSPARENT = NEVER_REACHED - {Failure.SHED}
ON_ANOTHER_HOST = frozenset({Failure.CONNECT_FAILURE, Failure.PEER_NOT_PROCESSED})
"""Transparent only if another host is left to try: the same host would likely fail again
(and a connect timeout would cost the caller another ``connect_timeout``)."""
PEER_NOT_PROCESSED_FLAGS = frozenset({b"UF", b"UH", b"NR", b"DR"})
"""A peer sidecar's local reply with one of these never reached its app: no healthy host, a
connect failure, no route, or shutting down."""
GRPC_UNAVAILABLE = 14


def peer_not_processed(flags: bytes) -> bool:
    """Whether a peer's ``x-pilotfish-response-flags`` value says the app never saw the call."""
    return any(flag.strip() in PEER_NOT_PROCESSED_FLAGS for flag in flags.split(b","))
OVERLOAD_HTTP = frozenset({429, 503})
OVERLOAD_GRPC = frozenset({8, 14})  # RESOURCE_EXHAUSTED, UNAVAILABLE


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """What one try came to, as far as the retry decision needs it."""

    http_status: int | None = None
    grpc_status: int | None = None
    """From a trailers-only response (or headers) not yet sent downstream."""
    failure: Failure | None = None
    request_sent: bool = True
    """Whether any of the request (headers included) was queued on an upstream connection.
    Queued counts as sent: the router cannot know what left the socket before a failure."""
    body_replayable: bool = True
    """Whether the whole request body so far is still held for a replay."""
    pushback: float | None = None
    """Seconds from the upstream's ``grpc-retry-pushback-ms``; negative: do not retry."""

    @property
    def never_reached_upstream(self) -> bool:
        return self.failure in NEVER_REACHED or not self.request_sent

    @property
    def accepted(self) -> bool:
        """The backend took the request: it answered, and not with an overload signal (what
        client-side throttling counts as an accept)."""
        if self.failure is not None:
            return False
        if self.http_status in OVERLOAD_HTTP:
            return False
        return self.grpc_status not in OVERLOAD_GRPC


def response_outcome(
    http_status: int,
    *,
    grpc: bool,
    grpc_status: bytes | None = None,
    pushback_ms: bytes | None = None,
    body_replayable: bool = True,
) -> Outcome:
    """The outcome of response headers held back for the decision (header values as received).

    For gRPC, a non-200 status without grpc-status is mapped as the gRPC spec says (503 →
    UNAVAILABLE...); a pushback that is not a non-negative integer means "do not retry" (gRFC A6).
    """
    code: int | None = None
    if grpc_status is not None:
        code = int(grpc_status) if grpc_status.isdigit() else 2
    elif grpc and http_status != 200:
        code = http_to_grpc(http_status)
    pushback: float | None = None
    if pushback_ms is not None:
        pushback = int(pushback_ms) / 1000 if pushback_ms.isdigit() else -1.0
    return Outcome(
        http_status=http_status,
        grpc_status=code,
        pushback=pushback,
        body_replayable=body_replayable,
    )


_GRPC_CONDITIONS = {
    RetryOn.CANCELLED: 1,
    RetryOn.DEADLINE_EXCEEDED: 4,
    RetryOn.RESOURCE_EXHAUSTED: 8,
    RetryOn.INTERNAL: 13,
    RetryOn.UNAVAILABLE: 14,
}
_FAILURE_CONDITIONS = {
    RetryOn.HTTP_5XX: frozenset(Failure),
    RetryOn.GATEWAY_ERROR: frozenset({Failure.PER_TRY_TIMEOUT}),
    RetryOn.RESET: frozenset({Failure.RESET, Failure.PER_TRY_TIMEOUT}),
    RetryOn.CONNECT_FAILURE: frozenset({Failure.CONNECT_FAILURE, Failure.PEER_NOT_PROCESSED}),
    RetryOn.REFUSED_STREAM: frozenset(
        {Failure.REFUSED_STREAM, Failure.BEYOND_GOAWAY, Failure.SHED}
    ),
}


def matches(policy: RetryPolicy, outcome: Outcome) -> bool:
    """Whether ``outcome`` is one of the failures ``policy.retry_on`` retries."""
    for condition in policy.retry_on:
        failures = _FAILURE_CONDITIONS.get(condition)
        if failures is not None and outcome.failure in failures:
            return True
        status = outcome.http_status
        if status is not None and (
            (condition is RetryOn.HTTP_5XX and 500 <= status <= 599)
            or (condition is RetryOn.GATEWAY_ERROR and status in (502, 503, 504))
            or (
                condition is RetryOn.RETRIABLE_STATUS_CODES
                and status in policy.retriable_status_codes
            )
        ):
            return True
        code = _GRPC_CONDITIONS.get(condition)
        if code is not None and outcome.grpc_status == code:
            return True
    return False


def is_idempotent(method: str, grpc: bool) -> bool:
    return not grpc and method in IDEMPOTENT_METHODS


class Verdict(enum.Enum):
    RETRY = "retry"
    NOT_RETRIABLE = "not_retriable"  # a success, or a failure `on` does not name
    EXHAUSTED = "exhausted"  # no retries left (flag URX if the failure becomes the reply)
    NON_IDEMPOTENT = "non_idempotent"  # may have reached the upstream: not repeated
    BODY_NOT_REPLAYABLE = "body_not_replayable"
    DEADLINE = "deadline"  # the backoff would outlast the request's deadline
    PUSHBACK = "pushback"  # the upstream asked not to retry
    OVERFLOW = "overflow"  # retry budget or max_retries (count upstream_rq_retry_overflow)


@dataclass(frozen=True, slots=True)
class RetryDecision:
    verdict: Verdict
    backoff: float = 0.0
    """Seconds to wait before the next try, when ``verdict`` is RETRY."""
    permit: Permit | None = None
    """What ``admit`` returned: release it when the retried try ends."""

    @property
    def retry(self) -> bool:
        return self.verdict is Verdict.RETRY


class RetryState:
    """The retry bookkeeping of one downstream request."""

    __slots__ = (
        "_grpc", "_idempotent", "_policy", "_random", "attempt", "retries", "transparent_retries",
    )

    def __init__(
        self, policy: RetryPolicy, *, method: str, grpc: bool, random: RandomSource
    ) -> None:
        self._policy = policy
        self._random = random
        self._idempotent = policy.retry_non_idempotent or is_idempotent(method, grpc)
        self._grpc = grpc
        self.attempt = 1
        """The 1-based number of the current try."""
        self.retries = 0
        self.transparent_retries = 0

    @property
    def per_try_timeout(self) -> float | None:
        return self._policy.per_try_timeout

    def attempt_header(self) -> tuple[bytes, bytes]:
        return ATTEMPT_COUNT_HEADER, str(self.attempt).encode()

    def should_retry(
        self,
        outcome: Outcome,
        *,
        remaining: float | None = None,
        admit: Callable[[], Permit | None] | None = None,
        other_host: bool = True,
    ) -> RetryDecision:
        """Decide about the failed current try; on RETRY the state moves to the next try.

        ``remaining``: seconds left of the request's deadline (None: unbounded).
        ``other_host``: whether an untried host is left (see ``ON_ANOTHER_HOST``).
        ``admit``: asked last, only for a retry that would otherwise happen: the cluster's
        ``CircuitBreakers.try_acquire_retry``; the permit comes back in the decision.
        Transparent retries skip ``admit``: they cost the upstream nothing. Past their limit,
        such failures are ordinary retries (``retry_on`` names them, ``admit`` is asked).
        """
        transparent = outcome.failure in TRANSPARENT and (
            other_host or outcome.failure not in ON_ANOTHER_HOST
        )
        if transparent and self.transparent_retries < TRANSPARENT_RETRY_LIMIT:
            verdict = self._check_replay(outcome, remaining, 0.0)
            if verdict is Verdict.RETRY:
                self.transparent_retries += 1
                self.attempt += 1
            return RetryDecision(verdict)
        if not matches(self._policy, outcome):
            return RetryDecision(Verdict.NOT_RETRIABLE)
        if self.retries >= self._policy.attempts:
            return RetryDecision(Verdict.EXHAUSTED)
        if not self._idempotent and not outcome.never_reached_upstream and not (
            self._grpc and outcome.failure is None and outcome.grpc_status == GRPC_UNAVAILABLE
        ):
            return RetryDecision(Verdict.NON_IDEMPOTENT)
        if outcome.pushback is not None and outcome.pushback < 0:
            return RetryDecision(Verdict.PUSHBACK)
        backoff = outcome.pushback if outcome.pushback is not None else self._backoff()
        verdict = self._check_replay(outcome, remaining, backoff)
        if verdict is not Verdict.RETRY:
            return RetryDecision(verdict)
        permit = None
        if admit is not None:
            permit = admit()
            if permit is None:
                return RetryDecision(Verdict.OVERFLOW)
        self.retries += 1
        self.attempt += 1
        return RetryDecision(Verdict.RETRY, backoff, permit)

    @staticmethod
    def _check_replay(outcome: Outcome, remaining: float | None, backoff: float) -> Verdict:
        if not outcome.body_replayable:
            return Verdict.BODY_NOT_REPLAYABLE
        if remaining is not None and backoff >= remaining:
            return Verdict.DEADLINE
        return Verdict.RETRY

    def _backoff(self) -> float:
        """Full jitter: uniform in [0, min(max, base * (2^n - 1))) for the n-th retry."""
        backoff = self._policy.backoff
        ceiling = min(backoff.max, backoff.base * ((1 << min(self.retries + 1, 30)) - 1))
        return self._random() * ceiling
