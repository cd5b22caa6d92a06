"""The timeouts of one downstream HTTP/2 connection, on one loop timer each.

A client connection is closed when it has had no stream for ``http2_idle_timeout``, or when a
header block stays open (HEADERS without END_HEADERS, waiting for CONTINUATION) for
``header_timeout``. A stream that makes no progress, neither bytes in nor bytes out nor window
given, for ``stream_idle_timeout`` is reset: a client that opens streams and never reads their
responses (a zero window) would otherwise hold their buffers, and the upstream requests in the
cluster's breaker, for as long as it likes.

Streams are checked in one sweep per ``stream_idle_timeout`` rather than with a timer each,
so a stalled stream is reset between one and two periods after it stopped; what counts as
progress is the codec's flow-control state of the stream, which costs nothing to keep.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from typing import Protocol

from pilotfish.config.model import ConnectionLimits
from sidecar.http.budget import FrameBudget
from sidecar.idle import IdleTimer


class StallSweep:
    """Pure: the streams whose progress mark did not change since the previous sweep."""

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen: dict[int, Hashable] = {}

    def sweep(self, marks: dict[int, Hashable]) -> list[int]:
        seen = self._seen
        stalled = [sid for sid, mark in marks.items() if sid in seen and seen[sid] == mark]
        for sid in stalled:
            del marks[sid]
        self._seen = marks
        return stalled


class Guarded(Protocol):
    """What the guard needs of its connection."""

    def progress_marks(self) -> dict[int, Hashable]:
        """Each open stream's progress so far, as a value that changes when it moves."""

    def header_block_open(self) -> bool: ...

    def reset_stalled(self, stream_id: int) -> None: ...

    def close_idle(self) -> None: ...

    def close_header_timeout(self) -> None: ...


class H2ServerGuard:
    __slots__ = (
        "_conn",
        "_header_timer",
        "_idle",
        "_limits",
        "_loop",
        "_sweep",
        "_sweep_timer",
        "budget",
    )

    def __init__(
        self, conn: Guarded, limits: ConnectionLimits, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._conn = conn
        self._limits = limits
        self._loop = loop
        self.budget = FrameBudget(limits, loop.time)
        self._idle = IdleTimer(loop, limits.http2_idle_timeout, conn.close_idle)
        self._sweep = StallSweep()
        self._sweep_timer: asyncio.TimerHandle | None = None
        self._header_timer: asyncio.TimerHandle | None = None

    def opened(self) -> None:
        self._idle.idle()

    def stream_opened(self) -> None:
        self._idle.busy()
        if self._sweep_timer is None:
            self._sweep_timer = self._loop.call_later(
                self._limits.stream_idle_timeout, self._on_sweep
            )

    def streams_gone(self) -> None:
        self._idle.idle()

    def after_read(self) -> None:
        timer = self._header_timer
        if self._conn.header_block_open():
            if timer is None:
                self._header_timer = self._loop.call_later(
                    self._limits.header_timeout, self._on_header_timeout
                )
        elif timer is not None:
            timer.cancel()
            self._header_timer = None

    def closed(self) -> None:
        self._idle.cancel()
        for timer in (self._sweep_timer, self._header_timer):
            if timer is not None:
                timer.cancel()
        self._sweep_timer = self._header_timer = None

    def _on_sweep(self) -> None:
        marks = self._conn.progress_marks()
        stalled = self._sweep.sweep(marks)
        for sid in stalled:
            self._conn.reset_stalled(sid)
        self._sweep_timer = (
            self._loop.call_later(self._limits.stream_idle_timeout, self._on_sweep)
            if marks
            else None
        )

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self._conn.header_block_open():
            self._conn.close_header_timeout()
