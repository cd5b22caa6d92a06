"""The router: one ``Exchange`` per downstream request, from route match to the last byte.

The exchange runs the request through stages, each in its own module and entered only when the
request needs it:

- admission (``admission``): draining, a filter's refusal, load shedding; after the route
  match, the route's rate limit and bulkhead. Entered only when one is configured or set.
- the route's plan (``plan``): baked per route when config changes: the merged header edits,
  the timeout and the budget header, which policy stages the route has at all.
- route policies: faults (entered only on routes that have them), the deadline (one timer
  wheel entry; the caller's ``grpc-timeout``, or a body still to come, make a
  ``RequestDeadline``), the cluster's breakers (counters).
- the upstream try (``attempt``): host choice, a stream from the host's pool, flow control tied
  across the proxy.
- retries (``retrying``): made at the first failed try, never before. A try that fails before
  any of its response went downstream may be retried; responses a retry could replace (5xx,
  a gRPC trailers-only error) are held back until that decision.
- local replies and the fallback (``local_reply``): when the exchange must answer itself.
- the finish: counters, the tracer's spans (only for sampled requests), and the listener's
  end-of-request call (metrics, and the access log when one is configured).

The common request (routed, not sampled, no policy triggered, answered by the first try) runs
only the fast path of ``on_headers``, ``_start_attempt``, ``attempt_connected``, the response
relay and ``_finish``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

from sidecar.flags import RESPONSE_FLAGS_HEADER, RETRY_LIMIT_EXCEEDED, ResponseFlag
from sidecar.http.streams import CANCEL, Headers, ResetReason, StreamSink
from sidecar.observability.propagation import REQUEST_ID, TRACE_HEADERS, new_request_id
from sidecar.route.admission import Admitted, Refusal, admit_listener, admit_route
from sidecar.route.attempt import Attempt
from sidecar.route.body import RequestBody
from sidecar.route.local_reply import fallback_for, flag_reply, write_reply
from sidecar.route.policy.deadline import (
    RequestDeadline,
    TimerKind,
    upstream_budget_header,
    upstream_deadline_kind,
)
from sidecar.route.policy.fallback import FallbackCluster
from sidecar.route.policy.reply import LocalReply
from sidecar.route.policy.retry import (
    ATTEMPT_COUNT_HEADER,
    Failure,
    Outcome,
    response_outcome,
)
from sidecar.route.retrying import RetryStage, from_idle_peer, header, response_failure
from sidecar.route.table import LazyHeaderMap
from sidecar.upstream.policy.lb import NO_CONTEXT, LbContext

if TYPE_CHECKING:
    from asyncio import AbstractEventLoop, TimerHandle

    from pilotfish.config.model import ListenerConfig
    from sidecar.observability.registry import GaugeChild
    from sidecar.observability.tracing import SpanHandle, Tracer
    from sidecar.route.plan import RoutePlan
    from sidecar.route.policy.fault import FaultDecision
    from sidecar.route.policy.runtime import RoutePolicyRuntime
    from sidecar.route.policy.shedding import LoadShedder
    from sidecar.route.table import RouteDecision, RouteTable
    from sidecar.stats import Scope
    from sidecar.timer_wheel import Bucket, TimerWheel
    from sidecar.upstream.clusters import ClusterManager, ClusterRuntime, Upstream

__all__ = ["Exchange", "ExchangeHost", "SidecarServices", "flag_reply"]

log = logging.getLogger("pilotfish.router")

_FIRST_ATTEMPT = (ATTEMPT_COUNT_HEADER, b"1")
# Counter names by status class (status // 100, 1 to 9: statuses are three digits), and by
# status for the statuses that occur (one lookup instead of arithmetic per request).
_UPSTREAM_CLASS = tuple(f"upstream_rq_{n}xx" for n in range(10))
_DOWNSTREAM_CLASS = tuple(f"downstream_rq_{n}xx" for n in range(10))
_UPSTREAM_BY_STATUS = {n: _UPSTREAM_CLASS[n // 100] for n in range(100, 600)}
_DOWNSTREAM_BY_STATUS = {n: _DOWNSTREAM_CLASS[n // 100] for n in range(100, 600)}
_NOTHING_TRIED: frozenset[int] = frozenset()
_NO_HEADERS: Mapping[str, str] = {}
_STATUS_CODES = {b"%d" % n: n for n in range(100, 600)}


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


class Exchange:
    """One downstream request (a ``StreamHandler`` for the downstream stream)."""

    # Defaults read from the class until a request sets its own: most requests never touch
    # most of these, and every attribute written in __init__ is paid for on every request.
    method = ""
    path = ""
    authority = ""
    grpc = False
    request_headers: Headers = []  # noqa: RUF012 (replaced by each request, never mutated)
    loop: AbstractEventLoop  # the timer wheel's, set once the request is routed
    decision: RouteDecision | None = None
    plan: RoutePlan | None = None
    policy: RoutePolicyRuntime | None = None  # only on routes with rate limit, fault, fallback...
    cluster: ClusterRuntime | None = None
    holds_request = False  # an active-request slot of the cluster's breakers
    attempt: Attempt | None = None
    attempts = 0
    retry: RetryStage | None = None
    admitted: Admitted | None = None
    # The deadline: ``expires_at`` is the armed expiry (loop time; None: unbounded), set from
    # the route timeout at the headers; a ``RequestDeadline`` only when the caller sent a
    # ``grpc-timeout`` or the request has a body to come (its timeout starts when that ends).
    deadline: RequestDeadline | None = None
    expires_at: float | None = None
    headers_at = 0.0  # loop time of the request's headers
    in_fallback = False
    body: RequestBody | None = None  # made at the request's first DATA frame or trailers
    request_ended = False
    response_started = False
    done = False
    # The deadline's entry in the timer wheel is the exchange itself (``on_timer``).
    deadline_bucket: Bucket | None = None
    armed_expiry = math.inf
    retry_timer: TimerHandle | None = None
    status = 0
    grpc_status: int | None = None
    upstream_host = ""
    bytes_in = 0
    bytes_out = 0
    flags: tuple[str, ...] = ()
    # Tracing: a handle for a sampled request or one with the caller's trace context; an
    # unsampled new trace has only its id (for the access log) and the request's id.
    trace: SpanHandle | None = None
    trace_id = 0
    request_id: bytes | None = None
    # Set by a filter in front of the exchange (authorization) to answer with a local reply.
    refused: ResponseFlag | None = None

    def __init__(self, listener: ExchangeHost, downstream: StreamSink) -> None:
        self.listener = listener
        self.downstream = downstream
        self.start = time.monotonic()

    @property
    def start_wall(self) -> float:
        """Wall-clock time of the request's start (for the access log)."""
        return time.time() - (time.monotonic() - self.start)

    @property
    def protocol(self) -> str:
        return "HTTP/2" if getattr(self.downstream, "stream_id", None) else "HTTP/1.1"

    def end_try_span(
        self, span: SpanHandle, http_status: int, grpc_status: int | None, flag: str | None
    ) -> None:
        self.listener.sidecar.tracer.end(span, http_status, grpc_status=grpc_status, flag=flag)

    # -- downstream events -----------------------------------------------------------------

    def on_headers(self, headers: Headers, end_stream: bool) -> None:
        fields = dict(headers)  # the last value of each name, as the pseudo-headers take it
        get = fields.get
        raw_authority = get(b":authority") or (b"host" in fields and header(headers, b"host"))
        self.method = method = get(b":method", b"").decode("latin-1")
        self.path = path = get(b":path", b"").decode("latin-1")
        self.authority = authority = (raw_authority or b"").decode("latin-1")
        content_type = get(b"content-type")
        if content_type is not None and content_type.startswith(b"application/grpc"):
            self.grpc = True
        self.request_ended = end_stream
        listener = self.listener
        scope = listener.scope
        scope.counters["downstream_rq_total"] += 1
        scope.gauges["downstream_rq_active"] += 1
        listener.streams_gauge.value += 1
        if listener.draining or self.refused is not None or listener.shedder is not None:
            held = self.admitted = Admitted()
            refusal = admit_listener(held, listener.draining, self.refused, listener.shedder)
            if refusal is not None:
                self._refuse(refusal)
                return
        table = listener.route_table()
        decision = None
        if table is not None:
            # The headers as a matcher reads them: made only for tables that match on them.
            matched_on = LazyHeaderMap(headers) if table.matches_headers else _NO_HEADERS
            decision = table.match(authority, path, method, matched_on, listener.random)
        sidecar = listener.sidecar
        tracer = sidecar.tracer
        if decision is None:
            self.trace = tracer.start_server_span(headers, route=None)
            self.local_reply(
                ResponseFlag.NO_CONFIG_YET if sidecar.awaiting_config else ResponseFlag.NO_ROUTE
            )
            return
        self.decision = decision
        plan = self.plan = decision.plan
        # Tracing: the full tracer for a request with the caller's trace context; for a new
        # trace, the sampling decision, and a span only if it is sampled.
        context: Headers | None = None
        if not TRACE_HEADERS.isdisjoint(fields):
            self.trace = tracer.start_server_span(headers, route=plan.name)
        elif tracer.enabled:
            self.trace_id, context = tracer.root_context()
            if context is None:
                self.trace = tracer.start_server_span(
                    headers, route=plan.name, root_trace_id=self.trace_id
                )
        else:
            context = []
        if context is not None:  # no span: the request id is ours to see to
            request_id = get(REQUEST_ID)
            if request_id is None:
                request_id = new_request_id()
                context.append((REQUEST_ID, request_id))
            self.request_id = request_id
        if plan.policies:
            policy = self.policy = sidecar.route_policy(decision)
            if policy.rate_limiter is not None or policy.bulkhead is not None:
                held = self.admitted or Admitted()
                self.admitted = held
                lazy = LazyHeaderMap(headers)
                refusal = admit_route(held, policy, lazy, self._peer_ip, self.grpc)
                if refusal is not None:
                    self._refuse(refusal)
                    return
        # The deadline, as one entry of the timer wheel.
        timers = sidecar.timers
        loop = self.loop = timers.loop
        self.headers_at = now = loop.time()
        grpc_timeout = get(b"grpc-timeout")
        if grpc_timeout is None and end_stream:
            if plan.timeout is not None:
                self.expires_at = expires = now + plan.timeout
                self.deadline_bucket = timers.add(expires, self)
        else:
            deadline = self.deadline = RequestDeadline(now, plan.timeout, grpc_timeout)
            if end_stream:
                deadline.request_ended(now)
            self.expires_at = deadline.expires_at
            self._arm_deadline()
        edit = plan.request_traced if tracer.rewrites_context else plan.request
        upstream = edit.apply(headers, fields)
        if context:
            upstream.extend(context)
        if plan.rewrite:
            upstream = self._rewrite(upstream)
        self.request_headers = upstream
        if self.policy is not None and self.policy.faults is not None:
            faults = self.policy.faults
            self._inject_fault(faults.decide(LazyHeaderMap(headers), listener.random))
            return
        self._route_to(decision.cluster)

    def _refuse(self, refusal: Refusal) -> None:
        if refusal.counter is not None:
            self.listener.scope.inc(refusal.counter)
        answer = refusal.answer
        self.send_reply(flag_reply(answer) if isinstance(answer, ResponseFlag) else answer)

    def _inject_fault(self, fault: FaultDecision) -> None:
        assert self.decision is not None
        if fault.delay is not None:
            self.flags += ("DI",)
            abort = fault.abort
            self.retry_timer = self.loop.call_later(
                fault.delay, lambda: self._after_fault_delay(abort)
            )
            return
        if fault.abort is not None:
            self.send_reply(fault.abort)
            return
        self._route_to(self.decision.cluster)

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
        if self.cluster is not None:  # a fallback cluster: its hosts are all untried
            self._leave_cluster()
            if self.retry is not None:
                self.retry.tried = set()
        self.cluster = cluster
        scope = cluster.scope
        scope.counters["upstream_rq_total"] += 1
        if not cluster.resilience.breakers.try_request():
            scope.inc("upstream_rq_overflow")
            self._fail(ResponseFlag.UPSTREAM_OVERFLOW, None)
            return
        self.holds_request = True
        scope.gauges["upstream_rq_active"] += 1
        self._start_attempt()

    def _leave_cluster(self) -> None:
        """Give back what the request holds of its cluster (before a fallback, or at the end)."""
        if self.holds_request:
            self.holds_request = False
            cluster = self.cluster
            assert cluster is not None
            cluster.resilience.breakers.release_request()
            cluster.scope.gauges["upstream_rq_active"] -= 1

    def _rewrite(self, headers: Headers) -> Headers:
        assert self.decision is not None
        action = self.decision.route.action
        prefix, host = action.prefix_rewrite, action.host_rewrite
        match = self.decision.route.match.path
        out: Headers = []
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
        body = self.body
        if body is None:
            body = self.body = RequestBody(self.downstream)
        body.keep(data)
        if end_stream:
            self._request_complete()
        attempt = self.attempt
        if attempt is not None and attempt.stream is not None and not body.pending:
            attempt.stream.send_data(data, end_stream, body.credit(flow_len))
        else:
            body.pending.append((data, end_stream, flow_len))

    def on_trailers(self, trailers: Headers) -> None:
        if self.done:
            return
        body = self.body
        if body is None:
            body = self.body = RequestBody(self.downstream)
        body.trailers = trailers
        self._request_complete()
        attempt = self.attempt
        if attempt is not None and attempt.stream is not None and not body.pending:
            attempt.stream.send_trailers(trailers)

    def _request_complete(self) -> None:
        self.request_ended = True
        deadline = self.deadline
        if deadline is not None:
            deadline.request_ended(self.loop.time())
            self.expires_at = deadline.expires_at
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

    def _replayable(self) -> bool:
        """Whether a retry could send the request's body again (all of it was kept)."""
        return self.body is None or self.body.replay is not None

    # -- attempts ---------------------------------------------------------------------------

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
        cluster.request_started(index)
        per_try = plan.per_try_timeout
        if per_try:
            timers = self.listener.sidecar.timers
            attempt.timer = timers.call_later(per_try, self._per_try_timeout, attempt)
            attempt.try_expires_at = self.loop.time() + per_try
        if not resilience.breakers.try_pending():
            attempt.end()  # the breaker counted the overflow
            self.attempt = None
            self._fail(ResponseFlag.UPSTREAM_OVERFLOW, None)
            return
        attempt.pending = True
        host.pool.acquire(attempt)

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
        name, status_text = headers[0] if headers else (b"", b"")
        if name != b":status":
            status_text = header(headers, b":status") or b""
        status = _STATUS_CODES.get(status_text)
        if status is None:
            status = int(status_text) if status_text.isdigit() else 0
        if status < 200:
            return  # 1xx: interim
        attempt.status = attempt.http_status = status
        cluster = self.cluster
        assert cluster is not None
        # Answers that succeed with headers to be followed by a body pay for none of this.
        if (
            (end_stream or status >= 404 or cluster.resilience.throttle is not None)
            and self._judge_response(attempt, headers, end_stream, status)
        ):  # fmt: skip
            return
        counter = _UPSTREAM_BY_STATUS.get(status) or _UPSTREAM_CLASS[min(status // 100, 9)]
        cluster.scope.counters[counter] += 1
        self._forward_headers(headers, end_stream, status)

    def _judge_response(
        self, attempt: Attempt, headers: Headers, end_stream: bool, status: int
    ) -> bool:
        """A response that may be a failure (a 5xx, a gRPC status, a peer sidecar's reply), or
        one the cluster's throttle counts: True when it is not passed on (retried, or one of our
        own deadlines)."""
        assert self.cluster is not None
        grpc_status = header(headers, b"grpc-status") if end_stream else None
        if grpc_status is not None and grpc_status.isdigit():
            attempt.grpc_status = self.grpc_status = int(grpc_status)
            if grpc_status != b"0":
                attempt.status = _grpc_as_http(int(grpc_status))
        outcome = None
        if (
            status >= 500
            or (grpc_status is not None and grpc_status != b"0")
            or (status == 404 and from_idle_peer(headers))
        ):
            # A failure: decide here whether another try may replace it.
            outcome = self._failure_outcome(attempt, headers, status, grpc_status)
            if outcome is None or self._retry_response(attempt, outcome):
                return True
        throttle = self.cluster.resilience.throttle
        if throttle is not None and (not self.grpc or end_stream):
            # A gRPC answer is judged by its trailers; anything else by its status here.
            throttle.record(
                (
                    outcome or response_outcome(status, grpc=self.grpc, grpc_status=grpc_status)
                ).accepted
            )
        return False

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
        return response_failure(
            headers, status, grpc_status, grpc=self.grpc, replayable=self._replayable()
        )

    def _retry_response(self, attempt: Attempt, outcome: Outcome) -> bool:
        """Drop this response for another try when the retry policy says so."""
        if not self._maybe_retry(attempt, outcome):
            return False
        self._cancel_attempt(CANCEL)
        return True

    def _forward_headers(self, headers: Headers, end_stream: bool, status: int) -> None:
        self.response_started = True
        self.status = status
        plan = self.plan
        if plan is not None and plan.response is not None:
            headers = plan.response.apply(headers)
        if self.in_fallback:
            headers.append((RESPONSE_FLAGS_HEADER, b"FB"))
            self.flags += ("FB",)
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
        grpc_status = header(trailers, b"grpc-status")
        if grpc_status is not None and grpc_status.isdigit():
            attempt.grpc_status = self.grpc_status = int(grpc_status)
            if grpc_status != b"0":
                attempt.status = _grpc_as_http(int(grpc_status))
            throttle = self.cluster.resilience.throttle if self.cluster is not None else None
            if throttle is not None:
                throttle.record(Outcome(grpc_status=int(grpc_status)).accepted)
            if grpc_status == b"4" and self._ours_timed_out(attempt) is not None:
                # Too late to answer ourselves (the headers are out): flag the trailers.
                self.flags += (ResponseFlag.UPSTREAM_TIMEOUT.code,)
                trailers = [*trailers, (RESPONSE_FLAGS_HEADER, b"UT")]
        self.downstream.send_trailers(trailers)
        self._complete()

    def _complete(self) -> None:
        attempt = self.attempt
        if attempt is not None:
            self.attempt = None
            stream = attempt.stream
            attempt.end()
            if stream is not None and not self.request_ended:
                # The upstream answered before the request finished (allowed for gRPC):
                # stop sending, as Envoy does, with a reset that carries no error.
                stream.reset(0x0)
        self._finish(self.status)

    # -- local replies and the end ----------------------------------------------------------

    def _fail(self, flag: ResponseFlag, outcome: Outcome | None) -> None:
        """No try will answer: the route's fallback may, else a local reply with ``flag``."""
        if flag is ResponseFlag.UPSTREAM_OVERFLOW and self.cluster is not None:
            self.cluster.metrics.overflows.value += 1
        if self.plan is not None and self.plan.policies:
            choice = fallback_for(
                self.policy,
                flag,
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
                self.flags += (flag.code,)
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
        else:
            self.bytes_out += write_reply(
                self.downstream, reply, grpc=self.grpc, method=self.method
            )
        self.response_started = True
        self.flags += (reply.flag_code,)
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
        expires = self.expires_at
        if self.done or expires is None:
            return
        bucket = self.deadline_bucket
        if bucket is not None:
            if self.armed_expiry <= expires:
                return
            bucket.pop(self, None)
        self.armed_expiry = expires
        self.deadline_bucket = self.listener.sidecar.timers.add(expires, self)

    def on_timer(self) -> None:
        """The deadline's wheel entry fired."""
        self.deadline_bucket = None
        self._on_deadline()

    def _on_deadline(self) -> None:
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
        self.status = status
        if self.deadline_bucket is not None:
            self.deadline_bucket.pop(self, None)
        if self.body is not None or self.retry_timer is not None or self.retry is not None:
            self._release_slow()
        if self.holds_request:  # _leave_cluster, inline: every routed request comes here
            self.holds_request = False
            cluster = self.cluster
            assert cluster is not None
            cluster.resilience.breakers.release_request()
            cluster.scope.gauges["upstream_rq_active"] -= 1
        if self.admitted is not None:
            self.admitted.release()
        listener = self.listener
        scope = listener.scope
        scope.gauges["downstream_rq_active"] -= 1
        listener.streams_gauge.value -= 1
        if status:
            counter = _DOWNSTREAM_BY_STATUS.get(status) or _DOWNSTREAM_CLASS[min(status // 100, 9)]
            scope.counters[counter] += 1
        if self.trace is not None:
            listener.sidecar.tracer.end(
                self.trace, status, grpc_status=self.grpc_status, flag=",".join(self.flags) or None
            )
        listener.exchange_done(self)

    def _release_slow(self) -> None:
        """What only some requests hold at their end: a retry's timer and permit, and body
        the upstream never took."""
        if self.retry_timer is not None:
            self.retry_timer.cancel()
            self.retry_timer = None
        if self.body is not None:
            self.body.release()
        retry = self.retry
        if retry is not None:
            retry.release()
            if retry.exhausted:
                self.flags += (RETRY_LIMIT_EXCEEDED,)


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
