"""Route-side resilience cores: deadlines, retries, budgets, breakers, rate limits, shedding,
throttling, faults and fallbacks.

Every class here is sans-IO: time comes in as numbers read from one injected monotonic clock,
randomness from an injected ``random() -> float in [0, 1)``, and nothing touches a socket or the
event loop. The router (the I/O side) turns decisions into timers, replies and stats.
"""

from __future__ import annotations

from collections.abc import Callable

Clock = Callable[[], float]
"""Monotonic seconds, e.g. ``time.monotonic``; tests pass a fake."""
RandomSource = Callable[[], float]
"""A float in [0, 1), e.g. ``random.Random(7).random``."""
