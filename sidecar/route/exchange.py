"""The router: one ``Exchange`` per downstream request, from route match to the last byte.

An exchange passes the listener's load shedder, matches the route, applies the route's rate
limit and faults, takes a request permit from the cluster's circuit breakers, and then makes
tries upstream, each an ``Attempt``: host choice, a stream from the host's pool, flow control
tied across the proxy. The request's deadline (route timeout, or the caller's ``grpc-timeout``
when smaller) bounds everything; its remainder travels upstream in ``grpc-timeout``.

A try that fails before any of its response went downstream may be retried: the retry state
decides (retry_on, attempts, idempotency, replayable body, backoff, budget). Responses that a
retry could replace (5xx, a gRPC trailers-only error) are held back until that decision. When
the exchange must answer itself, the route's fallback may answer instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from sidecar.flags import RESPONSE_FLAGS_HEADER, RETRY_LIMIT_EXCEEDED, ResponseFlag
from sidecar.http.streams import CANCEL, Headers, OnSent, ResetReason, StreamSink
from sidecar.observability.propagation import TRACE_HEADERS
from sidecar.route.attempt import Attempt
from sidecar.route.policy.bulkhead import OVERFLOW_COUNTER as BULKHEAD_OVERFLOW_COUNTER
from sidecar.route.policy.bulkhead import OVERFLOW_FLAG as BULKHEAD_OVERFLOW_FLAG
from sidecar.route.policy.deadline import RequestDeadline, TimerKind, upstream_deadline_kind
from sidecar.route.policy.fallback import FallbackCluster, trigger_for
from sidecar.route.policy.reply import LocalReply
from sidecar.route.policy.retry import (
    ATTEMPT_COUNT_HEADER,
    Failure,
    Outcome,
    RetryState,
    Verdict,
    peer_not_processed,
    response_outcome,
)
from sidecar.route.policy.shedding import OVERLOADED_HEADER
from sidecar.route.table import LazyHeaderMap, apply_mutation
from sidecar.upstream.policy.breaker import Permit
from sidecar.upstream.policy.lb import NO_CONTEXT, LbContext

if TYPE_CHECKING:
    from pilotfish.config.model import ListenerConfig
    from sidecar.observability.registry import GaugeChild
    from sidecar.observability.tracing import SpanHandle, Tracer
    from sidecar.route.policy.bulkhead import BulkheadSlot
    from sidecar.route.policy.runtime import RoutePolicyRuntime
    from sidecar.route.policy.shedding import InFlight, LoadShedder
    from sidecar.route.table import RouteDecision, RouteTable
    from sidecar.stats import Scope
    from sidecar.timer_wheel import TimerWheel, WheelTimer
    from sidecar.upstream.clusters import ClusterManager, ClusterRuntime, Upstream

log = logging.getLogger("pilotfish.router")

REPLAY_LIMIT = 64 * 1024
_STRIPPED_UPSTREAM = frozenset({b"grpc-timeout", b"x-pilotfish-attempt-count"})
# When the tracer writes its own trace context, the caller's goes too (Envoy does the same).
_STRIPPED_UPSTREAM_TRACED = _STRIPPED_UPSTREAM | TRACE_HEADERS
_FIRST_ATTEMPT = (ATTEMPT_COUNT_HEADER, b"1")
# Counter names by status class (status // 100, 1 to 9: statuses are three digits).
_UPSTREAM_CLASS = tuple(f"upstream_rq_{n}xx" for n in range(10))
_DOWNSTREAM_CLASS = tuple(f"downstream_rq_{n}xx" for n in range(10))


class SidecarServices(Protocol):
    """What every exchange shares with the whole sidecar: the tracer, the deadline wheel, and
    the live state of each route's policy."""

    @property
    def tracer(self) -> Tracer: ...

    @property
    def timers(self) -> TimerWheel: ...

    def route_policy(self, decision: RouteDecision) -> RoutePolicyRuntime: ...

    @property
    def awaiting_config(self) -> bool:
        """An xDS-driven sidecar before its first config: a routing miss is NCY, not NR."""
        ...


class ExchangeHost(Protocol):
    """What an exchange needs of the listener its request came in on: the route table and the
    clusters it routes to, the listener's admission (draining, load shedding) and stats, and a
    call at the end of the request (metrics and the access log)."""

    @property
    def sidecar(self) -> SidecarServices: ...

    @property
    def config(self) -> ListenerConfig: ...

    @property
    def scope(self) -> Scope: ...

    @property
    def streams_gauge(self) -> GaugeChild: ...

    @property
    def draining(self) -> bool: ...

    @property
    def shedder(self) -> LoadShedder | None: ...

    @property
    def random(self) -> Callable[[], float]: ...

    @property
    def clusters(self) -> ClusterManager: ...

    def route_table(self) -> RouteTable | None: ...

    def exchange_done(self, exchange: Exchange) -> None: ...


def _header(headers: Headers, name: bytes) -> bytes | None:
    for k, v in headers:
        if k == name:
            return v
    return None


def flag_reply(flag: ResponseFlag, message: str | None = None) -> LocalReply:
    return LocalReply(
        http_status=flag.http_status,
        grpc_status=int(flag.grpc_status),
        message=message or flag.message,
        flag_code=flag.code,
    )


class Exchange:
    """One downstream request (a ``StreamHandler`` for the downstream stream)."""

    # Defaults read from the class until a request sets its own: most requests never touch
    # most of these, and every attribute written in __init__ is paid for on every request.
    method = ""
    path = ""
    authority = ""
    grpc = False
    decision: RouteDecision | None = None
    cluster: ClusterRuntime | None = None
    attempt: Attempt | None = None
    attempts = 0
    retry: RetryState | None = None
    deadline: RequestDeadline | None = None
    request_permit: Permit | None = None
    retry_permit: Permit | None = None  # for the try a retry will start
    inflight: InFlight | None = None
    route_slot: BulkheadSlot | None = None
    in_fallback = False
    replay_size = 0
    request_trailers: Headers | None = None
    request_ended = False
    response_started = False
    done = False
    timer: WheelTimer | None = None
    retry_timer: asyncio.TimerHandle | None = None
    retries_exhausted = False  # flagged URX at the end, after the flag of the failure itself
    status = 0
    grpc_status: int | None = None
    upstream_host = ""
    bytes_in = 0
    bytes_out = 0
    trace: SpanHandle | None = None
    # Set by a filter in front of the exchange (authorization) to answer with a local reply.
    refused: ResponseFlag | None = None

    def __init__(self, listener: ExchangeHost, downstream: StreamSink) -> None:
        self.listener = listener
        self.downstream = downstream
        self.start = time.monotonic()
        self.start_wall = time.time()
        self.loop = listener.sidecar.timers.loop
        self.request_headers: Headers = []
        self.tried: set[int] = set()
        # Request body: chunks not yet handed upstream, and everything kept for a replay.
        self.pending: deque[tuple[bytes, bool, int]] = deque()
        self.replay: list[bytes] | None = []
        self.flags: list[str] = []
        self.protocol = "HTTP/2" if getattr(downstream, "stream_id", None) else "HTTP/1.1"

    def end_try_span(
        self, span: SpanHandle, http_status: int, grpc_status: int | None, flag: str | None
    ) -> None:
        self.listener.sidecar.tracer.end(span, http_status, grpc_status=grpc_status, flag=flag)

    # -- downstream events -----------------------------------------------------------------

    def on_headers(self, headers: Headers, end_stream: bool) -> None:
        method = path = authority = b""
        grpc_timeout: bytes | None = None
        for name, value in headers:
            if name[:1] != b":":
                if name == b"content-type":
                    self.grpc = value.startswith(b"application/grpc")
                elif name == b"grpc-timeout":
                    grpc_timeout = value
                elif name == b"host" and not authority:
                    authority = value
                continue
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
        self.method = method.decode("latin-1")
        self.path = path.decode("latin-1")
        self.authority = authority.decode("latin-1")
        self.request_ended = end_stream
        listener = self.listener
        scope = listener.scope
        scope.counters["downstream_rq_total"] += 1
        scope.gauges["downstream_rq_active"] += 1
        listener.streams_gauge.value += 1
        if listener.draining:
            self.local_reply(ResponseFlag.DRAINING)
            return
        if self.refused is not None:
            self.local_reply(self.refused)
            return
        shedder = listener.shedder
        if shedder is not None:
            self.inflight = shedder.try_admit()
            if self.inflight is None:
                listener.scope.inc("downstream_rq_overload_shed")
                self.send_reply(shedder.reply)
                return
        table = listener.route_table()
        lazy_headers = LazyHeaderMap(headers)
        decision = None
        if table is not None:
            decision = table.match(
                self.authority, self.path, self.method, lazy_headers, listener.random
            )
        tracer = listener.sidecar.tracer
        self.trace = tracer.start_server_span(
            headers, route=decision.route.name if decision is not None else None
        )
        if decision is None:
            self.local_reply(
                ResponseFlag.NO_CONFIG_YET
                if listener.sidecar.awaiting_config
                else ResponseFlag.NO_ROUTE
            )
            return
        self.decision = decision
        policy = listener.sidecar.route_policy(decision)
        if policy.rate_limiter is not None:
            caller = policy.rate_limiter.caller_key(lazy_headers, self._peer_ip())
            verdict = policy.rate_limiter.check(caller)
            if not verdict.allowed:
                listener.scope.inc("downstream_rq_rate_limited")
                self.send_reply(verdict.local_reply(self.grpc))
                return
        if policy.bulkhead is not None:
            self.route_slot = policy.bulkhead.try_enter()
            if self.route_slot is None:
                listener.scope.inc(BULKHEAD_OVERFLOW_COUNTER)
                self.local_reply(BULKHEAD_OVERFLOW_FLAG)
                return
        now = self.loop.time()
        self.deadline = RequestDeadline(now, decision.route.action.timeout, grpc_timeout)
        if end_stream:
            self.deadline.request_ended(now)
        stripped = _STRIPPED_UPSTREAM_TRACED if tracer.rewrites_context else _STRIPPED_UPSTREAM
        headers = [h for h in headers if h[0] not in stripped]
        headers = apply_mutation(headers, decision.virtual_host.request_headers)
        headers = apply_mutation(headers, decision.route.request_headers)
        action = decision.route.action
        if action.prefix_rewrite is not None or action.host_rewrite is not None:
            headers = self._rewrite(headers, action.prefix_rewrite, action.host_rewrite)
        self.request_headers = headers
        self._arm_deadline()
        faults = policy.faults
        if faults is not None:
            fault = faults.decide(lazy_headers, listener.random)
            if fault.delay is not None:
                self.flags.append("DI")
                abort = fault.abort
                self.retry_timer = self.loop.call_later(
                    fault.delay, lambda: self._after_fault_delay(abort)
                )
                return
            if fault.abort is not None:
                self.send_reply(fault.abort)
                return
        self._route_to(decision.cluster)

    def _after_fault_delay(self, abort: LocalReply | None) -> None:
        self.retry_timer = None
        if self.done:
            return
        if abort is not None:
            self.send_reply(abort)
        else:
            assert self.decision is not None
            self._route_to(self.decision.cluster)

    def _route_to(self, cluster_name: str) -> None:
        cluster = self.listener.clusters.get(cluster_name)
        if cluster is None:
            self.local_reply(ResponseFlag.NO_CLUSTER)
            return
        self._leave_cluster()
        if self.cluster is not None:
            self.tried = set()  # a fallback cluster: its hosts are all untried
        self.cluster = cluster
        cluster.scope.counters["upstream_rq_total"] += 1
        self.request_permit = cluster.resilience.breakers.try_acquire_request()
        if self.request_permit is None:
            cluster.scope.inc("upstream_rq_overflow")
            self._fail(ResponseFlag.UPSTREAM_OVERFLOW, None)
            return
        cluster.scope.gauge_add("upstream_rq_active", 1)
        self._start_attempt()

    def _leave_cluster(self) -> None:
        """Give back what the request holds of its cluster (before a fallback, or at the end)."""
        if self.request_permit is not None:
            self.request_permit.release()
            self.request_permit = None
            if self.cluster is not None:
                self.cluster.scope.gauge_add("upstream_rq_active", -1)

    def _rewrite(self, headers: Headers, prefix: str | None, host: str | None) -> Headers:
        out: Headers = []
        assert self.decision is not None
        match = self.decision.route.match.path
        for name, value in headers:
            if name == b":path" and prefix is not None and match.prefix is not None:
                value = prefix.encode() + value[len(match.prefix) :]
            elif name == b":authority" and host is not None:
                value = host.encode()
            out.append((name, value))
        return out

    def _peer(self) -> tuple[str, int] | None:
        conn = getattr(self.downstream, "conn", None)
        transport = getattr(conn, "transport", None)
        peer = transport.get_extra_info("peername") if transport is not None else None
        return (str(peer[0]), int(peer[1])) if peer else None

    def _peer_ip(self) -> str | None:
        peer = self._peer()
        return peer[0] if peer else None

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

    def on_data(self, data: bytes, flow_len: int, end_stream: bool) -> None:
        if self.done:
            self.downstream.ack(flow_len)
            return
        self.bytes_in += len(data)
        if self.replay is not None and data:
            self.replay_size += len(data)
            if self.replay_size > REPLAY_LIMIT:
                self.replay = None
            else:
                self.replay.append(data)
        if end_stream:
            self._request_complete()
        attempt = self.attempt
        if attempt is not None and attempt.stream is not None and not self.pending:
            attempt.stream.send_data(data, end_stream, self._ack_downstream(flow_len))
        else:
            self.pending.append((data, end_stream, flow_len))

    def on_trailers(self, trailers: Headers) -> None:
        if self.done:
            return
        self.request_trailers = trailers
        self._request_complete()
        attempt = self.attempt
        if attempt is not None and attempt.stream is not None and not self.pending:
            attempt.stream.send_trailers(trailers)

    def _request_complete(self) -> None:
        self.request_ended = True
        if self.deadline is not None:
            self.deadline.request_ended(self.loop.time())
            self._arm_deadline()

    def on_reset(self, reason: ResetReason, code: int) -> None:
        """The downstream went away: cancel upstream work."""
        if self.done:
            return
        self.listener.scope.inc(
            "downstream_rq_reset"
            if reason is ResetReason.REMOTE_RESET
            else "downstream_cx_destroy_active_rq"
        )
        self._cancel_attempt(CANCEL)
        self._finish(0)

    def _ack_downstream(self, flow_len: int) -> OnSent:
        if not flow_len:
            return None
        downstream = self.downstream
        return lambda: downstream.ack(flow_len)

    # -- attempts ---------------------------------------------------------------------------

    def _start_attempt(self) -> None:
        self.retry_timer = None
        if self.done:
            return
        cluster = self.cluster
        assert cluster is not None and self.decision is not None
        throttle = cluster.resilience.throttle
        if throttle is not None and not throttle.try_admit():
            cluster.scope.inc("upstream_rq_throttled")
            self.local_reply(ResponseFlag.ADAPTIVE_THROTTLE)
            return
        choice = cluster.choose_host(self.tried, self._lb_context(cluster))
        if choice is None:
            self._fail(ResponseFlag.NO_HEALTHY_UPSTREAM, None)
            return
        index, host = choice
        self.tried.add(index)
        self.attempts += 1
        self.upstream_host = host.endpoint.address
        attempt = Attempt(self, host, index)
        if self.trace is not None:
            attempt.span = self.listener.sidecar.tracer.start_client_span(
                self.trace,
                self.attempts,
                upstream=host.endpoint.address,
                cluster=cluster.config.name,
            )
        attempt.retry_permit, self.retry_permit = self.retry_permit, None
        self.attempt = attempt
        cluster.request_started(index)
        per_try = self.decision.route.policy.retry.per_try_timeout
        if per_try:
            timers = self.listener.sidecar.timers
            attempt.timer = timers.call_later(per_try, self._per_try_timeout, attempt)
            attempt.try_expires_at = self.loop.time() + per_try
        attempt.pending_permit = cluster.resilience.breakers.try_acquire_pending()
        if attempt.pending_permit is None:
            attempt.end()  # the breaker counted the overflow
            self.attempt = None
            self._fail(ResponseFlag.UPSTREAM_OVERFLOW, None)
            return
        host.pool.acquire(attempt)

    def _attempt_headers(self) -> Headers:
        assert self.deadline is not None and self.decision is not None
        retry = self.retry
        attempt_header = (
            _FIRST_ATTEMPT if retry is None or retry.attempt == 1 else retry.attempt_header()
        )
        headers = [*self.request_headers, attempt_header]
        per_try = self.decision.route.policy.retry.per_try_timeout
        budget = self.deadline.upstream_header(self.loop.time(), per_try, self.grpc)
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
        headers_only = (
            self.request_ended
            and not self.pending
            and not self.replay_size
            and (self.request_trailers is None)
        )
        attempt.host.active_requests += 1
        attempt.stream = conn.open_stream(self._attempt_headers(), headers_only, attempt)
        if headers_only:
            return
        stream = attempt.stream
        if self.attempts > 1 and self.replay is not None:
            # Bytes an earlier try took (and the downstream was credited for) go again.
            unsent = sum(1 for data, _, _ in self.pending if data)
            for chunk in self.replay[: len(self.replay) - unsent]:
                stream.send_data(chunk, False, None)
        ended = False
        while self.pending:
            data, end, flow_len = self.pending.popleft()
            stream.send_data(data, end, self._ack_downstream(flow_len))
            ended = end
        if self.request_trailers is not None:
            stream.send_trailers(self.request_trailers)
        elif self.request_ended and not ended:
            stream.send_data(b"", True, None)

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
            self.flags.append(ResponseFlag.UPSTREAM_RESET.code)
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
        assert self.deadline is not None
        return upstream_deadline_kind(
            self.loop.time(), attempt.try_expires_at, self.deadline.expires_at
        )

    def _try_failed(self, attempt: Attempt, outcome: Outcome, flag: ResponseFlag) -> None:
        """A try ended without a response to pass on: retry it, or answer ``flag``."""
        assert self.cluster is not None
        attempt.flag = flag.code
        self._cancel_attempt(CANCEL)
        if self._maybe_retry(outcome):
            return
        self._fail(flag, outcome)

    def _maybe_retry(self, outcome: Outcome) -> bool:
        assert self.cluster is not None and self.deadline is not None
        outcome = _with_replay(outcome, self.replay is not None)
        cluster = self.cluster
        decision = self._retry_state().should_retry(
            outcome,
            remaining=self.deadline.remaining(self.loop.time()),
            admit=cluster.resilience.breakers.try_acquire_retry,
            other_host=cluster.has_untried_host(self.tried),
        )
        throttle = cluster.resilience.throttle
        if throttle is not None:
            throttle.record(outcome.accepted)
        if not decision.retry:
            if decision.verdict is Verdict.EXHAUSTED:
                self.retries_exhausted = True
            return False  # a retry the breaker refused was counted there
        cluster.scope.inc("upstream_rq_retry")
        cluster.metrics.retries.value += 1
        self.retry_permit = decision.permit
        self.retry_timer = self.loop.call_later(decision.backoff, self._start_attempt)
        return True

    def _retry_state(self) -> RetryState:
        """Made at the first failed try: most requests never need one."""
        retry = self.retry
        if retry is None:
            assert self.decision is not None
            retry = self.retry = RetryState(
                self.decision.route.policy.retry,
                method=self.method,
                grpc=self.grpc,
                random=self.listener.random,
            )
        return retry

    def _cancel_attempt(self, code: int) -> None:
        attempt, self.attempt = self.attempt, None
        if attempt is None:
            return
        stream = attempt.stream
        attempt.end()
        if stream is not None:
            stream.reset(code)

    # -- response ---------------------------------------------------------------------------

    def response_headers(self, attempt: Attempt, headers: Headers, end_stream: bool) -> None:
        if self.done:
            return
        status_text = _header(headers, b":status")
        status = int(status_text) if status_text is not None and status_text.isdigit() else 0
        if status < 200:
            return  # 1xx: interim
        grpc_status = _header(headers, b"grpc-status") if end_stream else None
        attempt.status = attempt.http_status = status
        if grpc_status is not None and grpc_status.isdigit():
            attempt.grpc_status = self.grpc_status = int(grpc_status)
        if grpc_status is not None and grpc_status.isdigit() and grpc_status != b"0":
            attempt.status = _grpc_as_http(int(grpc_status))
        outcome = None
        failed = grpc_status is not None and grpc_status != b"0"
        if status >= 500 or failed or (status == 404 and self._from_idle_peer(headers)):
            # A failure: decide here whether another try may replace it (answers that succeed
            # pay for none of this).
            outcome = self._failure_outcome(attempt, headers, status, grpc_status)
            if outcome is None or self._retry_response(attempt, outcome):
                return
        throttle = self.cluster.resilience.throttle if self.cluster is not None else None
        if throttle is not None and (not self.grpc or end_stream):
            # A gRPC answer is judged by its trailers; anything else by its status here.
            throttle.record(
                (
                    outcome or response_outcome(status, grpc=self.grpc, grpc_status=grpc_status)
                ).accepted
            )
        if self.cluster is not None:
            self.cluster.scope.counters[_UPSTREAM_CLASS[min(status // 100, 9)]] += 1
        self._forward_headers(headers, end_stream, status)

    def _failure_outcome(
        self, attempt: Attempt, headers: Headers, status: int, grpc_status: bytes | None
    ) -> Outcome | None:
        """What a failed response amounts to for the retry decision; None: it was one of our
        own deadlines, and that is handled (answered or retried) already."""
        if grpc_status == b"4" and self.grpc:
            kind = self._ours_timed_out(attempt)
            if kind is TimerKind.DEADLINE:
                self._on_deadline()
                return None
            if kind is TimerKind.PER_TRY:
                if attempt.timer is not None:
                    attempt.timer.cancel()
                self._per_try_timeout(attempt, grpc_status=4)
                return None
        if self._from_idle_peer(headers):
            # A peer sidecar's own reply that its app never saw: retried like a connect failure.
            return Outcome(
                http_status=status,
                grpc_status=int(grpc_status) if grpc_status and grpc_status.isdigit() else None,
                failure=Failure.PEER_NOT_PROCESSED,
                body_replayable=self.replay is not None,
            )
        if _header(headers, OVERLOADED_HEADER) is not None:
            # The upstream's sidecar shed it before its app saw it: another host may take it.
            # Its retry hint is for the caller, not for a retry on a different host.
            return Outcome(
                http_status=status,
                grpc_status=int(grpc_status) if grpc_status and grpc_status.isdigit() else None,
                failure=Failure.SHED,
                body_replayable=self.replay is not None,
            )
        return response_outcome(
            status,
            grpc=self.grpc,
            grpc_status=grpc_status,
            pushback_ms=_header(headers, b"grpc-retry-pushback-ms"),
            body_replayable=self.replay is not None,
        )

    @staticmethod
    def _from_idle_peer(headers: Headers) -> bool:
        """A local reply of the called service's sidecar that says its app never saw it."""
        flags = _header(headers, RESPONSE_FLAGS_HEADER)
        return flags is not None and peer_not_processed(flags)

    def _retry_response(self, attempt: Attempt, outcome: Outcome) -> bool:
        """Drop this response for another try when the retry policy says so."""
        if not self._maybe_retry(outcome):
            return False
        self._cancel_attempt(CANCEL)
        return True

    def _forward_headers(self, headers: Headers, end_stream: bool, status: int) -> None:
        self.response_started = True
        self.status = status
        if self.decision is not None:
            headers = apply_mutation(headers, self.decision.route.response_headers)
            headers = apply_mutation(headers, self.decision.virtual_host.response_headers)
        if self.in_fallback:
            headers.append((b"x-pilotfish-response-flags", b"FB"))
            self.flags.append("FB")
        self.downstream.send_headers(headers, end_stream)
        if end_stream:
            self._complete()

    def response_data(self, attempt: Attempt, data: bytes, flow_len: int, end: bool) -> None:
        if self.done:
            if attempt.stream is not None:
                attempt.stream.ack(flow_len)
            return
        upstream = attempt.stream
        assert upstream is not None
        self.bytes_out += len(data)
        self.downstream.send_data(data, end, (lambda: upstream.ack(flow_len)) if flow_len else None)
        if end:
            self._complete()

    def response_trailers(self, attempt: Attempt, trailers: Headers) -> None:
        if self.done:
            return
        grpc_status = _header(trailers, b"grpc-status")
        if grpc_status is not None and grpc_status.isdigit():
            attempt.grpc_status = self.grpc_status = int(grpc_status)
        if grpc_status is not None and grpc_status.isdigit():
            if grpc_status != b"0":
                attempt.status = _grpc_as_http(int(grpc_status))
            if self.cluster is not None and self.cluster.resilience.throttle is not None:
                self.cluster.resilience.throttle.record(Outcome(grpc_status=int(grpc_status)).accepted)
            if grpc_status == b"4" and self._ours_timed_out(attempt) is not None:
                # Too late to answer ourselves (the headers are out): flag the trailers.
                self.flags.append(ResponseFlag.UPSTREAM_TIMEOUT.code)
                trailers = [*trailers, (RESPONSE_FLAGS_HEADER, b"UT")]
        self.downstream.send_trailers(trailers)
        self._complete()

    def _complete(self) -> None:
        attempt = self.attempt
        if attempt is not None:
            stream = attempt.stream
            attempt.end()
            if stream is not None and not self.request_ended:
                # The upstream answered before the request finished (allowed for gRPC):
                # stop sending, as Envoy does, with a reset that carries no error.
                stream.reset(0x0)
        self.attempt = None
        self._finish(self.status)

    # -- local replies and the end ----------------------------------------------------------

    def _fail(self, flag: ResponseFlag, outcome: Outcome | None) -> None:
        """No try will answer: the route's fallback may, else a local reply with ``flag``."""
        if flag is ResponseFlag.UPSTREAM_OVERFLOW and self.cluster is not None:
            self.cluster.metrics.overflows.value += 1
        policy = (
            self.listener.sidecar.route_policy(self.decision) if self.decision is not None else None
        )
        fallback = policy.fallback if policy is not None else None
        if fallback is not None:
            choice = fallback.decide(
                trigger_for(flag),
                grpc=self.grpc,
                response_started=self.response_started,
                in_fallback=self.in_fallback,
            )
            if isinstance(choice, FallbackCluster):
                self.in_fallback = True
                self.listener.scope.inc("downstream_rq_fallback")
                self._route_to(choice.name)
                return
            if choice is not None:
                self.listener.scope.inc("downstream_rq_fallback")
                self.flags.append(flag.code)
                self.send_reply(choice)
                return
        self.local_reply(flag)

    def local_reply(self, flag: ResponseFlag, message: str | None = None) -> None:
        self.send_reply(flag_reply(flag, message))

    def send_reply(self, reply: LocalReply) -> None:
        if self.done:
            return
        self._cancel_attempt(CANCEL)
        if self.response_started:
            self.downstream.reset(CANCEL)
        elif self.grpc and reply.grpc_response is not None:
            headers, message, trailers = reply.grpc_message_parts()
            self.downstream.send_headers(headers, False)
            self.bytes_out += len(message)
            self.downstream.send_data(message, False, None)
            self.downstream.send_trailers(trailers)
        else:
            body = reply.http_body(self.grpc, self.method)
            self.downstream.send_headers(reply.headers(self.grpc), not body)
            self.bytes_out += len(body)
            if body:
                self.downstream.send_data(body, True, None)
        self.response_started = True
        self.flags.append(reply.flag_code)
        status = reply.http_status
        if self.grpc:
            self.grpc_status = reply.grpc_status
            status = 200
        log.info(
            "local reply %s %s %s%s -> %d flag=%s: %s",
            self.listener.config.name, self.method, self.authority, self.path,
            status, reply.flag_code, reply.message,
        )  # fmt: skip
        self._finish(status)
        if not self.request_ended:
            # Nobody will read the rest of the request body: tell the client to stop sending,
            # after the reply (a reset now would discard the part still waiting for window).
            self.downstream.reset_when_sent(0x0)

    def _arm_deadline(self) -> None:
        if self.done or self.deadline is None:
            return
        expires = self.deadline.expires_at
        if expires is None:
            return
        if self.timer is not None:
            if self.timer.when() <= expires:
                return
            self.timer.cancel()
        self.timer = self.listener.sidecar.timers.call_at(expires, self._on_deadline)

    def _on_deadline(self) -> None:
        self.timer = None
        if self.done:
            return
        if self.cluster is not None:
            self.cluster.scope.inc("upstream_rq_timeout")
            self.cluster.metrics.timeouts.value += 1
        self.local_reply(ResponseFlag.UPSTREAM_TIMEOUT)

    def _finish(self, status: int) -> None:
        if self.done:
            return
        self.done = True
        for timer in (self.timer, self.retry_timer):
            if timer is not None:
                timer.cancel()
        self.timer = self.retry_timer = None
        # Body the upstream never took: the client was not credited for it yet.
        while self.pending:
            flow_len = self.pending.popleft()[2]
            if flow_len:
                self.downstream.ack(flow_len)
        self.replay = None
        self._leave_cluster()
        if self.retry_permit is not None:
            self.retry_permit.release()
            self.retry_permit = None
        if self.inflight is not None:
            self.inflight.done()
            self.inflight = None
        if self.route_slot is not None:
            self.route_slot.release()
            self.route_slot = None
        self.status = status
        if self.retries_exhausted:
            self.flags.append(RETRY_LIMIT_EXCEEDED)
        listener = self.listener
        scope = listener.scope
        scope.gauges["downstream_rq_active"] -= 1
        listener.streams_gauge.value -= 1
        if status:
            scope.counters[_DOWNSTREAM_CLASS[min(status // 100, 9)]] += 1
        if self.trace is not None:
            listener.sidecar.tracer.end(
                self.trace, status, grpc_status=self.grpc_status, flag=",".join(self.flags) or None
            )
        listener.exchange_done(self)


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


def _grpc_as_http(grpc_status: int) -> int:
    """How a gRPC error counts for outlier detection: as the HTTP status it maps to."""
    return {14: 503, 4: 504, 8: 429, 12: 501, 13: 500, 2: 500}.get(grpc_status, 200)


def _cookie(header: str | None, name: str) -> str | None:
    if not header:
        return None
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None
