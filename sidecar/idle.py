"""Idle timeouts that cost one loop timer per idle period, not one per request.

A connection alternates between busy (a request or stream in flight) and idle many times a
second under load. Arming and cancelling a loop timer at each change costs a few
microseconds a request. ``IdleTimer`` only records the change; its one timer, when it fires
while the connection is busy or was busy since, re-arms for what is left of the idle period.
The timeout still fires ``timeout`` seconds after the start of an idle period that lasted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

# Loop clocks may tick in milliseconds (uvloop): a timer can fire a hair before its due time.
_SLACK = 0.001


class IdleTimer:
    """Calls ``on_idle`` once the owner has been idle for ``timeout`` seconds.

    Call ``idle()`` whenever the owner becomes idle (including right after it opens),
    ``busy()`` when it becomes busy, and ``cancel()`` when it closes."""

    __slots__ = ("_busy", "_handle", "_idle_since", "_loop", "_on_idle", "timeout")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, timeout: float, on_idle: Callable[[], None]
    ) -> None:
        self._loop = loop
        self.timeout = timeout
        self._on_idle = on_idle
        self._handle: asyncio.TimerHandle | None = None
        self._busy = True
        self._idle_since = 0.0

    @property
    def armed(self) -> bool:
        return self._handle is not None

    def idle(self) -> None:
        self._busy = False
        self._idle_since = self._loop.time()
        if self._handle is None:
            self._handle = self._loop.call_at(self._idle_since + self.timeout, self._fire)

    def busy(self) -> None:
        self._busy = True

    def cancel(self) -> None:
        self._busy = True
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        if self._busy:
            return  # ``idle()`` arms again when this busy spell ends
        due = self._idle_since + self.timeout
        if self._loop.time() >= due - _SLACK:
            self._on_idle()
        else:
            self._handle = self._loop.call_at(due, self._fire)
