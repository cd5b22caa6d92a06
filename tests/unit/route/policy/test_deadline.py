from __future__ import annotations

import pytest

from sidecar.flags import GrpcStatus
from sidecar.route.policy.deadline import (
    DEADLINE_FLAG,
    AttemptTimer,
    GrpcTimeoutError,
    RequestDeadline,
    TimerKind,
    format_grpc_timeout,
    parse_grpc_timeout,
    upstream_deadline_kind,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1H", 3600.0),
        ("2M", 120.0),
        ("5S", 5.0),
        ("100m", 0.1),
        ("250u", 0.00025),
        ("7n", 7e-9),
        ("0S", 0.0),
        ("99999999S", 99_999_999.0),
        ("00000010m", 0.01),
    ],
)
def test_parse_each_unit(text: str, seconds: float) -> None:
    assert parse_grpc_timeout(text) == pytest.approx(seconds)
    assert parse_grpc_timeout(text.encode()) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    ["", "S", "10", "123456789S", "1s", "1h", "-1S", "1.5S", " 1S", "1S ", "1 S", "1SS", "1x"],
)
def test_parse_rejects_malformed(text: str) -> None:
    with pytest.raises(GrpcTimeoutError):
        parse_grpc_timeout(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.1, b"100000u"),
        (5.0, b"5000000u"),
        (0.0000005, b"500n"),
        (99.0, b"99000000u"),
        (1000.0, b"1000000m"),
        (100_000.0, b"100000S"),
        (0.0, b"0n"),
        (-3.0, b"0n"),
        (1e9, b"16666667M"),
    ],
)
def test_format_picks_the_finest_unit_within_eight_digits(seconds: float, text: bytes) -> None:
    assert format_grpc_timeout(seconds) == text
    assert len(text) <= 9


def test_format_rounds_up_and_round_trips() -> None:
    for seconds in (0.123456789, 1.5, 3599.9999, 0.00000001):
        encoded = format_grpc_timeout(seconds)
        decoded = parse_grpc_timeout(encoded)
        assert decoded >= seconds - 1e-12
        assert decoded - seconds <= max(seconds * 1e-5, 1e-9)


def test_format_clamps_beyond_the_largest_value() -> None:
    assert format_grpc_timeout(1e20) == b"99999999H"


def test_effective_deadline_is_the_earlier_of_route_and_grpc_timeout() -> None:
    d = RequestDeadline(100.0, route_timeout=15.0, grpc_timeout=b"2S")
    assert d.expires_at == 102.0  # grpc-timeout counts from the headers
    d.request_ended(101.0)
    assert d.expires_at == 102.0
    short = RequestDeadline(100.0, route_timeout=1.0, grpc_timeout=b"5S")
    assert short.expires_at == 105.0  # the route timeout is not armed yet
    short.request_ended(100.5)
    assert short.expires_at == 101.5
    short.request_ended(200.0)  # arming is once
    assert short.expires_at == 101.5


def test_no_timeout_at_all_is_unbounded() -> None:
    d = RequestDeadline(0.0, route_timeout=None)
    d.request_ended(0.0)
    assert d.expires_at is None and d.remaining(50.0) is None and not d.expired(1e9)
    assert d.attempt_timer(0.0, None) is None
    assert d.upstream_header(0.0, None, grpc=True) is None
    assert RequestDeadline(0.0, route_timeout=0.0).expires_at is None


def test_invalid_grpc_timeout_is_ignored_and_flagged() -> None:
    d = RequestDeadline(0.0, route_timeout=3.0, grpc_timeout=b"soon")
    assert d.grpc_timeout_invalid
    d.request_ended(0.0)
    assert d.expires_at == 3.0


def test_remaining_and_expiry() -> None:
    d = RequestDeadline(10.0, route_timeout=None, grpc_timeout=b"500m")
    assert d.remaining(10.2) == pytest.approx(0.3)
    assert not d.expired(10.49)
    assert d.expired(10.5)
    assert d.remaining(11.0) == 0.0


def test_attempt_timer_prefers_the_per_try_timeout_while_it_is_shorter() -> None:
    d = RequestDeadline(0.0, route_timeout=1.0)
    d.request_ended(0.0)
    assert d.attempt_timer(0.0, 0.3) == AttemptTimer(0.3, TimerKind.PER_TRY)
    late = d.attempt_timer(0.8, 0.3)
    assert late is not None and late.kind is TimerKind.DEADLINE
    assert late.delay == pytest.approx(0.2)
    assert d.attempt_timer(0.0, None) == AttemptTimer(1.0, TimerKind.DEADLINE)
    unbounded = RequestDeadline(0.0, route_timeout=None)
    assert unbounded.attempt_timer(0.0, 0.3) == AttemptTimer(0.3, TimerKind.PER_TRY)


def test_upstream_headers_carry_the_budget_of_the_try() -> None:
    d = RequestDeadline(0.0, route_timeout=None, grpc_timeout=b"2S")
    assert d.upstream_header(0.5, None, grpc=True) == (b"grpc-timeout", b"1500000u")
    assert d.upstream_header(0.5, 0.25, grpc=True) == (b"grpc-timeout", b"250000u")
    assert d.upstream_header(0.5, None, grpc=False) == (
        b"x-pilotfish-expected-rq-timeout-ms",
        b"1500",
    )
    assert d.upstream_budget(1.9, 0.25) == pytest.approx(0.1)


def test_expiry_is_deadline_exceeded_not_unavailable() -> None:
    assert DEADLINE_FLAG.http_status == 504
    assert DEADLINE_FLAG.grpc_status is GrpcStatus.DEADLINE_EXCEEDED
    assert DEADLINE_FLAG.code == "UT"


@pytest.mark.parametrize(
    ("now", "try_expires_at", "request_expires_at", "kind"),
    [
        (10.0, 10.0, None, TimerKind.PER_TRY),  # the upstream answered at the per-try deadline
        (9.995, 10.0, None, TimerKind.PER_TRY),  # a moment before the timer's callback ran
        (9.9, 10.0, None, None),  # early: a deadline of the upstream's own, passed on
        (10.0, 10.0, 10.0, TimerKind.DEADLINE),  # the request's deadline wins: no retry
        (10.0, None, 20.0, None),
        (19.995, None, 20.0, TimerKind.DEADLINE),
        (5.0, None, None, None),  # nothing bounds the request
    ],
)
def test_an_upstream_deadline_exceeded_at_our_deadline_is_ours(
    now: float, try_expires_at: float | None, request_expires_at: float | None,
    kind: TimerKind | None,
) -> None:  # fmt: skip
    assert upstream_deadline_kind(now, try_expires_at, request_expires_at) is kind
