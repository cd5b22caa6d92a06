"""A unary gRPC call over HTTP/2, sans-IO: the request's headers and framing, the judgement of
the answer, and the retry schedule the OTLP exporter specification asks for.

A unary call is one HTTP/2 stream: HEADERS (``POST``, ``content-type: application/grpc``,
``te: trailers``, ``grpc-timeout``), the message behind a 5-byte prefix (compressed flag,
big-endian length) in DATA, END_STREAM. The answer is HEADERS, the response message, and
trailers carrying ``grpc-status``; or, for an error, one HEADERS block that ends the stream
("trailers-only"). ``UnaryCall`` takes the codec's events for its stream and comes to a
``CallStatus``; the socket is the caller's (``otlp_grpc``). Nothing here reads a clock or
sleeps: ``retrying`` is handed both.
"""

from __future__ import annotations

import base64
import binascii
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote

import tenacity

from sidecar.codec import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamReset,
    TrailersReceived,
)
from sidecar.codec.errors import CANCEL, ENHANCE_YOUR_CALM, REFUSED_STREAM
from sidecar.codec.events import Event
from sidecar.flags import GrpcStatus
from sidecar.route.policy.deadline import format_grpc_timeout
from sidecar.route.policy.reply import http_to_grpc

# The statuses the OTLP exporter specification calls transient (and the SDK's exporter retries).
RETRYABLE = frozenset(
    {
        GrpcStatus.CANCELLED,
        GrpcStatus.DEADLINE_EXCEEDED,
        GrpcStatus.RESOURCE_EXHAUSTED,
        GrpcStatus.ABORTED,
        GrpcStatus.OUT_OF_RANGE,
        GrpcStatus.UNAVAILABLE,
        GrpcStatus.DATA_LOSS,
    }
)
MAX_ATTEMPTS = 6  # as the SDK's exporter: 1 s, 2 s, 4 s, 8 s, 16 s of backoff at most
# What gRPC clients make of a reset stream (the other codes are INTERNAL).
_RESET_STATUS = {
    REFUSED_STREAM: GrpcStatus.UNAVAILABLE,
    CANCEL: GrpcStatus.CANCELLED,
    ENHANCE_YOUR_CALM: GrpcStatus.RESOURCE_EXHAUSTED,
}
# An OTLP answer is a few bytes; what a confused peer sends beyond this is not kept.
MAX_RESPONSE_BYTES = 64 * 1024
RETRY_INFO = b"google.rpc.retryinfo-bin"


def request_headers(
    *,
    authority: str,
    secure: bool,
    path: str,
    timeout_s: float,
    compression: str,
    extra: tuple[tuple[bytes, bytes], ...],
    user_agent: bytes,
) -> list[tuple[bytes, bytes]]:
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"https" if secure else b"http"),
        (b":path", path.encode()),
        (b":authority", authority.encode()),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        (b"grpc-timeout", format_grpc_timeout(timeout_s)),
        (b"user-agent", user_agent),
    ]
    if compression != "none":
        headers.append((b"grpc-encoding", compression.encode()))
    headers.append((b"grpc-accept-encoding", b"identity,deflate,gzip"))
    return [*headers, *extra]


def framed(message: bytes, compression: str) -> bytes:
    """The message as a gRPC length-prefixed message, compressed as configured (gRPC's
    ``deflate`` is the zlib format)."""
    if compression == "gzip":
        message = zlib.compress(message, wbits=31)
    elif compression == "deflate":
        message = zlib.compress(message)
    flag = b"\x00" if compression == "none" else b"\x01"
    return flag + len(message).to_bytes(4, "big") + message


@dataclass(frozen=True, slots=True)
class CallStatus:
    """What one call came to."""

    code: int
    message: str = ""
    retry_delay: float | None = None  # the delay the collector asked for (``RetryInfo``)
    # The collector provably did not process the call (GOAWAY below its stream, a refused
    # stream): it may go again at once on a new connection, without counting as a retry.
    unprocessed: bool = False

    @property
    def ok(self) -> bool:
        return self.code == GrpcStatus.OK

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE

    @property
    def name(self) -> str:
        try:
            return GrpcStatus(self.code).name
        except ValueError:
            return f"status {self.code}"

    def __str__(self) -> str:
        return f"{self.name}: {self.message}" if self.message else self.name


class UnaryCall:
    """The answer on one stream, built from the codec's events."""

    __slots__ = ("_body", "_http_status", "_metadata", "answered", "status", "stream_id")

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id
        self.status: CallStatus | None = None  # set when the call is over
        self.answered = False  # anything came back on the stream
        self._http_status = 0
        self._metadata: dict[bytes, bytes] = {}
        self._body = 0

    @property
    def done(self) -> bool:
        return self.status is not None

    def on_events(self, events: list[Event]) -> None:
        sid = self.stream_id
        for event in events:
            if self.status is not None:
                return
            if isinstance(event, ConnectionTerminated):
                if event.last_stream_id < sid:
                    self.status = CallStatus(
                        GrpcStatus.UNAVAILABLE,
                        f"the collector went away (GOAWAY {event.error_code}) before the call",
                        unprocessed=True,
                    )
                # Otherwise the collector finishes the call before it closes.
                continue
            if isinstance(event, RemoteSettingsChanged) or event.stream_id != sid:
                continue
            self.answered = True
            if isinstance(event, ResponseReceived | TrailersReceived):
                for name, value in event.headers:
                    if name == b":status":
                        self._http_status = int(value)
                    else:
                        self._metadata[name] = value
                if event.stream_ended:
                    self.status = self._judged()
            elif isinstance(event, DataReceived):
                self._body += len(event.data)  # the response message: OTLP's is not read
                if self._body > MAX_RESPONSE_BYTES:
                    self.status = CallStatus(GrpcStatus.RESOURCE_EXHAUSTED, "response too large")
                elif event.stream_ended:  # no trailers
                    self.status = self._judged()
            elif isinstance(event, StreamReset):
                code = _RESET_STATUS.get(event.error_code, GrpcStatus.INTERNAL)
                self.status = CallStatus(
                    code,
                    f"stream reset with HTTP/2 error {event.error_code}",
                    unprocessed=event.error_code == REFUSED_STREAM,
                )

    def connection_lost(self, detail: str) -> CallStatus:
        """The connection ended (or failed) before the answer did."""
        if self.status is None:
            self.status = CallStatus(GrpcStatus.UNAVAILABLE, detail)
        return self.status

    def _judged(self) -> CallStatus:
        meta = self._metadata
        raw = meta.get(b"grpc-status")
        if raw is None:
            if self._http_status != 200:
                # The gRPC spec's mapping, for a proxy's answer that is not gRPC.
                code = http_to_grpc(self._http_status)
                return CallStatus(code, f"HTTP status {self._http_status}")
            return CallStatus(GrpcStatus.UNKNOWN, "the answer carried no grpc-status")
        if not raw.isdigit():
            return CallStatus(GrpcStatus.UNKNOWN, f"grpc-status {raw!r}")
        message = unquote(meta.get(b"grpc-message", b"").decode("ascii", "replace"))
        return CallStatus(int(raw), message, retry_delay(meta.get(RETRY_INFO)))


def retry_delay(raw: bytes | None) -> float | None:
    """The ``retry_delay`` of a ``google.rpc.RetryInfo`` trailer (base64, padded or not), or
    None when there is none or it does not parse."""
    if raw is None:
        return None
    from google.protobuf.message import DecodeError
    from google.rpc.error_details_pb2 import RetryInfo

    try:
        info = RetryInfo.FromString(base64.b64decode(raw + b"=" * (-len(raw) % 4)))
    except (binascii.Error, DecodeError):
        return None
    if not info.HasField("retry_delay"):
        return None
    delay = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return delay if delay >= 0 else None


def backoff(status: CallStatus, attempt: int, jitter: float) -> float:
    """Seconds before the next try after try number ``attempt`` (1, 2…) failed with
    ``status``: the collector's delay when it asked for one, else 1 s, 2 s, 4 s… ±20%
    (``jitter`` in [0, 1))."""
    if status.retry_delay is not None:
        return status.retry_delay
    return float(2 ** (attempt - 1)) * (0.8 + 0.4 * jitter)


def retrying(
    deadline: float,
    *,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
    random: Callable[[], float],
    before_sleep: Callable[[CallStatus, float], None] | None = None,
) -> tenacity.Retrying:
    """Tries of one export: a transient status is tried again after ``backoff``, at most
    ``MAX_ATTEMPTS`` times in all, and never when the wait would end past ``deadline`` (read
    on ``clock``). It returns the last try's status; ``sleep`` may raise to abandon it."""

    def wait(state: tenacity.RetryCallState) -> float:
        return backoff(_status(state), state.attempt_number, random())

    def announce(state: tenacity.RetryCallState) -> None:
        if before_sleep is not None:
            before_sleep(_status(state), state.upcoming_sleep)

    return tenacity.Retrying(
        retry=tenacity.retry_if_result(lambda status: bool(status.retryable)),
        wait=wait,
        stop=tenacity.stop_any(
            tenacity.stop_after_attempt(MAX_ATTEMPTS), _PastDeadline(deadline, clock)
        ),
        sleep=sleep,
        before_sleep=announce,
        retry_error_callback=_status,
    )


class _PastDeadline(tenacity.stop.stop_base):
    """Stop when the wait before the next try would end at or past the deadline (tenacity's
    ``stop_before_delay`` reads its own clock; this one reads the caller's)."""

    def __init__(self, deadline: float, clock: Callable[[], float]) -> None:
        self.deadline = deadline
        self.clock = clock

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        return self.clock() + retry_state.upcoming_sleep >= self.deadline


def _status(state: tenacity.RetryCallState) -> CallStatus:
    assert state.outcome is not None
    status: CallStatus = state.outcome.result()
    return status
