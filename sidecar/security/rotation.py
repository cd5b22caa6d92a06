"""When to ask the CA for the next certificate: at half lifetime, and after failures, sooner.

Sans-IO: the caller feeds outcomes and the clock's reading, and sleeps until ``next_attempt``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RenewalSchedule:
    min_backoff: float = 0.5
    max_backoff: float = 30.0
    next_attempt: float = 0.0
    failures: int = 0

    def issued(self, received_at: float, not_after: float) -> float:
        """A certificate arrived: renew halfway through what is left of its lifetime."""
        self.failures = 0
        self.next_attempt = received_at + max(0.0, not_after - received_at) / 2
        return self.next_attempt

    def failed(self, now: float, not_after: float | None) -> float:
        """A request failed: retry with exponential backoff, but while a certificate is still
        valid, always try again before it expires (a quarter of what is left, at the latest)."""
        self.failures += 1
        delay = min(self.max_backoff, self.min_backoff * 2 ** (self.failures - 1))
        if not_after is not None and not_after > now:
            delay = min(delay, max(self.min_backoff, (not_after - now) / 4))
        self.next_attempt = now + delay
        return self.next_attempt
