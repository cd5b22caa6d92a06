"""The timer wheel on a fake clock: when timers fire, and that they share one loop timer."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest

from sidecar.timer_wheel import TimerWheel
from tests.fake_loop import FakeLoop


def make_wheel() -> tuple[FakeLoop, TimerWheel]:
    loop = FakeLoop()
    return loop, TimerWheel(cast(asyncio.AbstractEventLoop, loop), tick=0.001)


def run_until(loop: FakeLoop, end: float, step: float = 0.0001) -> None:
    while loop.now < end:
        loop.advance(step)


@pytest.mark.parametrize("when", [10.0, 10.0037, 10.0999])
def test_fires_within_one_tick_before_its_time_never_after(when: float) -> None:
    loop, wheel = make_wheel()
    fired: list[float] = []
    wheel.call_at(when, lambda: fired.append(loop.now))
    run_until(loop, when + 0.01)
    assert len(fired) == 1
    step = 0.0001  # the fake clock's own resolution
    assert when - 0.001 - step <= fired[0] <= when + step


def test_cancelled_timers_do_not_fire_and_cancel_is_idempotent() -> None:
    loop, wheel = make_wheel()
    fired: list[str] = []
    keep = wheel.call_later(1.0, fired.append, "keep")
    drop = wheel.call_later(1.0, fired.append, "drop")
    drop.cancel()
    drop.cancel()
    run_until(loop, 2.0)
    assert fired == ["keep"]
    keep.cancel()  # after it ran: harmless
    assert keep.cancelled() and len(wheel) == 0


def test_thousands_of_timers_share_one_loop_timer() -> None:
    loop, wheel = make_wheel()
    timers = [wheel.call_at(15.0 + i * 1e-7, lambda: None) for i in range(2000)]
    assert loop.live == 1 and len(wheel) == 2000
    for timer in timers:
        timer.cancel()
    assert len(wheel) == 0


def test_ticks_whose_timers_were_cancelled_cost_no_wakeup() -> None:
    # Deadlines under load: one per request, each cancelled long before it is due. The loop
    # timer must not wake for every millisecond that once held a deadline.
    loop, wheel = make_wheel()
    wakeups = 0
    fire = wheel._fire

    def counted() -> None:
        nonlocal wakeups
        wakeups += 1
        fire()

    wheel._fire = counted  # type: ignore[method-assign]
    fired: list[int] = []
    for i in range(1000):
        timer = wheel.call_at(15.0 + i * 0.001, fired.append, i)
        if i != 500:
            timer.cancel()
    run_until(loop, 17.0, step=0.0005)
    assert fired == [500]
    assert wakeups <= 2  # the first tick's (armed before its cancel), and the live one's
    assert loop.live == 0 and len(wheel) == 0


def test_a_tick_is_queued_once_however_many_timers_come_and_go_in_it() -> None:
    # One connection's requests, each done before the next: every deadline lands in the same
    # tick and is cancelled before the next is set.
    loop, wheel = make_wheel()
    for _ in range(1000):
        wheel.call_at(15.0, lambda: None).cancel()
    assert len(wheel._due) == 1
    run_until(loop, 16.0, step=0.0005)
    assert not wheel._due and not wheel._buckets


def test_an_earlier_timer_rearms_and_later_ones_still_fire_in_order() -> None:
    loop, wheel = make_wheel()
    fired: list[str] = []
    wheel.call_at(5.0, fired.append, "late")
    wheel.call_at(1.0, fired.append, "early")
    wheel.call_at(3.0, fired.append, "middle")
    run_until(loop, 1.5)
    assert fired == ["early"]
    run_until(loop, 6.0)
    assert fired == ["early", "middle", "late"]


def test_a_callback_may_cancel_a_timer_of_the_same_tick() -> None:
    loop, wheel = make_wheel()
    fired: list[str] = []
    second = wheel.call_at(1.0, fired.append, "second")

    def first() -> None:
        fired.append("first")
        second.cancel()

    wheel.call_at(1.0, first)
    run_until(loop, 2.0)
    assert fired in (["first"], ["second", "first"])  # never both after a cancel
    assert len(wheel) == 0


def test_close_drops_everything() -> None:
    loop, wheel = make_wheel()
    fired: list[int] = []
    wheel.call_later(1.0, fired.append, 1)
    wheel.close()
    run_until(loop, 2.0)
    assert fired == [] and loop.live == 0
