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
- the try orchestrator (``tries``): host choice, one ``attempt.Attempt`` per try, per-try
  timeouts; retries (``retrying``) made at the first failed try, never before. A try that
  fails before any of its response went downstream may be retried.
- the response relay (``relay``): responses a retry could replace (5xx, a gRPC trailers-only
  error) are judged before any of them goes downstream; the rest pass straight through.
- the finish (``finish``): the deadline, the fallback and local replies (``local_reply``),
  then counters, the tracer's spans (only for sampled requests), and the listener's
  end-of-request call (metrics, and the access log when one is configured).

The stages are classes over one shared state (``state.ExchangeState``) that ``Exchange``
combines, so that handing a request from one stage to the next costs no call and no object;
what an exchange needs of its listener and of the sidecar is in ``host``. This module keeps
the fast path from the request's headers to its cluster, and the request body.

The common request (routed, not sampled, no policy triggered, answered by the first try) runs
only ``on_headers`` and ``_route_to`` here, ``_start_attempt`` and ``attempt_connected`` in
``tries``, the relay, and ``_complete`` and ``_finish`` in ``finish``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from sidecar.flags import ResponseFlag
from sidecar.http.streams import CANCEL, Headers, ResetReason
from sidecar.observability.propagation import REQUEST_ID, TRACE_HEADERS, new_request_id
from sidecar.route.admission import Admitted, Refusal, admit_listener, admit_route
from sidecar.route.body import RequestBody
from sidecar.route.finish import Finisher
from sidecar.route.host import ExchangeHost, SidecarServices
from sidecar.route.local_reply import flag_reply
from sidecar.route.policy.deadline import RequestDeadline
from sidecar.route.policy.reply import LocalReply
from sidecar.route.relay import ResponseRelay
from sidecar.route.retrying import header
from sidecar.route.table import LazyHeaderMap
from sidecar.route.tries import TryOrchestrator

if TYPE_CHECKING:
    from sidecar.route.policy.fault import FaultDecision

__all__ = ["Exchange", "ExchangeHost", "SidecarServices", "flag_reply"]

_NO_HEADERS: Mapping[str, str] = {}


class Exchange(TryOrchestrator, ResponseRelay, Finisher):
    """One downstream request (a ``StreamHandler`` for the downstream stream): the fast path
    from its headers to its cluster, and the request body; the stages do the rest."""

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

    def on_data(self, data: bytes, flow_len: int, end_stream: bool) -> None:
        if self.done:
            self.downstream.ack(flow_len)
            return
        self.bytes_in += len(data)
        body = self.body
        if body is None:
            body = self.body = RequestBody(self.downstream)
        # Relayed first: the last frame of a read leaves at once (a unary gRPC request's
        # message), and what keeps it for a retry and starts the route timeout can follow.
        attempt = self.attempt
        if attempt is not None and attempt.stream is not None and not body.pending:
            attempt.stream.send_data(data, end_stream, body.credit(flow_len))
        else:
            body.pending.append((data, end_stream, flow_len))
        body.keep(data)
        if end_stream:
            self._request_complete()

    def on_trailers(self, trailers: Headers) -> None:
        if self.done:
            return
        body = self.body
        if body is None:
            body = self.body = RequestBody(self.downstream)
        body.trailers = trailers
        attempt = self.attempt
        if attempt is not None and attempt.stream is not None and not body.pending:
            attempt.stream.send_trailers(trailers)
        self._request_complete()

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
