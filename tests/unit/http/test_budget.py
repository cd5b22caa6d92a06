"""The per-connection budgets and the stalled-stream sweep, on plain numbers and a fake clock."""

from __future__ import annotations

from pilotfish.config.model import ConnectionLimits
from sidecar.http.budget import FLOOD, RAPID_RESET, FrameBudget, TokenBucket
from sidecar.http.h2guard import StallSweep


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_bucket_spends_its_burst_then_refills_at_its_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(3, 2.0, clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    clock.now = 0.5  # one token back
    assert [bucket.take() for _ in range(2)] == [True, False]
    clock.now = 100.0  # never more than the burst
    assert sum(bucket.take() for _ in range(10)) == 3


def test_rapid_reset_trips_after_the_burst() -> None:
    clock = Clock()
    budget = FrameBudget(ConnectionLimits(stream_reset_burst=100, stream_reset_rate=10.0), clock)
    allowed = 0
    while budget.stream_reset(0) and allowed < 10_000:
        allowed += 1
    assert allowed == 100 and budget.tripped == RAPID_RESET


def test_a_steady_reset_rate_below_the_limit_never_trips() -> None:
    """A gRPC client cancelling 5 streams a second, for an hour."""
    clock = Clock()
    budget = FrameBudget(ConnectionLimits(stream_reset_burst=10, stream_reset_rate=6.0), clock)
    for i in range(5 * 3600):
        clock.now = i / 5
        assert budget.stream_reset(0)
    assert budget.tripped is None


def test_a_reset_of_a_stream_open_a_second_costs_nothing() -> None:
    clock = Clock()
    clock.now = 50.0
    budget = FrameBudget(ConnectionLimits(stream_reset_burst=10, stream_reset_rate=1.0), clock)
    assert all(budget.stream_reset(0, opened=49.0) for _ in range(10_000))
    assert budget.tripped is None
    young = 0
    while budget.stream_reset(0, opened=49.5) and young < 10_000:
        young += 1
    assert young == 10 and budget.tripped == RAPID_RESET


def test_control_frames_are_earned_by_data_sent() -> None:
    """A long download: one WINDOW_UPDATE per DATA frame we send must never trip, whatever
    the rate of the clock; without the data it trips after the burst."""
    clock = Clock()
    budget = FrameBudget(ConnectionLimits(control_frame_burst=50, control_frame_rate=1.0), clock)
    for sent in range(1, 100_001):
        assert budget.control_frame(sent)
    flood = FrameBudget(ConnectionLimits(control_frame_burst=50, control_frame_rate=1.0), clock)
    allowed = 0
    while flood.control_frame(0) and allowed < 10_000:
        allowed += 1
    assert allowed == 50 and flood.tripped == FLOOD


def test_sweep_reports_streams_that_did_not_move_over_a_whole_period() -> None:
    sweep = StallSweep()
    assert sweep.sweep({1: (10, 0), 3: (5, 0)}) == []  # first sight: nothing to compare
    assert sweep.sweep({1: (10, 0), 3: (6, 0), 5: (0, 0)}) == [1]
    # Stream 1 is reported once (its owner resets it); 3 moved again; 5 is new since.
    assert sweep.sweep({3: (6, 0), 5: (0, 0)}) == [3, 5]
    assert sweep.sweep({}) == []


def test_a_busy_grpc_client_never_trips_the_control_budget() -> None:
    """Unary calls at 5,000 a second for a minute: per call the client returns two
    WINDOW_UPDATEs (stream and connection) for the one DATA frame of the response, and a BDP
    PING every tenth call."""
    clock = Clock()
    budget = FrameBudget(ConnectionLimits(), clock)
    for call in range(5000 * 60):
        clock.now = call / 5000
        data_sent = call + 1  # the response's DATA frame
        assert budget.control_frame(data_sent)
        assert budget.control_frame(data_sent)
        if call % 10 == 0:
            assert budget.control_frame(data_sent)
    assert budget.tripped is None


def test_resets_are_earned_by_streams_that_complete() -> None:
    """A client cancelling half its calls, 1,000 calls a second, for a minute."""
    clock = Clock()
    budget = FrameBudget(ConnectionLimits(), clock)
    completed = 0
    for call in range(1000 * 60):
        clock.now = call / 1000
        if call % 2:
            assert budget.stream_reset(completed)
        else:
            completed += 1
    assert budget.tripped is None


def test_a_reads_control_frames_charged_at_once_cost_what_they_would_one_by_one() -> None:
    clock = Clock()
    limits = ConnectionLimits(control_frame_burst=10, control_frame_rate=1.0)
    one_by_one, at_once = FrameBudget(limits, clock), FrameBudget(limits, clock)
    assert all(one_by_one.control_frame(0) for _ in range(10))
    assert at_once.control_frame(0, frames=10)
    assert not one_by_one.control_frame(0) and not at_once.control_frame(0)
    assert at_once.tripped == one_by_one.tripped == FLOOD


def test_a_read_with_more_control_frames_than_the_budget_holds_trips_it() -> None:
    limits = ConnectionLimits(control_frame_burst=10, control_frame_rate=1.0)
    budget = FrameBudget(limits, Clock())
    assert not budget.control_frame(0, frames=11)
    assert budget.tripped == FLOOD
