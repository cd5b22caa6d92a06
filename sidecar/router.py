"""The router: one ``Exchange`` per downstream request, from route match to the last byte.

An exchange matches the route, picks the cluster and host, takes a stream from the host's
pool, and relays both directions with flow control tied across the proxy. Each try upstream is
an ``Attempt``; events from an attempt that is no longer current are ignored. A request that
provably never reached the upstream (refused stream, beyond a GOAWAY's last stream id) is sent
again on another connection while its body is still held for replay.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

from sidecar.flags import RESPONSE_FLAGS_HEADER, ResponseFlag
from sidecar.routing import LazyHeaderMap, apply_mutation
from sidecar.streams import CANCEL, Headers, OnSent, ResetReason, StreamSink

if TYPE_CHECKING:
    from sidecar.listener import ListenerRuntime
    from sidecar.pool import PooledConnection
    from sidecar.routing import RouteDecision
    from sidecar.upstream import ClusterRuntime, Upstream, UpstreamHost

log = logging.getLogger("pilotfish.router")

REPLAY_LIMIT = 64 * 1024
MAX_UNPROCESSED_RETRIES = 3


def _header(headers: Headers, name: bytes) -> bytes | None:
    for k, v in headers:
        if k == name:
            return v
    return None


class Attempt:
    """One try of an exchange against one upstream host."""

    __slots__ = ("cancelled", "exchange", "host", "index", "stream")

    def __init__(self, exchange: Exchange, host: UpstreamHost, index: int) -> None:
        self.exchange = exchange
        self.host = host
        self.index = index
        self.stream: StreamSink | None = None
        self.cancelled = False

    # Waiter (pool) side
    def on_connection(self, conn: PooledConnection) -> None:
        self.exchange.attempt_connected(self, conn)  # type: ignore[arg-type]

    def on_pool_failure(self, flag: ResponseFlag) -> None:
        self.exchange.attempt_failed(self, flag)

    # StreamHandler side: the upstream's response
    def on_headers(self, headers: Headers, end_stream: bool) -> None:
        if not self.cancelled:
            self.exchange.response_headers(headers, end_stream)

    def on_data(self, data: bytes, flow_len: int, end_stream: bool) -> None:
        if self.cancelled:
            if self.stream is not None:
                self.stream.ack(flow_len)
            return
        self.exchange.response_data(self, data, flow_len, end_stream)

    def on_trailers(self, trailers: Headers) -> None:
        if not self.cancelled:
            self.exchange.response_trailers(trailers)

    def on_reset(self, reason: ResetReason, code: int) -> None:
        if not self.cancelled:
            self.exchange.attempt_reset(self, reason, code)


class Exchange:
    """One downstream request (a ``StreamHandler`` for the downstream stream)."""

    def __init__(self, listener: ListenerRuntime, downstream: StreamSink) -> None:
        self.listener = listener
        self.downstream = downstream
        self.start = time.monotonic()
        self.request_headers: Headers = []
        self.method = ""
        self.path = ""
        self.authority = ""
        self.grpc = False
        self.decision: RouteDecision | None = None
        self.cluster: ClusterRuntime | None = None
        self.attempt: Attempt | None = None
        self.tried: set[int] = set()
        self.retries = 0
        # Request body: chunks not yet handed upstream, and everything kept for a replay.
        self.pending: deque[tuple[bytes, bool, int]] = deque()
        self.replay: list[bytes] | None = []
        self.replay_size = 0
        self.request_trailers: Headers | None = None
        self.request_ended = False
        self.response_started = False
        self.done = False
        self.timer: asyncio.TimerHandle | None = None
        self.status = 0
        self.flag: ResponseFlag | None = None
        self.upstream_host = ""

    # -- downstream events -----------------------------------------------------------------

    def on_headers(self, headers: Headers, end_stream: bool) -> None:
        method = path = authority = b""
        for name, value in headers:
            if name[:1] != b":":
                if name == b"content-type":
                    self.grpc = value.startswith(b"application/grpc")
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
        listener.scope.inc("downstream_rq_total")
        listener.scope.gauge_add("downstream_rq_active", 1)
        if listener.draining:
            self.local_reply(ResponseFlag.DRAINING)
            return
        table = listener.route_table()
        decision = None
        if table is not None:
            decision = table.match(
                self.authority, self.path, self.method, LazyHeaderMap(headers), listener.random
            )
        if decision is None:
            self.local_reply(ResponseFlag.NO_ROUTE)
            return
        self.decision = decision
        cluster = listener.clusters.get(decision.cluster)
        if cluster is None:
            self.local_reply(ResponseFlag.NO_CLUSTER)
            return
        self.cluster = cluster
        cluster.scope.inc("upstream_rq_total")
        cluster.scope.gauge_add("upstream_rq_active", 1)
        headers = apply_mutation(headers, decision.virtual_host.request_headers)
        headers = apply_mutation(headers, decision.route.request_headers)
        action = decision.route.action
        if action.prefix_rewrite is not None or action.host_rewrite is not None:
            headers = self._rewrite(headers, action.prefix_rewrite, action.host_rewrite)
        self.request_headers = headers
        if end_stream:
            self._arm_timeout()
        self._start_attempt()

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

    def on_data(self, data: bytes, flow_len: int, end_stream: bool) -> None:
        if self.done:
            self.downstream.ack(flow_len)
            return
        if self.replay is not None and data:
            self.replay_size += len(data)
            if self.replay_size > REPLAY_LIMIT:
                self.replay = None
            else:
                self.replay.append(data)
        if end_stream:
            self.request_ended = True
            self._arm_timeout()
        attempt = self.attempt
        if attempt is not None and attempt.stream is not None and not self.pending:
            attempt.stream.send_data(data, end_stream, self._ack_downstream(flow_len))
        else:
            self.pending.append((data, end_stream, flow_len))

    def on_trailers(self, trailers: Headers) -> None:
        if self.done:
            return
        self.request_trailers = trailers
        self.request_ended = True
        self._arm_timeout()
        attempt = self.attempt
        if attempt is not None and attempt.stream is not None and not self.pending:
            attempt.stream.send_trailers(trailers)

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
        self._finish(0, None)

    # -- attempts ---------------------------------------------------------------------------

    def _start_attempt(self) -> None:
        assert self.cluster is not None
        choice = self.cluster.choose_host(self.tried)
        if choice is None:
            self.local_reply(ResponseFlag.NO_HEALTHY_UPSTREAM)
            return
        index, host = choice
        self.tried.add(index)
        self.upstream_host = host.endpoint.address
        attempt = Attempt(self, host, index)
        self.attempt = attempt
        host.pool.acquire(attempt)

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
        host = attempt.host
        host.active_requests += 1
        attempt.stream = conn.open_stream(self.request_headers, headers_only, attempt)
        if headers_only:
            return
        stream = attempt.stream
        if self.retries and self.replay is not None:
            # Bytes an earlier attempt took (and the downstream was credited for) go again.
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

    def _ack_downstream(self, flow_len: int) -> OnSent:
        if not flow_len:
            return None
        downstream = self.downstream
        return lambda: downstream.ack(flow_len)

    def attempt_failed(self, attempt: Attempt, flag: ResponseFlag) -> None:
        if attempt is not self.attempt or self.done:
            return
        self.attempt = None
        if flag is ResponseFlag.UPSTREAM_OVERFLOW:
            assert self.cluster is not None
            self.cluster.scope.inc("upstream_rq_pending_overflow")
        self.local_reply(flag)

    def attempt_reset(self, attempt: Attempt, reason: ResetReason, code: int) -> None:
        if attempt is not self.attempt or self.done:
            return
        attempt.host.active_requests -= 1
        self.attempt = None
        assert self.cluster is not None
        if self.response_started:
            # Part of the response is already downstream: all we can do is pass the reset on.
            self.cluster.scope.inc("upstream_rq_rx_reset")
            self.downstream.reset(code or CANCEL)
            self._finish(0, ResponseFlag.UPSTREAM_RESET)
            return
        if (
            reason is ResetReason.REFUSED
            and self.replay is not None
            and self.retries < MAX_UNPROCESSED_RETRIES
        ):
            # Never processed upstream: safe to send again, preferably to another host.
            self.retries += 1
            self.cluster.scope.inc("upstream_rq_retry")
            self._start_attempt()
            return
        if reason is ResetReason.CONNECTION_LOST:
            self.local_reply(ResponseFlag.UPSTREAM_CONNECTION_TERMINATION)
        elif reason is ResetReason.PROTOCOL_ERROR:
            self.local_reply(ResponseFlag.UPSTREAM_PROTOCOL_ERROR)
        else:
            self.local_reply(ResponseFlag.UPSTREAM_RESET)

    def _cancel_attempt(self, code: int) -> None:
        attempt, self.attempt = self.attempt, None
        if attempt is None:
            return
        attempt.cancelled = True
        if attempt.stream is not None:
            attempt.host.active_requests -= 1
            attempt.stream.reset(code)

    # -- response ---------------------------------------------------------------------------

    def response_headers(self, headers: Headers, end_stream: bool) -> None:
        if self.done:
            return
        self.response_started = True
        status = _header(headers, b":status")
        self.status = int(status) if status is not None and status.isdigit() else 0
        if self.decision is not None:
            headers = apply_mutation(headers, self.decision.route.response_headers)
            headers = apply_mutation(headers, self.decision.virtual_host.response_headers)
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
        self.downstream.send_data(data, end, (lambda: upstream.ack(flow_len)) if flow_len else None)
        if end:
            self._complete()

    def response_trailers(self, trailers: Headers) -> None:
        if self.done:
            return
        self.downstream.send_trailers(trailers)
        self._complete()

    def _complete(self) -> None:
        attempt = self.attempt
        if attempt is not None and attempt.stream is not None:
            attempt.host.active_requests -= 1
            if not self.request_ended:
                # The upstream answered before the request finished (allowed for gRPC):
                # stop sending, as Envoy does, with a reset that carries no error.
                attempt.stream.reset(0x0)
            attempt.cancelled = True
        self.attempt = None
        self._finish(self.status, None)

    # -- local replies and the end ----------------------------------------------------------

    def local_reply(self, flag: ResponseFlag, message: str | None = None) -> None:
        if self.done:
            return
        self._cancel_attempt(CANCEL)
        text = message or flag.message
        flag_value = flag.code.encode()
        if self.response_started:
            self.downstream.reset(CANCEL)
        elif self.grpc:
            headers: Headers = [
                (b":status", b"200"),
                (b"content-type", b"application/grpc"),
                (b"grpc-status", str(int(flag.grpc_status)).encode()),
                (b"grpc-message", _grpc_message(text)),
                (RESPONSE_FLAGS_HEADER, flag_value),
            ]
            self.downstream.send_headers(headers, True)
        else:
            body = f"{text}\n".encode()
            headers = [
                (b":status", str(flag.http_status).encode()),
                (b"content-type", b"text/plain"),
                (b"content-length", str(len(body)).encode()),
                (RESPONSE_FLAGS_HEADER, flag_value),
            ]
            if self.method == "HEAD":
                self.downstream.send_headers(headers, True)
            else:
                self.downstream.send_headers(headers, False)
                self.downstream.send_data(body, True, None)
        self.response_started = True
        log.info(
            "local reply %s %s %s%s -> %d flag=%s: %s",
            self.listener.config.name,
            self.method,
            self.authority,
            self.path,
            flag.http_status,
            flag.code,
            text,
        )
        self._finish(flag.http_status, flag)
        if not self.request_ended:
            # Nobody will read the rest of the request body: tell the client to stop sending.
            self.downstream.reset(0x0)

    def _arm_timeout(self) -> None:
        if self.timer is not None or self.done or self.decision is None:
            return
        timeout = self.decision.route.action.timeout
        if timeout:
            loop = asyncio.get_event_loop()
            self.timer = loop.call_later(timeout, self._on_timeout)

    def _on_timeout(self) -> None:
        self.timer = None
        if self.done:
            return
        if self.cluster is not None:
            self.cluster.scope.inc("upstream_rq_timeout")
        self.local_reply(ResponseFlag.UPSTREAM_TIMEOUT)

    def _finish(self, status: int, flag: ResponseFlag | None) -> None:
        if self.done:
            return
        self.done = True
        if flag is not None:
            self.flag = flag
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.pending.clear()
        self.replay = None
        listener = self.listener
        listener.scope.gauge_add("downstream_rq_active", -1)
        if self.cluster is not None:
            scope = self.cluster.scope
            scope.gauge_add("upstream_rq_active", -1)
            if status and self.flag is None:
                scope.inc(f"upstream_rq_{status // 100}xx")
        if status:
            listener.scope.inc(f"downstream_rq_{status // 100}xx")
        listener.exchange_done(self)


def _grpc_message(text: str) -> bytes:
    """Percent-encode as the gRPC spec asks for grpc-message."""
    out = bytearray()
    for byte in text.encode():
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out.extend(f"%{byte:02X}".encode())
    return bytes(out)
