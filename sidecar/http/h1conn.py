"""HTTP/1.1 connections on both sides of the proxy, around the sans-IO ``h11`` library.

Requests and responses cross the proxy in HTTP/2 form (pseudo-headers, lower-case names, no
connection-specific headers), so either protocol can sit on either side. Backpressure on
HTTP/1.1 is the socket's: reading pauses while more than the stream buffer is unacknowledged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import h11

from sidecar.codec.validate import field_value_problem
from sidecar.http.streams import ConnectionOwner, Headers, OnSent, ResetReason, StreamHandler
from sidecar.idle import IdleTimer

if TYPE_CHECKING:
    from pilotfish.identity import SpiffeId

log = logging.getLogger(__name__)

LINGER_SECONDS = 2.0

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"te",
        b"host",
        b"http2-settings",
    }
)


def h1_request_to_h2(request: h11.Request) -> Headers:
    authority = b""
    rest: Headers = []
    for name, value in request.headers:
        if name == b"host":
            authority = value
        elif name == b"te":
            if value.strip().lower() == b"trailers":
                rest.append((name, value))
        elif name not in HOP_BY_HOP:
            rest.append((name, value))
    return [
        (b":method", request.method),
        (b":scheme", b"http"),
        (b":authority", authority),
        (b":path", request.target),
        *rest,
    ]


def h2_to_h1_fields(headers: Headers) -> tuple[dict[bytes, bytes], list[tuple[bytes, bytes]]]:
    """Split pseudo-headers from regular ones, dropping connection-specific headers."""
    pseudo: dict[bytes, bytes] = {}
    fields: list[tuple[bytes, bytes]] = []
    cookies: list[bytes] = []
    for name, value in headers:
        if name[:1] == b":":
            pseudo[name] = value
        elif name == b"cookie":
            cookies.append(value)  # HTTP/2 may split cookies; HTTP/1.1 wants one header
        elif name not in HOP_BY_HOP or (name == b"te" and value == b"trailers"):
            fields.append((name, value))
    if cookies:
        fields.append((b"cookie", b"; ".join(cookies)))
    return pseudo, fields


def _request_problem(fields: Any) -> str | None:
    """Why a request's headers are refused, or None.

    RFC 9112 section 6.1: a request with both Transfer-Encoding and Content-Length may be an
    attempt to smuggle a second request past a proxy that reads one and forwards the other;
    a server may reject it, and we do, before anything is routed. (h11 already refuses
    a Transfer-Encoding other than ``chunked``, and Content-Length that is not a number or
    whose copies disagree; it replaces folded header lines with spaces, as RFC 9112 section
    5.2 allows.)
    """
    has_length = has_te = False
    for name, _ in fields:
        if name == b"content-length":
            has_length = True
        elif name == b"transfer-encoding":
            has_te = True
    if has_length and has_te:
        return "both Content-Length and Transfer-Encoding"
    return field_value_problem(fields)


def _has_framing(fields: list[tuple[bytes, bytes]]) -> bool:
    return any(n in (b"content-length", b"transfer-encoding") for n, _ in fields)


def _response_headers(response: h11.Response | h11.InformationalResponse) -> Headers:
    out: Headers = [(b":status", str(response.status_code).encode())]
    out.extend((n, v) for n, v in response.headers if n not in HOP_BY_HOP)
    return out


class _H1Base(asyncio.Protocol):
    """Shared plumbing: the transport, write backpressure and read pausing."""

    def __init__(self, buffer_limit: int) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.buffer_limit = buffer_limit
        self.unacked = 0
        self.read_paused = False
        self.write_paused = False
        self._after_drain: list[Callable[[], None]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        callbacks, self._after_drain = self._after_drain, []
        for callback in callbacks:
            callback()

    def write(self, data: bytes, on_sent: OnSent) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)
        if on_sent is not None:
            if self.write_paused and not self.closed:
                self._after_drain.append(on_sent)
            else:
                on_sent()

    def received(self, flow_len: int) -> None:
        self.unacked += flow_len
        if self.unacked > self.buffer_limit and not self.read_paused and self.transport:
            self.read_paused = True
            self.transport.pause_reading()

    def ack(self, flow_len: int) -> None:
        self.unacked -= flow_len
        if self.read_paused and self.unacked <= self.buffer_limit // 2 and self.transport:
            self.read_paused = False
            if not self.closed:
                self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        callbacks, self._after_drain = self._after_drain, []
        for callback in callbacks:
            callback()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()


class H1ServerStream:
    """The response side of one downstream HTTP/1.1 request (a ``StreamSink``)."""

    __slots__ = ("chunked", "conn", "done", "handler", "has_body", "head_request", "started")

    def __init__(self, conn: H1ServerConnection, head_request: bool, has_body: bool) -> None:
        self.conn = conn
        self.handler: StreamHandler | None = None
        self.started = False
        self.done = False
        self.head_request = head_request
        self.has_body = has_body  # without one, end of stream went with the headers
        self.chunked = False  # only chunked framing can carry trailers

    def send_headers(self, headers: Headers, end_stream: bool) -> None:
        if self.done or self.conn.closed:
            return
        pseudo, fields = h2_to_h1_fields(headers)
        status = int(pseudo.get(b":status", b"502"))
        if status < 200:
            return  # interim responses are not relayed
        if end_stream and not _has_framing(fields) and status not in (204, 304):
            fields.append((b"content-length", b"0"))
        if self.conn.draining:
            fields.append((b"connection", b"close"))
        # h11 frames a body without a content-length as chunked for HTTP/1.1 clients.
        self.chunked = (
            not _has_framing(fields)
            and not self.head_request
            and status not in (204, 304)
            and self.conn.h11.their_http_version == b"1.1"
        )
        self.started = True
        try:
            data = self.conn.h11.send(h11.Response(status_code=status, headers=fields))
        except h11.LocalProtocolError as exc:
            log.info("cannot relay response headers over HTTP/1.1: %s", exc)
            self.reset(0)
            return
        self.conn.write(data or b"", None)
        if end_stream:
            self._finish(None)

    def send_data(self, data: bytes, end_stream: bool, on_sent: OnSent) -> None:
        if self.done or self.conn.closed:
            if on_sent is not None:
                on_sent()
            return
        if data and not self.head_request:
            try:
                out = self.conn.h11.send(h11.Data(data=data))
            except h11.LocalProtocolError as exc:
                log.info("cannot relay response body over HTTP/1.1: %s", exc)
                self.reset(0)
                if on_sent is not None:
                    on_sent()
                return
            self.conn.write(out or b"", on_sent)
        elif on_sent is not None:
            on_sent()
        if end_stream:
            self._finish(None)

    def send_trailers(self, trailers: Headers) -> None:
        if not self.done:
            self._finish(trailers)

    def _finish(self, trailers: Headers | None) -> None:
        self.done = True
        # Trailers need chunked framing; with a content-length they are dropped.
        fields = [(n, v) for n, v in trailers or () if n[:1] != b":"] if self.chunked else []
        try:
            data = self.conn.h11.send(h11.EndOfMessage(headers=fields))
        except h11.LocalProtocolError as exc:
            log.info("response ended early over HTTP/1.1 (%s); closing", exc)
            self.conn.close()
            return
        self.conn.write(data or b"", None)
        self.conn.response_done(self)

    def reset_when_sent(self, code: int) -> None:
        """After a complete response there is nothing to reset on HTTP/1.1."""
        if not self.done:
            self.reset(code)

    def reset(self, code: int) -> None:
        """HTTP/1.1 has no stream reset: closing the connection is the only way to say it."""
        if not self.done:
            self.done = True
            if self.conn.transport is not None and not self.conn.closed:
                self.conn.transport.abort()

    def ack(self, flow_len: int) -> None:
        if self.conn.stream is self:  # else the connection's budget is a later request's
            self.conn.ack(flow_len)


class H1ServerConnection(_H1Base):
    """A downstream HTTP/1.1 connection: one request at a time, keep-alive between them."""

    def __init__(self, listener: ConnectionOwner) -> None:
        super().__init__(listener.config.per_stream_buffer_bytes)
        self.listener = listener
        self.h11 = h11.Connection(
            h11.SERVER, max_incomplete_event_size=listener.config.max_request_headers_bytes
        )
        self.stream: H1ServerStream | None = None
        self.draining = False
        self.discarding = False
        self.requests = 0
        self.peer: SpiffeId | None = None  # set by the listener after an mTLS handshake
        self.idle_timer = IdleTimer(
            asyncio.get_event_loop(), listener.config.http1_idle_timeout, self.close
        )
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.listener.connection_opened(self)
        self.idle_timer.idle()

    def data_received(self, data: bytes) -> None:
        if self.discarding:
            return
        if self.stream is None and self._header_timer is None:
            # The first bytes of a request: its head must be complete within header_timeout.
            self._header_timer = asyncio.get_event_loop().call_later(
                self.listener.config.limits.header_timeout, self._on_header_timeout
            )
        self.h11.receive_data(data)
        self._process()

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self.stream is None and not self.closed and not self.discarding:
            self.listener.scope.inc("http1.header_timeout")
            self._protocol_error(
                h11.RemoteProtocolError("request headers timed out", error_status_hint=408)
            )

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def eof_received(self) -> bool | None:
        if self.discarding:
            return None
        self.h11.receive_data(b"")
        self._process()
        return None

    def _process(self) -> None:
        while not self.closed and not self.discarding:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                self._protocol_error(exc)
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self._on_request(event)
            elif isinstance(event, h11.Data):
                if self.stream is not None and self.stream.handler is not None:
                    self.received(len(event.data))
                    self.stream.handler.on_data(bytes(event.data), len(event.data), False)
            elif isinstance(event, h11.EndOfMessage):
                stream = self.stream
                if stream is not None and stream.handler is not None and stream.has_body:
                    if event.headers:
                        stream.handler.on_trailers(list(event.headers))
                    else:
                        stream.handler.on_data(b"", 0, True)
            elif isinstance(event, h11.ConnectionClosed):
                self.close()
                return

    def _on_request(self, request: h11.Request) -> None:
        self.idle_timer.busy()
        self._cancel_header_timer()
        size = sum(len(n) + len(v) for n, v in request.headers) + len(request.target)
        if size > self.listener.config.max_request_headers_bytes:
            # h11 bounds only headers that arrive in pieces; a whole one is checked here.
            self._protocol_error(
                h11.RemoteProtocolError("request headers too large", error_status_hint=431)
            )
            return
        trouble = _request_problem(request.headers)
        if trouble is not None:
            self.listener.scope.inc("http1.request_rejected")
            self._protocol_error(h11.RemoteProtocolError(trouble, error_status_hint=400))
            return
        headers = h1_request_to_h2(request)
        has_body = any(
            n == b"transfer-encoding" or (n == b"content-length" and v.strip() != b"0")
            for n, v in request.headers
        )
        stream = H1ServerStream(self, request.method == b"HEAD", has_body)
        self.stream = stream
        self.requests += 1
        if self.listener.request_started_on(self.requests):
            self.draining = True  # this response says Connection: close
        stream.handler = self.listener.new_exchange(stream, self.peer)
        stream.handler.on_headers(headers, not has_body)

    def _protocol_error(self, exc: h11.RemoteProtocolError) -> None:
        log.info("HTTP/1.1 protocol error from downstream: %s", exc)
        if self.stream is None or not self.stream.started:
            status = exc.error_status_hint
            try:
                body = f"bad request: {exc}\n".encode()
                data = self.h11.send(
                    h11.Response(
                        status_code=status,
                        headers=[
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"),
                            (b"content-type", b"text/plain"),
                        ],
                    )
                )
                self.write((data or b"") + (self.h11.send(h11.Data(data=body)) or b""), None)
                self.write(self.h11.send(h11.EndOfMessage()) or b"", None)
            except h11.LocalProtocolError:
                pass  # the response cannot be framed any more; closing says enough
        if self.stream is not None and self.stream.handler is not None and not self.stream.done:
            self.stream.done = True
            self.stream.handler.on_reset(ResetReason.PROTOCOL_ERROR, 0)
        self.linger_close()

    def linger_close(self) -> None:
        """Close after our response, without losing it to unread request bytes.

        Closing a socket with unread input sends RST, and the peer may drop our response with
        it. So: end our side, discard what still arrives for a moment, then close.
        """
        transport = self.transport
        if transport is None or self.closed or self.discarding:
            return
        self.discarding = True
        if self.read_paused:
            self.read_paused = False
            transport.resume_reading()
        if transport.can_write_eof():
            transport.write_eof()
        asyncio.get_event_loop().call_later(LINGER_SECONDS, self.close)

    def response_done(self, stream: H1ServerStream) -> None:
        if self.h11.their_state is h11.SEND_BODY:
            # The response finished before the request body did; stop reading it.
            self.linger_close()
            return
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            if self.draining:
                self.close()
                return
            self.stream = None
            # Both ways are over: the stream and its exchange no longer need each other, and
            # a cycle left between them would wait for the garbage collector.
            stream.handler = None
            self.unacked = 0
            if self.read_paused and self.transport is not None:
                self.read_paused = False
                self.transport.resume_reading()
            self.h11.start_next_cycle()
            self.idle_timer.idle()
            asyncio.get_event_loop().call_soon(self._process)
        elif self.h11.our_state is h11.MUST_CLOSE:
            self.close()

    def start_drain(self) -> None:
        self.draining = True
        if self.stream is None:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.idle_timer.cancel()
        self._cancel_header_timer()
        stream = self.stream
        if stream is not None and not stream.done and stream.handler is not None:
            stream.done = True
            stream.handler.on_reset(ResetReason.CONNECTION_LOST, 0)
        self.listener.connection_closed(self)

    @property
    def active_streams(self) -> int:
        return 0 if self.stream is None else 1


class H1ClientStream:
    """The request side of one upstream HTTP/1.1 exchange (a ``StreamSink``)."""

    __slots__ = ("chunked", "conn", "handler", "head_request", "request_done", "response_done")

    def __init__(self, conn: H1ClientConnection, handler: StreamHandler) -> None:
        self.conn = conn
        self.handler: StreamHandler | None = handler
        self.request_done = False
        self.response_done = False
        self.head_request = False
        self.chunked = False  # only chunked framing can carry trailers

    def send_headers(self, headers: Headers, end_stream: bool) -> None:
        pseudo, fields = h2_to_h1_fields(headers)
        method = pseudo.get(b":method", b"GET")
        self.head_request = method == b"HEAD"
        fields.insert(0, (b"host", pseudo.get(b":authority", b"")))
        if not end_stream and not _has_framing(fields):
            fields.append((b"transfer-encoding", b"chunked"))
            self.chunked = True
        elif end_stream and method in (b"POST", b"PUT", b"PATCH") and not _has_framing(fields):
            fields.append((b"content-length", b"0"))
        try:
            request = h11.Request(
                method=method, target=pseudo.get(b":path", b"/"), headers=fields
            )
        except h11.LocalProtocolError as exc:
            # A request HTTP/1.1 cannot carry (the edge refuses most such requests; this
            # keeps one that slipped through from escaping into the downstream's read).
            self._cannot_frame(exc, None)
            return
        if self._send(request, None) and end_stream:
            self._end(None)

    def _send(self, event: Any, on_sent: OnSent) -> bool:
        try:
            data = self.conn.h11.send(event)
        except h11.LocalProtocolError as exc:
            self._cannot_frame(exc, on_sent)
            return False
        self.conn.write(data or b"", on_sent)
        return True

    def _cannot_frame(self, exc: h11.LocalProtocolError, on_sent: OnSent) -> None:
        """E.g. a body that disagrees with its content-length. The connection cannot be used
        again, and the exchange must hear of it (as a reset once the connection is gone, which
        it answers with UPE) instead of waiting for a response."""
        log.info("cannot relay request over HTTP/1.1: %s", exc)
        self.request_done = True
        self.conn.fail_locally()
        if on_sent is not None:
            on_sent()

    def send_data(self, data: bytes, end_stream: bool, on_sent: OnSent) -> None:
        if self.request_done or self.conn.closed:
            if on_sent is not None:
                on_sent()
            return
        if data:
            if not self._send(h11.Data(data=data), on_sent):
                return
        elif on_sent is not None:
            on_sent()
        if end_stream:
            self._end(None)

    def send_trailers(self, trailers: Headers) -> None:
        self._end(trailers)

    def _end(self, trailers: Headers | None) -> None:
        if self.request_done:
            return
        # With a content-length the trailers are dropped: HTTP/1.1 has no way to send them.
        fields = [(n, v) for n, v in trailers or () if n[:1] != b":"] if self.chunked else []
        if self._send(h11.EndOfMessage(headers=fields), None):
            self.request_done = True
            self.conn.maybe_recycle()

    def reset(self, code: int) -> None:
        self.handler = None
        self.conn.abort()

    def reset_when_sent(self, code: int) -> None:
        self.reset(code)

    def ack(self, flow_len: int) -> None:
        if self.conn.stream is self:  # else the connection's budget is a later request's
            self.conn.ack(flow_len)


class H1ClientConnection(_H1Base):
    """An upstream HTTP/1.1 connection: one request at a time, reused while keep-alive."""

    def __init__(self, owner: Any, buffer_limit: int, idle_timeout: float) -> None:
        super().__init__(buffer_limit)
        self.owner = owner  # the UpstreamHost: pool reports and stats
        self.h11 = h11.Connection(h11.CLIENT)
        self.stream: H1ClientStream | None = None
        self.idle_timer = IdleTimer(asyncio.get_event_loop(), idle_timeout, self.close)
        self._failed_locally = False

    def arm_idle_timer(self) -> None:
        if not self.closed:
            self.idle_timer.idle()

    def fail_locally(self) -> None:
        """We could not frame the request: close, and report the stream reset once closed."""
        self._failed_locally = True
        self.abort()

    def is_available(self) -> bool:
        return not self.closed and self.stream is None and self.h11.our_state is h11.IDLE

    def is_idle(self) -> bool:
        return self.stream is None

    def open_stream(
        self, headers: Headers, end_stream: bool, handler: StreamHandler
    ) -> H1ClientStream:
        self.idle_timer.busy()
        stream = H1ClientStream(self, handler)
        self.stream = stream
        stream.send_headers(headers, end_stream)
        return stream

    def data_received(self, data: bytes) -> None:
        self.h11.receive_data(data)
        self._process()

    def eof_received(self) -> bool | None:
        self.h11.receive_data(b"")
        self._process()
        return None

    def _process(self) -> None:
        pending_headers: Headers | None = None
        while not self.closed:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                self._fail(ResetReason.PROTOCOL_ERROR, f"upstream protocol error: {exc}")
                return
            stream = self.stream
            handler = stream.handler if stream is not None else None
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                pending_headers = _response_headers(event)
                continue
            if pending_headers is not None:
                ended = isinstance(event, h11.EndOfMessage) and not event.headers
                if handler is not None:
                    handler.on_headers(pending_headers, ended)
                pending_headers = None
                if ended:
                    self._response_complete()
                    continue
            if isinstance(event, h11.Data):
                if handler is not None:
                    self.received(len(event.data))
                    handler.on_data(bytes(event.data), len(event.data), False)
            elif isinstance(event, h11.EndOfMessage):
                if handler is not None:
                    if event.headers:
                        handler.on_trailers(list(event.headers))
                    else:
                        handler.on_data(b"", 0, True)
                self._response_complete()
            elif isinstance(event, h11.ConnectionClosed):
                self._fail(ResetReason.CONNECTION_LOST, "upstream closed the connection")
                return
        if pending_headers is not None and self.stream is not None and self.stream.handler:
            self.stream.handler.on_headers(pending_headers, False)

    def _response_complete(self) -> None:
        if self.stream is not None:
            self.stream.response_done = True
            self.stream.handler = None
        self.maybe_recycle()

    def maybe_recycle(self) -> None:
        stream = self.stream
        if stream is None or not (stream.request_done and stream.response_done):
            return
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            self.stream = None
            self.unacked = 0
            if self.read_paused and self.transport is not None:
                self.read_paused = False
                self.transport.resume_reading()
            self.arm_idle_timer()
            self.owner.released(self)
        else:
            self.stream = None
            self.close()

    def _fail(self, reason: ResetReason, message: str) -> None:
        log.debug("%s", message)
        stream, self.stream = self.stream, None
        if stream is not None and stream.handler is not None:
            handler, stream.handler = stream.handler, None
            handler.on_reset(reason, 0)
        self.abort()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.idle_timer.cancel()
        stream, self.stream = self.stream, None
        if stream is not None and stream.handler is not None:
            handler, stream.handler = stream.handler, None
            reason = (
                ResetReason.PROTOCOL_ERROR if self._failed_locally else ResetReason.CONNECTION_LOST
            )
            handler.on_reset(reason, 0)
        self.owner.connection_closed(self)
