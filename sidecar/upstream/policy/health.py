"""Active health checking state per host: when to check next, and what a result changes. Pure.

The I/O side (``health_probes.HealthCheckRunner``) asks ``next_check_at(key)``, runs a probe
with ``config.timeout`` and reports ``result(key, ok, now)``. A result that changes a host's
state returns ``HostBecameHealthy`` or ``HostBecameUnhealthy``: the cluster then recomputes
its eligible hosts (``eligibility``) and hands them to its balancer.

A healthy host goes out after ``unhealthy_threshold`` consecutive failures; an unhealthy one
comes back after ``healthy_threshold`` consecutive successes. A host never checked starts in
``initially_healthy`` and is checked at once; its first result decides its state at once, as
in Envoy, so a new endpoint takes traffic after one good probe.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pilotfish.config.cluster_policy import HealthCheckConfig


@dataclass(frozen=True, slots=True, kw_only=True)
class HostBecameHealthy:
    key: str


@dataclass(frozen=True, slots=True, kw_only=True)
class HostBecameUnhealthy:
    key: str


HealthChanged = HostBecameHealthy | HostBecameUnhealthy


@dataclass(slots=True)
class HostHealth:
    healthy: bool
    next_check_at: float
    checked: bool = False
    consecutive_successes: int = 0
    consecutive_failures: int = 0


class HealthChecker:
    """The health check state of one cluster's hosts, keyed by address."""

    def __init__(
        self, config: HealthCheckConfig, clock: Callable[[], float], rng: random.Random
    ) -> None:
        self.config = config
        self.clock = clock
        self.rng = rng
        self.hosts: dict[str, HostHealth] = {}

    def set_hosts(self, keys: Iterable[str]) -> None:
        """Hosts that stay keep their state; new ones start fresh and are due now."""
        now = self.clock()
        self.hosts = {
            key: self.hosts.get(key) or HostHealth(self.config.initially_healthy, now)
            for key in keys
        }

    def is_healthy(self, key: str) -> bool:
        host = self.hosts.get(key)
        return host is not None and host.healthy

    def next_check_at(self, key: str) -> float:
        return self.hosts[key].next_check_at

    def next_due(self) -> float | None:
        """When the earliest check is due, for a driver that runs a single timer."""
        return min((h.next_check_at for h in self.hosts.values()), default=None)

    def due(self, now: float) -> list[str]:
        return [key for key, h in self.hosts.items() if h.next_check_at <= now]

    def result(self, key: str, ok: bool, now: float) -> HealthChanged | None:
        """Record one probe's outcome; a host gone meanwhile is ignored."""
        host = self.hosts.get(key)
        if host is None:
            return None
        was_healthy = host.healthy
        if ok:
            host.consecutive_successes += 1
            host.consecutive_failures = 0
            if not host.checked or host.consecutive_successes >= self.config.healthy_threshold:
                host.healthy = True
        else:
            host.consecutive_failures += 1
            host.consecutive_successes = 0
            if not host.checked or host.consecutive_failures >= self.config.unhealthy_threshold:
                host.healthy = False
        host.checked = True
        host.next_check_at = now + self._interval(host.healthy)
        if host.healthy == was_healthy:
            return None
        return HostBecameHealthy(key=key) if host.healthy else HostBecameUnhealthy(key=key)

    def _interval(self, healthy: bool) -> float:
        config = self.config
        base = config.interval if healthy else (config.unhealthy_interval or config.interval)
        jitter = self.rng.uniform(0.0, config.interval_jitter) if config.interval_jitter else 0.0
        return base + jitter
