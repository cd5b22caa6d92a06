"""Cluster-side resilience cores: load balancing, health checking, outlier detection, circuit
breakers with the retry budget, and client-side throttling.

Sans-IO: time and randomness are passed in, nothing here opens a socket except
``health_probes``, the I/O edge of active health checking.
"""

from __future__ import annotations

from collections.abc import Callable

Clock = Callable[[], float]
"""Monotonic seconds, e.g. ``time.monotonic``; tests pass a fake."""
RandomSource = Callable[[], float]
"""A float in [0, 1), e.g. ``random.Random(7).random``."""
