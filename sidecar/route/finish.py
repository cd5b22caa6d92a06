"""The finish of an exchange: its deadline, its local replies, and its end.

When no try will answer (``_fail``), the route's fallback may, else a local reply; the request's
deadline (one timer wheel entry) ends in one. Every request ends in ``_finish``: what it holds
of its cluster and admission is given back, then the counters, the span of a sampled request,
and the listener's end-of-request call (metrics, and the access log when one is configured).
"""

from __future__ import annotations

import logging

from sidecar.flags import RETRY_LIMIT_EXCEEDED, ResponseFlag
from sidecar.http.streams import CANCEL
from sidecar.route.local_reply import fallback_for, flag_reply, write_reply
from sidecar.route.policy.fallback import FallbackCluster
from sidecar.route.policy.reply import LocalReply
from sidecar.route.policy.retry import Outcome
from sidecar.route.state import ExchangeState

__all__ = ["Finisher"]

log = logging.getLogger("pilotfish.router")

_DOWNSTREAM_CLASS = tuple(f"downstream_rq_{n}xx" for n in range(10))
_DOWNSTREAM_BY_STATUS = {n: _DOWNSTREAM_CLASS[n // 100] for n in range(100, 600)}


class Finisher(ExchangeState):
    """The deadline, the fallback and local replies, and the end of the request."""

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
