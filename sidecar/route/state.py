"""The state of one exchange, shared by its stages.

An ``Exchange`` is one object per request, assembled from stage classes that each own one part
of its work (``tries``, ``relay``, ``finish``, and the fast path in ``exchange``). They share
this state instead of holding references to each other: a stage boundary on the request path
then costs no call and no object, which a per-request budget of bytecodes requires.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from sidecar.flags import ResponseFlag
from sidecar.http.streams import Headers, StreamSink
from sidecar.route.admission import Admitted
from sidecar.route.attempt import Attempt
from sidecar.route.body import RequestBody
from sidecar.route.policy.deadline import RequestDeadline, TimerKind
from sidecar.route.policy.retry import Outcome
from sidecar.route.retrying import RetryStage

if TYPE_CHECKING:
    from asyncio import AbstractEventLoop, TimerHandle
    from collections.abc import Callable

    from sidecar.observability.tracing import SpanHandle
    from sidecar.route.host import ExchangeHost
    from sidecar.route.plan import RoutePlan
    from sidecar.route.policy.runtime import RoutePolicyRuntime
    from sidecar.route.table import RouteDecision
    from sidecar.timer_wheel import Bucket
    from sidecar.upstream.clusters import ClusterRuntime

__all__ = ["ExchangeState"]


class ExchangeState:
    """What one downstream request holds, read and written by every stage of its exchange."""

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

    # ``Any``: the listener takes back the whole ``Exchange``, which this module, imported by
    # the exchange's own module, cannot name.
    def __init__(self, listener: ExchangeHost[Any], downstream: StreamSink) -> None:
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

    def _peer(self) -> tuple[str, int] | None:
        conn = getattr(self.downstream, "conn", None)
        transport = getattr(conn, "transport", None)
        peer = transport.get_extra_info("peername") if transport is not None else None
        return (str(peer[0]), int(peer[1])) if peer else None

    def _peer_ip(self) -> str | None:
        peer = self._peer()
        return peer[0] if peer else None

    if TYPE_CHECKING:
        # The hand-offs between stages, each defined by the stage that owns it (tries.py,
        # relay.py, finish.py, exchange.py); declared here so each stage type-checks alone.

        def _route_to(self, cluster_name: str) -> None: ...

        def _cancel_attempt(self, code: int) -> None: ...

        def _per_try_timeout(self, attempt: Attempt, grpc_status: int | None = None) -> None: ...

        # Attributes rather than stubs: a stub that returns a value would need a body.
        _maybe_retry: Callable[[Attempt, Outcome], bool]
        _ours_timed_out: Callable[[Attempt], TimerKind | None]
        _replayable: Callable[[], bool]

        # A try's response, for the relay (what makes the try orchestrator a ``TryOwner``).
        def response_headers(self, attempt: Attempt, headers: Headers, end_stream: bool) -> None:
            ...

        def response_data(self, attempt: Attempt, data: bytes, flow_len: int, end: bool) -> None:
            ...

        def response_trailers(self, attempt: Attempt, trailers: Headers) -> None: ...

        def _complete(self) -> None: ...

        def _fail(self, flag: ResponseFlag, outcome: Outcome | None) -> None: ...

        def local_reply(self, flag: ResponseFlag, message: str | None = None) -> None: ...

        def _on_deadline(self) -> None: ...

        def _finish(self, status: int) -> None: ...
