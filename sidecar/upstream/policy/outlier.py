"""Outlier detection (passive health checking), as Envoy does it. Pure.

The router reports each upstream response with ``report(key, status)``; ``status=None`` is a
failure of our own making (connect failure, reset, timeout). With
``split_external_local_origin_errors`` (our default) those count only towards
``consecutive_local_origin_failure``; without it they count as a 503. Consecutive
5xx and consecutive gateway failures (502, 503, 504, connect failures) eject inline. Every
``interval`` the owner calls ``evaluate()``, which

1. returns hosts whose ejection time is over (ejection time = ``base_ejection_time`` times
   the host's ejection count, at most ``max_ejection_time``; the count drops by one for every
   sweep the host spends in service, so a host that recovered for good returns to the base),
2. ejects hosts whose success rate this interval fell below ``mean - factor * stdev`` of the
   hosts with enough requests, if enough hosts have enough requests,
3. ejects hosts whose failure percentage this interval is at ``failure_percentage_threshold``
   or above, under the same kind of volume rules,
4. starts a new interval.

Each detection ejects with probability ``enforcing_*`` percent, and only while the ejected
share is below ``max_ejection_percent``. Events say what changed; the cluster then
recomputes its eligible hosts.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pilotfish.config.cluster_policy import OutlierDetectionConfig

GATEWAY_FAILURES = frozenset({502, 503, 504})


class EjectionReason(enum.Enum):
    CONSECUTIVE_5XX = "consecutive_5xx"
    CONSECUTIVE_GATEWAY_FAILURE = "consecutive_gateway_failure"
    SUCCESS_RATE = "success_rate"
    FAILURE_PERCENTAGE = "failure_percentage"
    CONSECUTIVE_LOCAL_ORIGIN_FAILURE = "consecutive_local_origin_failure"


@dataclass(frozen=True, slots=True, kw_only=True)
class HostEjected:
    key: str
    reason: EjectionReason
    until: float


@dataclass(frozen=True, slots=True, kw_only=True)
class HostUnejected:
    key: str


OutlierEvent = HostEjected | HostUnejected


@dataclass(slots=True)
class HostMonitor:
    consecutive_5xx: int = 0
    consecutive_gateway_failures: int = 0
    consecutive_local_origin_failures: int = 0
    # Counts of the current interval, for success rate and failure percentage.
    successes: int = 0
    failures: int = 0
    ejected_until: float | None = None
    ejection_count: int = 0

    @property
    def ejected(self) -> bool:
        return self.ejected_until is not None

    @property
    def requests(self) -> int:
        return self.successes + self.failures


class OutlierDetector:
    """The outlier state of one cluster's hosts, keyed by address."""

    def __init__(
        self, config: OutlierDetectionConfig, clock: Callable[[], float], rng: random.Random
    ) -> None:
        self.config = config
        self.clock = clock
        self.rng = rng
        self.hosts: dict[str, HostMonitor] = {}
        self.next_evaluation_at = clock() + config.interval
        # Whether sweeps judge rates (success rate, failure percentage), so must always run;
        # only then does a success count for anything but ending a run of failures.
        self.periodic = config.enforcing_success_rate > 0 or config.enforcing_failure_percentage > 0
        # The hosts that may be in a run of failures (a superset: a success clears a host's
        # runs, unless it is ejected). A success changes nothing for any other host, and most
        # responses are successes from such hosts: they cost one set lookup.
        self.failing: set[str] = set()

    def set_hosts(self, keys: Iterable[str]) -> None:
        """Hosts that stay keep their counters and ejection; new ones start in service."""
        self.hosts = {key: self.hosts.get(key) or HostMonitor() for key in keys}

    def is_ejected(self, key: str) -> bool:
        monitor = self.hosts.get(key)
        return monitor is not None and monitor.ejected

    @property
    def has_state(self) -> bool:
        """Whether a sweep has an ejection to end or an ejection count to decay."""
        return any(m.ejected or m.ejection_count for m in self.hosts.values())

    @property
    def ejected_count(self) -> int:
        return sum(1 for m in self.hosts.values() if m.ejected)

    def report(self, key: str, status: int | None) -> HostEjected | None:
        """One response (``None``: a local failure such as a refused connection)."""
        if status is not None and status < 500:
            # The common case, kept short: an answer ends every run of failures.
            if self.periodic or key in self.failing:
                self._success(key)
            return None
        monitor = self.hosts.get(key)
        if monitor is None:
            return None
        monitor.failures += 1
        if monitor.ejected:
            # Requests still reach it in panic mode; they must not stack up new ejections.
            return None
        self.failing.add(key)
        config = self.config
        if config.split_external_local_origin_errors:
            if status is None:
                # Ours, not the host's answer: counted apart (Envoy's split mode).
                monitor.consecutive_local_origin_failures += 1
                if (
                    monitor.consecutive_local_origin_failures
                    == config.consecutive_local_origin_failure
                ):
                    return self._eject(
                        key,
                        EjectionReason.CONSECUTIVE_LOCAL_ORIGIN_FAILURE,
                        config.enforcing_consecutive_local_origin_failure,
                    )
                return None
            monitor.consecutive_local_origin_failures = 0  # it answered, with a 5xx
        monitor.consecutive_5xx += 1
        if status is None or status in GATEWAY_FAILURES:
            monitor.consecutive_gateway_failures += 1
        else:
            monitor.consecutive_gateway_failures = 0
        # ``==``, not ``>=``: one detection per run of failures, enforced or not.
        if monitor.consecutive_gateway_failures == config.consecutive_gateway_failure:
            ejected = self._eject(
                key,
                EjectionReason.CONSECUTIVE_GATEWAY_FAILURE,
                config.enforcing_consecutive_gateway_failure,
            )
            if ejected is not None:
                return ejected
        if monitor.consecutive_5xx == config.consecutive_5xx:
            return self._eject(
                key, EjectionReason.CONSECUTIVE_5XX, config.enforcing_consecutive_5xx
            )
        return None

    def _success(self, key: str) -> None:
        monitor = self.hosts.get(key)
        if monitor is None:
            self.failing.discard(key)  # a late response from a departed host
            return
        if self.periodic:
            monitor.successes += 1
        if not monitor.ejected:
            monitor.consecutive_5xx = 0
            monitor.consecutive_gateway_failures = 0
            monitor.consecutive_local_origin_failures = 0
            self.failing.discard(key)

    def evaluate(self) -> list[OutlierEvent]:
        """The interval sweep; call it at ``next_evaluation_at``."""
        now = self.clock()
        events: list[OutlierEvent] = []
        for key, monitor in self.hosts.items():
            if monitor.ejected_until is None:
                monitor.ejection_count = max(0, monitor.ejection_count - 1)
            elif now >= monitor.ejected_until:
                monitor.ejected_until = None
                monitor.consecutive_5xx = 0
                monitor.consecutive_gateway_failures = 0
                monitor.consecutive_local_origin_failures = 0
                events.append(HostUnejected(key=key))
        events.extend(self._success_rate_ejections())
        events.extend(self._failure_percentage_ejections())
        for monitor in self.hosts.values():
            monitor.successes = monitor.failures = 0
        self.next_evaluation_at = now + self.config.interval
        return events

    def _in_service_with_volume(self, volume: int) -> list[tuple[str, HostMonitor]]:
        return [(key, m) for key, m in self.hosts.items() if not m.ejected and m.requests >= volume]

    def _success_rate_ejections(self) -> list[HostEjected]:
        config = self.config
        candidates = self._in_service_with_volume(config.success_rate_request_volume)
        if len(candidates) < config.success_rate_minimum_hosts:
            return []
        # Here, not at the top: statistics brings fractions and decimal (0.8 MB resident) into
        # every sidecar, and only success-rate detection with enough hosts reaches this line.
        import statistics

        rates = [m.successes / m.requests for _, m in candidates]
        mean = statistics.fmean(rates)
        threshold = mean - config.success_rate_stdev_factor / 1000.0 * statistics.pstdev(rates)
        events = []
        for (key, _), rate in zip(candidates, rates, strict=True):
            if rate < threshold:
                ejected = self._eject(
                    key, EjectionReason.SUCCESS_RATE, config.enforcing_success_rate
                )
                if ejected is not None:
                    events.append(ejected)
        return events

    def _failure_percentage_ejections(self) -> list[HostEjected]:
        config = self.config
        candidates = self._in_service_with_volume(config.failure_percentage_request_volume)
        if len(candidates) < config.failure_percentage_minimum_hosts:
            return []
        events = []
        for key, monitor in candidates:
            if 100 * monitor.failures >= config.failure_percentage_threshold * monitor.requests:
                ejected = self._eject(
                    key, EjectionReason.FAILURE_PERCENTAGE, config.enforcing_failure_percentage
                )
                if ejected is not None:
                    events.append(ejected)
        return events

    def _eject(self, key: str, reason: EjectionReason, enforcing: int) -> HostEjected | None:
        monitor = self.hosts[key]
        if monitor.ejected or enforcing <= 0:
            return None
        if enforcing < 100 and self.rng.randrange(100) >= enforcing:
            return None
        # Stop once the share is reached, not before it would be passed: one host can always
        # be ejected, and the share may end one host above the limit (as Envoy and gRPC do).
        if 100 * self.ejected_count >= self.config.max_ejection_percent * len(self.hosts):
            return None
        config = self.config
        # Past the cap more ejections change nothing but the time it takes to come back down.
        cap = math.ceil(config.max_ejection_time / config.base_ejection_time)
        monitor.ejection_count = min(monitor.ejection_count + 1, cap)
        duration = min(config.base_ejection_time * monitor.ejection_count, config.max_ejection_time)
        monitor.ejected_until = self.clock() + duration
        monitor.consecutive_5xx = 0
        monitor.consecutive_gateway_failures = 0
        return HostEjected(key=key, reason=reason, until=monitor.ejected_until)
