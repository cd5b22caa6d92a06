"""The live state behind a route's policy, kept across config updates.

Config is frozen values; token buckets are not. The holder builds the state from config once
and, on an update, keeps whatever the new config did not change, so a config push does not
refill every bucket. The cluster's counterpart is ``sidecar.upstream.policy.resilience``.
"""

from __future__ import annotations

from pilotfish.config.route_policy import RoutePolicy
from sidecar.route.policy import Clock
from sidecar.route.policy.bulkhead import Bulkhead
from sidecar.route.policy.fallback import Fallback
from sidecar.route.policy.fault import FaultInjector
from sidecar.route.policy.ratelimit import LocalRateLimiter


class RoutePolicyRuntime:
    """One per route; ``rate_limiter``, ``faults``, ``fallback``, ``bulkhead``: None if unset."""

    __slots__ = ("_clock", "bulkhead", "fallback", "faults", "policy", "rate_limiter")

    def __init__(self, policy: RoutePolicy, clock: Clock) -> None:
        self._clock = clock
        self.policy = policy
        self.rate_limiter = (
            LocalRateLimiter(policy.rate_limit, clock) if policy.rate_limit is not None else None
        )
        self.faults = FaultInjector(policy.fault) if policy.fault is not None else None
        self.fallback = Fallback(policy.fallback) if policy.fallback is not None else None
        limit = policy.max_concurrent_requests
        self.bulkhead = Bulkhead(limit) if limit is not None else None

    def updated(self, policy: RoutePolicy) -> RoutePolicyRuntime:
        """A runtime for ``policy`` that keeps the rate-limit buckets if that part is unchanged,
        and the bulkhead's in-flight count under a new limit."""
        new = RoutePolicyRuntime(policy, self._clock)
        if policy.rate_limit == self.policy.rate_limit:
            new.rate_limiter = self.rate_limiter
        if new.bulkhead is not None and self.bulkhead is not None:
            self.bulkhead.limit = new.bulkhead.limit
            new.bulkhead = self.bulkhead
        return new
