"""Deadlines: the route timeout, the caller's ``grpc-timeout``, and what each try may use.

The effective deadline of a request is the earlier of the route timeout (armed when the
downstream request has ended, as Envoy does, so a long upload is not cut) and the caller's
``grpc-timeout`` (counted from the request headers: the caller's clock started when it sent
them). Each try gets ``min(per-try timeout, time left)`` and is told so upstream through its own
``grpc-timeout``. When the whole deadline passes the request ends with 504 / DEADLINE_EXCEEDED
(flag UT) and is never retried; a per-try timeout is an ordinary, retriable failure.

The upstream, told the same budget, races the proxy's own timer: on a busy loop its
DEADLINE_EXCEEDED can be read before the timer's callback runs. Such an answer, arriving at one
of the proxy's deadlines, is that deadline firing (``upstream_deadline_kind``), so the caller
never sees an unflagged deadline failure and a per-try timeout stays retriable.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from sidecar.flags import ResponseFlag

GRPC_TIMEOUT_HEADER = b"grpc-timeout"
EXPECTED_TIMEOUT_HEADER = b"x-pilotfish-expected-rq-timeout-ms"
"""Sent upstream on plain HTTP requests, like Envoy's x-envoy-expected-rq-timeout-ms."""
DEADLINE_FLAG = ResponseFlag.UPSTREAM_TIMEOUT
"""504 / DEADLINE_EXCEEDED: never UNAVAILABLE, so the caller does not retry a spent deadline."""

_NANOS = {b"H": 3600 * 10**9, b"M": 60 * 10**9, b"S": 10**9, b"m": 10**6, b"u": 10**3, b"n": 1}
_FINEST_FIRST = (b"n", b"u", b"m", b"S", b"M", b"H")
_MAX_DIGITS_VALUE = 99_999_999


class GrpcTimeoutError(ValueError):
    """A ``grpc-timeout`` value that is not 1-8 digits followed by one of H M S m u n."""


def parse_grpc_timeout(value: bytes | str) -> float:
    """``b"100m"`` → 0.1 (seconds). Raises ``GrpcTimeoutError`` for anything malformed."""
    raw = value.encode("latin-1") if isinstance(value, str) else value
    unit = _NANOS.get(raw[-1:])
    digits = raw[:-1]
    # bytes.isdigit() is ASCII-only and False for b"": with the length, the same test as
    # [0-9]{1,8}, without a regex per call.
    if unit is None or len(digits) > 8 or not digits.isdigit():
        raise GrpcTimeoutError(f"invalid grpc-timeout {raw!r}")
    return int(digits) * unit / 1e9


# (format, nanoseconds per unit), finest first, past the nanoseconds ``format_grpc_timeout``
# tries first; a budget of seconds (the usual deadline) takes microseconds, the first of these.
_COARSER_UNITS = tuple((b"%d" + unit, _NANOS[unit]) for unit in _FINEST_FIRST[1:])


def format_grpc_timeout(seconds: float) -> bytes:
    """Seconds → the most precise ``grpc-timeout`` that fits 8 digits, rounded up to the unit.

    Rounding up (by under 1e-5 relative: a coarser unit is only used once the finer one needs
    more than 8 digits) keeps a tiny budget from becoming ``0n``, which is already expired.
    """
    nanos = round(seconds * 1e9)
    if nanos <= _MAX_DIGITS_VALUE:
        return b"%dn" % (nanos if nanos > 0 else 0)
    for form, per_unit in _COARSER_UNITS:
        count = -(-nanos // per_unit)
        if count <= _MAX_DIGITS_VALUE:
            return form % count
    return b"%dH" % _MAX_DIGITS_VALUE


class TimerKind(enum.Enum):
    PER_TRY = "per_try"  # the try failed (retriable under `reset`, `5xx`, `gateway-error`)
    DEADLINE = "deadline"  # the request is over: local reply with DEADLINE_FLAG


DEADLINE_SLACK = 0.01
"""Seconds before one of the proxy's deadlines from which an upstream DEADLINE_EXCEEDED counts
as that deadline: the upstream's clock started later and its budget was rounded up, so an
answer to the same budget arrives at or after the deadline; the slack covers the timer wheel
(up to a tick early) and a loop time read before the callback."""


def upstream_deadline_kind(
    now: float, try_expires_at: float | None, request_expires_at: float | None
) -> TimerKind | None:
    """Which of the proxy's deadlines an upstream DEADLINE_EXCEEDED read at ``now`` stands for;
    None: it came early, so it is the upstream's own (a deadline of its own calls) to pass on."""
    if request_expires_at is not None and now >= request_expires_at - DEADLINE_SLACK:
        return TimerKind.DEADLINE
    if try_expires_at is not None and now >= try_expires_at - DEADLINE_SLACK:
        return TimerKind.PER_TRY
    return None


@dataclass(frozen=True, slots=True)
class AttemptTimer:
    delay: float
    kind: TimerKind


class RequestDeadline:
    """The deadline of one downstream request; every time is a reading of the same clock."""

    __slots__ = ("_grpc_expires_at", "_route_expires_at", "_route_timeout", "grpc_timeout_invalid")

    def __init__(
        self, now: float, route_timeout: float | None, grpc_timeout: bytes | str | None = None
    ) -> None:
        """``route_timeout`` None or 0: none. A malformed ``grpc_timeout`` is ignored (as Envoy
        does) and flagged in ``grpc_timeout_invalid`` for the access log."""
        self._route_timeout = route_timeout or None
        self._route_expires_at: float | None = None
        self._grpc_expires_at: float | None = None
        self.grpc_timeout_invalid = False
        if grpc_timeout is not None:
            try:
                self._grpc_expires_at = now + parse_grpc_timeout(grpc_timeout)
            except GrpcTimeoutError:
                self.grpc_timeout_invalid = True

    def request_ended(self, now: float) -> None:
        """The downstream request is complete: the route timeout starts now (once)."""
        if self._route_timeout is not None and self._route_expires_at is None:
            self._route_expires_at = now + self._route_timeout

    @property
    def expires_at(self) -> float | None:
        """The earliest armed expiry, or None while nothing bounds the request."""
        route, grpc = self._route_expires_at, self._grpc_expires_at
        if route is None or (grpc is not None and grpc < route):
            return grpc
        return route

    def remaining(self, now: float) -> float | None:
        """Seconds left (0.0 once expired), or None when unbounded."""
        expires = self.expires_at
        return None if expires is None else max(0.0, expires - now)

    def expired(self, now: float) -> bool:
        expires = self.expires_at
        return expires is not None and now >= expires

    def attempt_timer(self, now: float, per_try_timeout: float | None) -> AttemptTimer | None:
        """The one timer to arm for a try starting (or a request ending) at ``now``.

        Re-arm it on ``request_ended``, since that may bring the deadline forward."""
        remaining = self.remaining(now)
        if per_try_timeout and (remaining is None or per_try_timeout < remaining):
            return AttemptTimer(per_try_timeout, TimerKind.PER_TRY)
        if remaining is None:
            return None
        return AttemptTimer(remaining, TimerKind.DEADLINE)

    def upstream_budget(self, now: float, per_try_timeout: float | None) -> float | None:
        """What a try started now may take: min(per-try timeout, time left); None: unbounded."""
        remaining = self.remaining(now)
        if per_try_timeout and (remaining is None or per_try_timeout < remaining):
            return per_try_timeout
        return remaining

    def upstream_header(
        self, now: float, per_try_timeout: float | None, grpc: bool
    ) -> tuple[bytes, bytes] | None:
        """The header that tells the upstream its budget (``upstream_budget_header``)."""
        return upstream_budget_header(self.expires_at, now, per_try_timeout, grpc)


def upstream_budget_header(
    expires_at: float | None, now: float, per_try_timeout: float | None, grpc: bool
) -> tuple[bytes, bytes] | None:
    """The header that tells the upstream what a try started at ``now`` may take, min(per-try
    timeout, time left until ``expires_at``): ``grpc-timeout`` for gRPC (replacing the
    caller's), ``x-pilotfish-expected-rq-timeout-ms`` otherwise; None if unbounded."""
    remaining = None if expires_at is None else max(0.0, expires_at - now)
    if per_try_timeout and (remaining is None or per_try_timeout < remaining):
        budget: float | None = per_try_timeout
    else:
        budget = remaining
    if budget is None:
        return None
    if grpc:
        return GRPC_TIMEOUT_HEADER, format_grpc_timeout(budget)
    return EXPECTED_TIMEOUT_HEADER, str(math.ceil(budget * 1000)).encode()
