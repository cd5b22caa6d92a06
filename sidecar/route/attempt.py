"""One try of a request against one upstream host: the ``Attempt``.

In: a host the cluster's balancer chose, then a connection from that host's pool with room for
one more stream. Out: the upstream response's events, each passed to the exchange the try
belongs to (a ``TryOwner``), which decides what reaches the downstream and whether to retry.
An attempt holds what one try takes from its host and cluster (a pending-request slot of the
breakers, a retry permit, a slot in the host's active requests) and gives all of it back in ``end``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Protocol

from sidecar.flags import ResponseFlag
from sidecar.http.streams import Headers, ResetReason, StreamSink

if TYPE_CHECKING:
    from sidecar.observability.tracing import SpanHandle
    from sidecar.timer_wheel import WheelTimer
    from sidecar.upstream.clusters import Upstream, UpstreamHost
    from sidecar.upstream.policy.breaker import Permit
    from sidecar.upstream.pool import PooledConnection


class TryOwner(Protocol):
    """What a try reports to: the exchange it is one try of."""

    def attempt_connected(self, attempt: Attempt, conn: Upstream) -> None: ...

    def attempt_failed(self, attempt: Attempt, flag: ResponseFlag) -> None: ...

    def attempt_reset(self, attempt: Attempt, reason: ResetReason, code: int) -> None: ...

    def response_headers(self, attempt: Attempt, headers: Headers, end_stream: bool) -> None: ...

    def response_data(self, attempt: Attempt, data: bytes, flow_len: int, end: bool) -> None: ...

    def response_trailers(self, attempt: Attempt, trailers: Headers) -> None: ...

    def end_try_span(
        self, span: SpanHandle, http_status: int, grpc_status: int | None, flag: str | None
    ) -> None: ...


class Attempt:
    """One try of an exchange against one upstream host."""

    # Read from the class until a try sets its own: every attribute written in __init__ is
    # paid for on every request, and most tries never set most of these.
    cancelled = False
    stream: StreamSink | None = None
    timer: WheelTimer | None = None
    try_expires_at: float | None = None  # loop time of the per-try timeout
    pending = False  # holds a pending-request slot of the cluster's breakers
    retry_permit: Permit | None = None
    status: int | None = None  # what the upstream said, for outlier detection
    http_status = 0
    grpc_status: int | None = None
    flag: str | None = None  # why this try failed, for its span
    span: SpanHandle | None = None

    def __init__(self, exchange: TryOwner, host: UpstreamHost, index: int) -> None:
        self.exchange = exchange
        self.host = host
        self.index = index
        self.started = time.monotonic()

    # Waiter (pool) side
    def on_connection(self, conn: PooledConnection) -> None:
        self._pending_done()
        self.exchange.attempt_connected(self, conn)  # type: ignore[arg-type]

    def on_pool_failure(self, flag: ResponseFlag) -> None:
        self._pending_done()
        self.exchange.attempt_failed(self, flag)

    def _pending_done(self) -> None:
        if self.pending:
            self.pending = False
            self.host.cluster.resilience.breakers.release_pending()

    # StreamHandler side: the upstream's response
    def on_headers(self, headers: Headers, end_stream: bool) -> None:
        if not self.cancelled:
            self.exchange.response_headers(self, headers, end_stream)

    def on_data(self, data: bytes, flow_len: int, end_stream: bool) -> None:
        if self.cancelled:
            if self.stream is not None:
                self.stream.ack(flow_len)
            return
        self.exchange.response_data(self, data, flow_len, end_stream)

    def on_trailers(self, trailers: Headers) -> None:
        if not self.cancelled:
            self.exchange.response_trailers(self, trailers)

    def on_reset(self, reason: ResetReason, code: int) -> None:
        if not self.cancelled:
            self.exchange.attempt_reset(self, reason, code)

    def end(self) -> None:
        """This try is over: release what it holds and tell the cluster how it went."""
        if self.cancelled:
            return
        self.cancelled = True
        if self.pending:
            self._pending_done()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.retry_permit is not None:
            self.retry_permit.release()
            self.retry_permit = None
        if self.stream is not None:
            self.host.active_requests -= 1
        self.host.cluster.request_finished(
            self.index, self.host, time.monotonic() - self.started, self.status
        )
        if self.span is not None:
            self.exchange.end_try_span(self.span, self.http_status, self.grpc_status, self.flag)
