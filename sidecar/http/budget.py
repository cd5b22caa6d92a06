"""What one HTTP/2 connection may make the proxy do for it: stream resets and control frames.

Sans-IO: the codec (ours, or any other behind the same interface) tells a ``FrameBudget`` of
each frame that costs us work without carrying a request, and of each stream that ends in a
reset; the budget answers whether the peer may go on. It takes a clock and touches no socket,
so tests drive it with plain numbers.

Each budget is a token bucket, as nghttp2 counts "glitches": a burst the peer may spend at
once, refilled at a steady rate. A well-behaved client never comes near the burst (a browser
sends a handful of SETTINGS, PRIORITY and PING frames per connection; a gRPC client cancels a
few streams a second at most); rapid reset and control-frame floods exhaust it within
milliseconds, and the connection gets GOAWAY ENHANCE_YOUR_CALM.

A stream the peer resets after it has been open for ``SETTLED_STREAM_S`` is not charged: the
attack is opening streams and resetting them at once, so the proxy works for nothing; a
client cancelling calls at their deadline (a hung upstream, a chaos test) waited for each, and
its resets are bounded by its concurrent streams. Envoy judges resets by the same age
(``premature_reset_min_stream_lifetime_seconds``, 1 s by default).

Control frames also earn credit from the DATA we send: a client downloading a large body, or
making many small calls, returns WINDOW_UPDATE frames (and gRPC clients BDP pings) in step
with the data it receives, and that must never count as a flood however long it runs.
"""

from __future__ import annotations

from collections.abc import Callable

from pilotfish.config.model import ConnectionLimits

RAPID_RESET = "rapid_reset"
FLOOD = "flood"
# Control frames each DATA frame we send earns the client: Envoy allows ten WINDOW_UPDATE
# frames per DATA frame sent. gRPC clients return two (stream and connection) per response.
CONTROL_FRAMES_PER_DATA_FRAME = 10
# A stream open this long before the peer resets it was not reset "rapidly": not charged.
SETTLED_STREAM_S = 1.0


class TokenBucket:
    __slots__ = ("_clock", "_last", "burst", "rate", "tokens")

    def __init__(self, burst: int, rate: float, clock: Callable[[], float]) -> None:
        self.burst = float(burst)
        self.rate = rate
        self.tokens = float(burst)
        self._clock = clock
        self._last = clock()

    def take(self, credit: float = 0.0, count: int = 1) -> bool:
        """Spend ``count`` tokens (after adding ``credit``); False when fewer are left."""
        tokens = self.tokens
        if tokens < count or credit:
            now = self._clock()
            tokens += (now - self._last) * self.rate + credit
            self._last = now
            if tokens > self.burst:
                tokens = self.burst
        if tokens < count:
            self.tokens = tokens
            return False
        self.tokens = tokens - count
        return True


class FrameBudget:
    """The budgets of one connection. ``tripped`` names the one that ran out, for stats."""

    __slots__ = ("_completed_seen", "_control", "_data_seen", "_resets", "clock", "tripped")

    def __init__(self, limits: ConnectionLimits, clock: Callable[[], float]) -> None:
        self.clock = clock  # codecs stamp the streams a peer opens with it (``stream_reset``)
        self._resets = TokenBucket(limits.stream_reset_burst, limits.stream_reset_rate, clock)
        self._control = TokenBucket(limits.control_frame_burst, limits.control_frame_rate, clock)
        self._data_seen = 0
        self._completed_seen = 0
        self.tripped: str | None = None

    def stream_reset(self, streams_completed: int, opened: float | None = None) -> bool:
        """A stream ended in RST_STREAM, sent by the peer or by us because of the peer;
        ``streams_completed`` counts the connection's streams that ended normally so far (each
        earns one reset: a client whose calls mostly complete may cancel the rest at any rate,
        as Envoy judges resets by their share of a connection's streams). ``opened``: when
        the peer opened the stream (by ``clock``), for a reset the peer sent; one open for
        ``SETTLED_STREAM_S`` costs nothing."""
        if opened is not None and self.clock() - opened >= SETTLED_STREAM_S:
            return True
        earned = streams_completed - self._completed_seen
        self._completed_seen = streams_completed
        if self._resets.take(earned):
            return True
        self.tripped = RAPID_RESET
        return False

    def control_frame(self, data_frames_sent: int, frames: int = 1) -> bool:
        """``frames`` frames that carry no request (a codec may charge a read's at once);
        ``data_frames_sent`` counts the connection's DATA sends so far (each earns
        ``CONTROL_FRAMES_PER_DATA_FRAME``)."""
        earned = (data_frames_sent - self._data_seen) * CONTROL_FRAMES_PER_DATA_FRAME
        self._data_seen = data_frames_sent
        if self._control.take(earned, frames):
            return True
        self.tripped = FLOOD
        return False
