"""The live state behind a route's and a cluster's policy, kept across config updates.

Config is frozen values; token buckets, breaker counts and throttle windows are not. These two
holders build the state from config once and, on an update, keep whatever the new config did
not change, so a config push does not refill every bucket or forget every in-flight request.
"""

from __future__ import annotations

from collections import Counter

from pilotfish.config.route_policy import ClusterResilience, RoutePolicy
from sidecar.route.policy import Clock, RandomSource
from sidecar.route.policy.breaker import CircuitBreakers
from sidecar.route.policy.bulkhead import Bulkhead
from sidecar.route.policy.fallback import Fallback
from sidecar.route.policy.fault import FaultInjector
from sidecar.route.policy.ratelimit import LocalRateLimiter
from sidecar.route.policy.throttle import AdaptiveThrottle


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


class ClusterResilienceRuntime:
    """One per cluster: its circuit breakers (with the retry budget) and client throttle."""

    __slots__ = ("_clock", "_random", "breakers", "policy", "throttle")

    def __init__(
        self,
        policy: ClusterResilience,
        clock: Clock,
        random: RandomSource,
        counters: Counter[str] | None = None,
    ) -> None:
        """``counters``: the cluster's ``Scope.counters``, for the overflow counters."""
        self._clock = clock
        self._random = random
        self.policy = policy
        self.breakers = CircuitBreakers(policy.circuit_breakers, policy.retry_budget, counters)
        self.throttle = (
            AdaptiveThrottle(policy.adaptive_throttling, clock, random)
            if policy.adaptive_throttling.enabled
            else None
        )

    def update(self, policy: ClusterResilience) -> None:
        """Take new limits in place: in-flight counts survive, the throttle window too if its
        config is unchanged."""
        self.breakers.update(policy.circuit_breakers, policy.retry_budget)
        if policy.adaptive_throttling != self.policy.adaptive_throttling:
            self.throttle = (
                AdaptiveThrottle(policy.adaptive_throttling, self._clock, self._random)
                if policy.adaptive_throttling.enabled
                else None
            )
        self.policy = policy
