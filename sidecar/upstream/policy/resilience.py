"""The live state behind a cluster's resilience policy, kept across config updates.

Config is frozen values; breaker counts and throttle windows are not. The holder builds the
state from config once and, on an update, keeps whatever the new config did not change, so a
config push does not forget every in-flight request.
"""

from __future__ import annotations

from collections import Counter

from pilotfish.config.route_policy import ClusterResilience
from sidecar.upstream.policy import Clock, RandomSource
from sidecar.upstream.policy.breaker import CircuitBreakers
from sidecar.upstream.policy.throttle import AdaptiveThrottle


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
