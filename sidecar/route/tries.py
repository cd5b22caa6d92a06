"""The try orchestrator: upstream tries of an exchange, their per-try timeouts and retries.

Entered once the request has a cluster (``_start_attempt``). It chooses a host, opens a try
(``attempt.Attempt``) and sends the request on it; when a try fails before any of its response
went downstream, it asks the retry stage (``retrying.RetryStage``, made at the first failed
try) for another, or hands the failure to the finish (``_fail``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sidecar.flags import ResponseFlag
from sidecar.http.streams import CANCEL, Headers, ResetReason
from sidecar.route.attempt import Attempt
from sidecar.route.policy.deadline import TimerKind, upstream_budget_header, upstream_deadline_kind
from sidecar.route.policy.retry import ATTEMPT_COUNT_HEADER, Failure, Outcome
from sidecar.route.retrying import RetryStage
from sidecar.route.state import ExchangeState
from sidecar.route.table import LazyHeaderMap
from sidecar.upstream.policy.lb import NO_CONTEXT, LbContext

if TYPE_CHECKING:
    from sidecar.upstream.clusters import ClusterRuntime, Upstream

__all__ = ["TryOrchestrator"]

_FIRST_ATTEMPT = (ATTEMPT_COUNT_HEADER, b"1")
_NOTHING_TRIED: frozenset[int] = frozenset()


class TryOrchestrator(ExchangeState):
    """Upstream tries: host choice, the per-try timeout, retries and their backoff."""

    def _retry_now(self) -> None:
        self.retry_timer = None
        self._start_attempt()

    def _start_attempt(self) -> None:
        if self.done:
            return
        cluster = self.cluster
        plan = self.plan
        assert cluster is not None and plan is not None
        resilience = cluster.resilience
        throttle = resilience.throttle
        if throttle is not None and not throttle.try_admit():
            cluster.scope.inc("upstream_rq_throttled")
            self.local_reply(ResponseFlag.ADAPTIVE_THROTTLE)
            return
        retry = self.retry
        choice = cluster.choose_host(
            retry.tried if retry is not None else _NOTHING_TRIED,
            self._lb_context(cluster) if cluster.needs_context else NO_CONTEXT,
        )
        if choice is None:
            self._fail(ResponseFlag.NO_HEALTHY_UPSTREAM, None)
            return
        index, host = choice
        self.attempts += 1
        self.upstream_host = host.endpoint.address
        attempt = self.attempt = Attempt(self, host, index)
        if self.trace is not None:
            attempt.span = self.listener.sidecar.tracer.start_client_span(
                self.trace,
                self.attempts,
                upstream=host.endpoint.address,
                cluster=cluster.config.name,
            )
        if retry is not None and retry.permit is not None:
            attempt.retry_permit, retry.permit = retry.permit, None
        if cluster.tracks_requests:
            cluster.request_started(index)
        per_try = plan.per_try_timeout
        if per_try:
            timers = self.listener.sidecar.timers
            attempt.timer = timers.call_later(per_try, self._per_try_timeout, attempt)
            attempt.try_expires_at = self.loop.time() + per_try
        conn = host.pool.checkout()
        if conn is not None:
            # A connection with room now: the try never waits, so holds no pending slot.
            self.attempt_connected(attempt, conn)  # type: ignore[arg-type]
            return
        if not resilience.breakers.try_pending():
            attempt.end()  # the breaker counted the overflow
            self.attempt = None
            self._fail(ResponseFlag.UPSTREAM_OVERFLOW, None)
            return
        attempt.pending = True
        host.pool.acquire(attempt)

    def _lb_context(self, cluster: ClusterRuntime) -> LbContext:
        if not cluster.needs_context:
            return NO_CONTEXT
        peer = self._peer() or ("", 0)
        lazy = LazyHeaderMap(self.request_headers)
        return LbContext(
            source_ip=peer[0],
            source_port=peer[1],
            header=lazy.get,
            cookie=lambda name: _cookie(lazy.get("cookie"), name),
        )

    def _attempt_headers(self) -> Headers:
        plan = self.plan
        assert plan is not None
        retry = self.retry
        headers = [
            *self.request_headers,
            _FIRST_ATTEMPT if retry is None else retry.attempt_header(),
        ]
        now = self.loop.time()
        if now == self.headers_at and self.deadline is None:
            # The whole timeout is left: the budget header was made with the plan.
            budget = plan.budget_grpc if self.grpc else plan.budget_http
        else:
            budget = upstream_budget_header(self.expires_at, now, plan.per_try_timeout, self.grpc)
        if budget is not None:
            headers.append(budget)
        span = self.attempt.span if self.attempt is not None else None
        if span is not None:
            self.listener.sidecar.tracer.add_context(span, headers)
        return headers

    def attempt_connected(self, attempt: Attempt, conn: Upstream) -> None:
        if attempt is not self.attempt or self.done:
            attempt.host.pool.released(conn)
            return
        body = self.body
        headers_only = self.request_ended and (body is None or body.empty)
        attempt.host.active_requests += 1
        attempt.stream = stream = conn.open_stream(self._attempt_headers(), headers_only, attempt)
        if body is not None and not headers_only:
            body.write_to(stream, resend=self.attempts > 1, request_ended=self.request_ended)

    def attempt_failed(self, attempt: Attempt, flag: ResponseFlag) -> None:
        """The pool could not give this try a stream."""
        if attempt is not self.attempt or self.done:
            return
        if flag is ResponseFlag.UPSTREAM_OVERFLOW:
            assert self.cluster is not None
            self.cluster.scope.inc("upstream_rq_pending_overflow")
            attempt.end()
            self.attempt = None
            self._fail(flag, None)
            return
        self._try_failed(
            attempt, Outcome(failure=Failure.CONNECT_FAILURE, request_sent=False), flag
        )

    def attempt_reset(self, attempt: Attempt, reason: ResetReason, code: int) -> None:
        if attempt is not self.attempt or self.done:
            return
        assert self.cluster is not None
        if self.response_started:
            # Part of the response is already downstream: all we can do is pass the reset on.
            self.cluster.scope.inc("upstream_rq_rx_reset")
            attempt.end()
            self.attempt = None
            self.downstream.reset(code or CANCEL)
            self.flags += (ResponseFlag.UPSTREAM_RESET.code,)
            self._finish(0)
            return
        if reason is ResetReason.REFUSED:
            failure, flag = Failure.REFUSED_STREAM, ResponseFlag.UPSTREAM_RESET
        elif reason is ResetReason.CONNECTION_LOST:
            failure, flag = Failure.RESET, ResponseFlag.UPSTREAM_CONNECTION_TERMINATION
        elif reason is ResetReason.PROTOCOL_ERROR:
            failure, flag = Failure.RESET, ResponseFlag.UPSTREAM_PROTOCOL_ERROR
        else:
            failure, flag = Failure.RESET, ResponseFlag.UPSTREAM_RESET
        self._try_failed(attempt, Outcome(failure=failure), flag)

    def _per_try_timeout(self, attempt: Attempt, grpc_status: int | None = None) -> None:
        """``grpc_status`` 4: the upstream's DEADLINE_EXCEEDED beat the timer to it."""
        attempt.timer = None
        if attempt is not self.attempt or self.done or self.response_started:
            return
        assert self.cluster is not None
        self.cluster.scope.inc("upstream_rq_per_try_timeout")
        self.cluster.metrics.timeouts.value += 1
        self._try_failed(
            attempt,
            Outcome(failure=Failure.PER_TRY_TIMEOUT, grpc_status=grpc_status),
            ResponseFlag.UPSTREAM_TIMEOUT,
        )

    def _ours_timed_out(self, attempt: Attempt) -> TimerKind | None:
        """Whether an upstream DEADLINE_EXCEEDED read now is one of our deadlines firing."""
        return upstream_deadline_kind(self.loop.time(), attempt.try_expires_at, self.expires_at)

    def _try_failed(self, attempt: Attempt, outcome: Outcome, flag: ResponseFlag) -> None:
        """A try ended without a response to pass on: retry it, or answer ``flag``."""
        assert self.cluster is not None
        attempt.flag = flag.code
        self._cancel_attempt(CANCEL)
        if self._maybe_retry(attempt, outcome):
            return
        self._fail(flag, outcome)

    def _maybe_retry(self, attempt: Attempt, outcome: Outcome) -> bool:
        """Ask the retry stage (made now if this is the request's first failed try)."""
        cluster, plan = self.cluster, self.plan
        assert cluster is not None and plan is not None
        retry = self.retry
        if retry is None:
            retry = self.retry = RetryStage(
                plan.retry, method=self.method, grpc=self.grpc, random=self.listener.random
            )
        expires = self.expires_at
        now = self.loop.time()
        backoff = retry.decide(
            outcome,
            cluster,
            attempt.index,
            remaining=None if expires is None else max(0.0, expires - now),
            replayable=self._replayable(),
        )
        if backoff is None:
            return False
        self.retry_timer = self.loop.call_later(backoff, self._retry_now)
        return True

    def _replayable(self) -> bool:
        """Whether a retry could send the request's body again (all of it was kept)."""
        return self.body is None or self.body.replay is not None

    def _cancel_attempt(self, code: int) -> None:
        attempt, self.attempt = self.attempt, None
        if attempt is None:
            return
        stream = attempt.stream
        attempt.end()
        if stream is not None:
            stream.reset(code)


def _cookie(header: str | None, name: str) -> str | None:
    if not header:
        return None
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None
