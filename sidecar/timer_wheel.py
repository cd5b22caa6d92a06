"""Coarse timers for deadlines that almost never fire, with one loop timer for all of them.

Every request arms a deadline (the route timeout, the caller's ``grpc-timeout``, a per-try
timeout) and nearly every request cancels it a few milliseconds later. A loop timer costs an
allocation, a heap insertion and, on uvloop, a handle closed on a later iteration: several
microseconds a request. Here a timer is an entry in the bucket of its tick (``TICK`` seconds
wide), cancelling removes the entry, and one loop timer is armed for the earliest bucket
that still holds a timer. A bucket stays until its tick has passed, emptied or not, so a tick
is pushed on the heap once however many timers come and go in it; when the loop timer fires,
it passes over the emptied buckets to re-arm. Deadlines are cancelled long before they are
due, so under load the loop timer sits far ahead and the wheel costs no wakeups of its own.

A timer is either a ``WheelTimer`` (``call_at``, with ``cancel`` as on a loop timer) or any
object with an ``on_timer`` method, entered with ``add``: the request path's deadlines are the
exchanges themselves, so arming and cancelling one allocates nothing (the owner keeps the
bucket ``add`` returns, and cancels with ``Bucket.pop(owner, None)``).

A timer fires at the last tick boundary at or before its time, so up to ``TICK`` early and
never later than a loop timer would. Early rather than late because the deadlines here are
budgets also sent upstream (rounded up): the proxy's own expiry should come first, so the
caller gets the proxy's answer (flag ``UT``), not a race.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections.abc import Callable
from typing import Any, Protocol

TICK = 0.001


class WheelEntry(Protocol):
    """A timer that is its own owner (hashable, by identity)."""

    def on_timer(self) -> None: ...


Bucket = dict[Any, None]
"""The timers due in one tick, in the order they were set."""


class WheelTimer:
    """One scheduled callback; ``cancel`` and ``when`` as on ``asyncio.TimerHandle``."""

    __slots__ = ("_args", "_bucket", "_callback", "_when")

    def __init__(
        self, when: float, bucket: Bucket, callback: Callable[..., object],
        args: tuple[Any, ...],
    ) -> None:  # fmt: skip
        self._when = when
        self._bucket: Bucket | None = bucket
        self._callback = callback
        self._args = args

    def when(self) -> float:
        return self._when

    def cancelled(self) -> bool:
        return self._bucket is None

    def cancel(self) -> None:
        bucket, self._bucket = self._bucket, None
        if bucket is not None:
            del bucket[self]

    def on_timer(self) -> None:
        self._bucket = None
        self._callback(*self._args)


class TimerWheel:
    """Timers on an event loop's clock at ``tick`` granularity. One per event loop: the one
    given, else the one running when the first timer is set."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None, tick: float = TICK) -> None:
        self._loop = loop
        self._tick = tick
        self._buckets: dict[int, Bucket] = {}
        self._due: list[int] = []  # ticks that have a bucket, as a heap
        self._handle: asyncio.TimerHandle | None = None
        self._armed_tick: int | None = None

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> WheelTimer:
        bucket = self._bucket(when)
        timer = WheelTimer(when, bucket, callback, args)
        bucket[timer] = None
        return timer

    def add(self, when: float, entry: WheelEntry) -> Bucket:
        """``entry.on_timer()`` at ``when``; cancel with ``bucket.pop(entry, None)`` on the
        bucket returned (an entry is in at most one bucket: the caller's to see to)."""
        tick = math.floor(when / self._tick)
        bucket = self._buckets.get(tick)
        if bucket is None:
            bucket = self._new_bucket(tick)
        bucket[entry] = None
        return bucket

    def _bucket(self, when: float) -> Bucket:
        tick = math.floor(when / self._tick)
        bucket = self._buckets.get(tick)
        if bucket is None:
            bucket = self._new_bucket(tick)
        return bucket

    def _new_bucket(self, tick: int) -> Bucket:
        bucket = self._buckets[tick] = {}
        heapq.heappush(self._due, tick)
        if self._armed_tick is None or tick < self._armed_tick:
            self._arm(tick)
        return bucket

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> WheelTimer:
        return self.call_at(self._clock().time() + delay, callback, *args)

    def _clock(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The wheel's event loop. Asking asyncio for the running loop costs a ``getpid``
        system call on every call (CPython 3.11 checks for a fork); this is kept."""
        loop = self._loop
        return loop if loop is not None else self._clock()  # read by every request

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self._armed_tick = None
        self._buckets.clear()
        self._due.clear()

    def _arm(self, tick: int) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed_tick = tick
        self._handle = self._clock().call_at(tick * self._tick, self._fire)

    def _fire(self) -> None:
        self._handle = self._armed_tick = None
        # A loop clock in whole milliseconds may run the loop timer a hair before its time.
        now_tick = math.floor((self._clock().time() + self._tick / 2) / self._tick)
        due = self._due
        buckets = self._buckets
        while due and due[0] <= now_tick:
            bucket = buckets.pop(heapq.heappop(due))
            for timer in list(bucket):
                if timer in bucket:  # an earlier callback may have cancelled it
                    timer.on_timer()
        while due and not buckets[due[0]]:  # ticks whose timers were all cancelled
            del buckets[heapq.heappop(due)]
        if due:
            self._arm(due[0])
