"""Route-side resilience cores: deadlines, retries, rate limits, shedding, faults and
fallbacks. The cluster's own (breakers, retry budget, throttling) are in
``sidecar.upstream.policy``.

Every class here is sans-IO: time comes in as numbers read from one injected monotonic clock,
randomness from an injected ``random() -> float in [0, 1)``, and nothing touches a socket or the
event loop. The router (the I/O side) turns decisions into timers, replies and stats.
"""

from __future__ import annotations

from sidecar.upstream.policy import Clock, RandomSource

__all__ = ["Clock", "RandomSource"]
