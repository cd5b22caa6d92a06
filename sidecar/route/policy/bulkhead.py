"""A route's bulkhead: at most ``max_concurrent_requests`` of its requests in flight.

The cluster's circuit breakers bound the whole cluster; a route that hangs could still take
all of it and starve the cluster's other routes. The bulkhead stops the route at its own limit
first: past it, its requests fail at once with 503 / UNAVAILABLE and flag ``RO`` while the
other routes of the same cluster keep their share.
"""

from __future__ import annotations

from sidecar.flags import ResponseFlag

OVERFLOW_FLAG = ResponseFlag.ROUTE_OVERFLOW
OVERFLOW_COUNTER = "downstream_rq_route_overflow"


class BulkheadSlot:
    """One request inside the bulkhead; ``release`` once it ends (again is harmless)."""

    __slots__ = ("_bulkhead",)

    def __init__(self, bulkhead: Bulkhead) -> None:
        self._bulkhead: Bulkhead | None = bulkhead

    def release(self) -> None:
        bulkhead, self._bulkhead = self._bulkhead, None
        if bulkhead is not None:
            bulkhead.active -= 1


class Bulkhead:
    __slots__ = ("active", "limit", "overflows")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        """May change under live requests (a config update): they stay counted."""
        self.active = 0
        self.overflows = 0

    def try_enter(self) -> BulkheadSlot | None:
        if self.active >= self.limit:
            self.overflows += 1
            return None
        self.active += 1
        return BulkheadSlot(self)
