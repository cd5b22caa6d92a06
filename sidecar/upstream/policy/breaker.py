"""Circuit breakers per cluster, with Envoy's meaning: limits on concurrency, not error rates.

Four resources are counted: connections, pending requests (waiting for a connection or a
stream), active requests, and active retries. Going past a limit fails the request at once
with 503 / UNAVAILABLE and flag UO (``OVERFLOW_FLAG``) instead of queueing it: a slow upstream
then costs callers a fast error, not a pile of waiting requests. Each successful acquisition is
a ``Permit``; release it exactly when the thing it counts ends (releasing twice is harmless,
so every way a request can end may release it).
"""

from __future__ import annotations

from collections import Counter

from pilotfish.config.route_policy import CircuitBreakerConfig, RetryBudgetConfig
from sidecar.flags import ResponseFlag
from sidecar.upstream.policy.budget import RetryBudget
from sidecar.upstream.policy.resource import Resource as Resource  # re-exported

OVERFLOW_FLAG = ResponseFlag.UPSTREAM_OVERFLOW
_DEFAULT_LIMITS = CircuitBreakerConfig()
_DEFAULT_BUDGET = RetryBudgetConfig()


_PENDING = Resource.PENDING
_REQUESTS = Resource.REQUESTS
assert (_PENDING.index, _REQUESTS.index) == (1, 2)


class Permit:
    """One unit of a resource; ``release`` gives it back (once, however often it is called)."""

    __slots__ = ("_breakers", "resource")

    def __init__(self, breakers: CircuitBreakers, resource: Resource) -> None:
        self._breakers: CircuitBreakers | None = breakers
        self.resource = resource

    @property
    def released(self) -> bool:
        return self._breakers is None

    def release(self) -> None:
        breakers, self._breakers = self._breakers, None
        if breakers is not None:
            breakers._active[self.resource.index] -= 1


class CircuitBreakers:
    """The limits of one cluster. Keep one across config updates (``update``): counts persist."""

    __slots__ = ("_active", "_budget", "config", "counters")

    def __init__(
        self,
        config: CircuitBreakerConfig = _DEFAULT_LIMITS,
        retry_budget: RetryBudgetConfig | None = _DEFAULT_BUDGET,
        counters: Counter[str] | None = None,
    ) -> None:
        """``counters``: where overflow counts go, e.g. the cluster's ``Scope.counters``."""
        self.config = config
        self._budget = RetryBudget(retry_budget) if retry_budget is not None else None
        self.counters: Counter[str] = counters if counters is not None else Counter()
        self._active = [0] * len(Resource)

    def update(self, config: CircuitBreakerConfig, retry_budget: RetryBudgetConfig | None) -> None:
        """New limits; what is in flight stays counted (a lowered limit only stops new work)."""
        self.config = config
        self._budget = RetryBudget(retry_budget) if retry_budget is not None else None

    def active(self, resource: Resource) -> int:
        return self._active[resource.index]

    def limit(self, resource: Resource) -> int:
        config = self.config
        if resource is Resource.CONNECTIONS:
            return config.max_connections
        if resource is Resource.PENDING:
            return config.max_pending_requests
        if resource is Resource.REQUESTS:
            return config.max_requests
        if self._budget is not None:
            busy = self._active[Resource.REQUESTS.index] + self._active[Resource.PENDING.index]
            return self._budget.max_active_retries(busy)
        return config.max_retries

    def remaining(self, resource: Resource) -> int:
        return max(0, self.limit(resource) - self._active[resource.index])

    def is_open(self, resource: Resource) -> bool:
        """Open (Envoy's word): the next acquisition of ``resource`` would fail."""
        return self._active[resource.index] >= self.limit(resource)

    def try_acquire(self, resource: Resource) -> Permit | None:
        """A permit, or None on overflow (counted in ``counters``)."""
        if self._active[resource.index] >= self.limit(resource):
            self.counters[resource.overflow_counter] += 1
            return None
        self._active[resource.index] += 1
        return Permit(self, resource)

    def try_acquire_connection(self) -> Permit | None:
        return self.try_acquire(Resource.CONNECTIONS)

    # Every request takes these two, so they skip ``try_acquire``'s general lookup.
    def try_acquire_pending(self) -> Permit | None:
        active = self._active
        if active[1] >= self.config.max_pending_requests:
            self.counters[Resource.PENDING.overflow_counter] += 1
            return None
        active[1] += 1
        return Permit(self, _PENDING)

    def try_acquire_request(self) -> Permit | None:
        active = self._active
        if active[2] >= self.config.max_requests:
            self.counters[Resource.REQUESTS.overflow_counter] += 1
            return None
        active[2] += 1
        return Permit(self, _REQUESTS)

    # The request path's form of the two above: a count, and no permit to allocate. The caller
    # keeps track of what it holds and gives it back exactly once.
    def try_pending(self) -> bool:
        """Take a pending-request slot (False: overflow, counted); ``release_pending`` it."""
        active = self._active
        if active[1] >= self.config.max_pending_requests:
            self.counters[Resource.PENDING.overflow_counter] += 1
            return False
        active[1] += 1
        return True

    def release_pending(self) -> None:
        self._active[1] -= 1

    def try_request(self) -> bool:
        """Take an active-request slot (False: overflow, counted); ``release_request`` it."""
        active = self._active
        if active[2] >= self.config.max_requests:
            self.counters[Resource.REQUESTS.overflow_counter] += 1
            return False
        active[2] += 1
        return True

    def release_request(self) -> None:
        self._active[2] -= 1

    def try_acquire_retry(self) -> Permit | None:
        """For ``RetryState.should_retry(admit=...)``; release when the retried try ends."""
        return self.try_acquire(Resource.RETRIES)

    def gauges(self) -> dict[str, int]:
        """Envoy's ``circuit_breakers.default.*`` gauges: open flags and remaining capacity."""
        out: dict[str, int] = {}
        for resource in Resource:
            out[f"circuit_breakers.default.{resource.open_gauge}"] = int(self.is_open(resource))
            out[f"circuit_breakers.default.{resource.remaining_gauge}"] = self.remaining(resource)
        return out
