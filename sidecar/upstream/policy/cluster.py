"""One cluster's host choice with everything that narrows it: the seam for ``upstream.py``. Pure.

``ClusterBalancer`` owns a cluster's balancer, health checker and outlier detector, keeps the
balancer's host set equal to ``eligibility.balancer_hosts`` of their combined state, and
feeds request outcomes to both the balancer and the outlier detector. The I/O side calls:

- ``set_hosts`` on membership change (also ``HealthCheckRunner.set_hosts`` if checking),
- ``choose`` per attempt, then ``request_started`` / ``request_finished``,
- ``health_changed`` from the ``HealthCheckRunner``'s ``on_change``,
- ``evaluate_outliers`` at ``next_outlier_evaluation_at``,
- ``ramp`` at ``next_ramp_at`` while endpoints are in slow start.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Sequence

from pilotfish.config.cluster_policy import HealthCheckConfig, LbPolicy, OutlierDetectionConfig
from sidecar.upstream.policy.balancers import make_balancer
from sidecar.upstream.policy.eligibility import HostState, balancer_hosts, in_panic
from sidecar.upstream.policy.health import HealthChanged, HealthChecker
from sidecar.upstream.policy.lb import LbContext, LbHost, LoadBalancer
from sidecar.upstream.policy.outlier import OutlierDetector, OutlierEvent

RAMP_STEPS = 20  # weight updates per slow-start window
RAMP_SCALE = 100  # endpoint weights are multiplied by this under slow start, for resolution


class ClusterBalancer:
    def __init__(
        self,
        policy: LbPolicy,
        *,
        health_check: HealthCheckConfig | None = None,
        outlier_detection: OutlierDetectionConfig | None = None,
        clock: Callable[[], float],
        rng: random.Random,
        connections: Callable[[str], int] | None = None,
    ) -> None:
        self.policy = policy
        self.balancer: LoadBalancer = (
            make_balancer(policy, rng, clock, connections)
            if connections is not None
            else make_balancer(policy, rng, clock)
        )
        # Most balancers ignore the request hooks: then no request calls them.
        self.tracks_requests: bool = getattr(self.balancer, "tracks_requests", True)
        self.health_checker = (
            HealthChecker(health_check, clock, rng) if health_check is not None else None
        )
        self.outlier_detector = (
            OutlierDetector(outlier_detection, clock, rng)
            if outlier_detection is not None
            else None
        )
        # Read at the end of every request that leaves no sweep scheduled.
        self.sweeps_periodically = (
            self.outlier_detector is not None and self.outlier_detector.periodic
        )
        self.hosts: list[tuple[str, int]] = []
        self._index_of: dict[str, int] = {}
        self.eligible: list[LbHost] = []
        self._clock = clock
        # Slow start: when each endpoint still ramping joined. The first host set is not
        # ramped: there is nobody to take the load off it.
        self._joined: dict[str, float] = {}
        self._first_set = True

    def set_hosts(self, hosts: Sequence[tuple[str, int]]) -> None:
        """``(key, weight)`` per host; a host's index is its position here."""
        self.hosts = list(hosts)
        keys = [key for key, _ in hosts]
        if self.policy.slow_start is not None:
            now = self._clock()
            joined = {key: self._joined[key] for key in keys if key in self._joined}
            if not self._first_set:
                joined.update((key, now) for key in keys if key not in self._index_of)
            self._joined = joined
        self._first_set = False
        self._index_of = {key: index for index, key in enumerate(keys)}
        if self.health_checker is not None:
            self.health_checker.set_hosts(keys)
        if self.outlier_detector is not None:
            self.outlier_detector.set_hosts(keys)
        self._refresh(force=True)

    def states(self) -> list[HostState]:
        hc, od = self.health_checker, self.outlier_detector
        return [
            HostState(
                key,
                weight,
                health_check_ok=hc is None or hc.is_healthy(key),
                ejected=od is not None and od.is_ejected(key),
            )
            for key, weight in self.hosts
        ]

    @property
    def in_panic(self) -> bool:
        return in_panic(self.states(), self.policy.panic_threshold)

    @property
    def next_ramp_at(self) -> float | None:
        """When the weights of endpoints in slow start should next be raised."""
        slow = self.policy.slow_start
        if slow is None or not self._joined:
            return None
        return self._clock() + slow.window / RAMP_STEPS

    def ramp(self) -> None:
        """Raise the weights of the endpoints in slow start to where they are now."""
        slow = self.policy.slow_start
        if slow is None:
            return
        now = self._clock()
        self._joined = {k: t for k, t in self._joined.items() if now - t < slow.window}
        self._refresh()

    def _ramped(self, eligible: list[LbHost]) -> list[LbHost]:
        """Weights scaled by ``RAMP_SCALE`` (for resolution), and by the ramp while in it."""
        slow = self.policy.slow_start
        assert slow is not None
        now = self._clock()
        out = []
        for host in eligible:
            weight = host.weight * RAMP_SCALE
            joined = self._joined.get(host.key)
            if joined is not None:
                weight = max(1, round(weight * slow.factor(now - joined)))
            out.append(LbHost(host.index, host.key, weight))
        return out

    def _refresh(self, force: bool = False) -> None:
        eligible = balancer_hosts(self.states(), self.policy.panic_threshold)
        if self.policy.slow_start is not None:
            eligible = self._ramped(eligible)
        # Only on a real change: a new host set resets round robin and rebuilds hash tables.
        if force or eligible != self.eligible:
            self.eligible = eligible
            self.balancer.set_hosts(eligible)

    def choose(self, ctx: LbContext, exclude: Collection[int] = ()) -> int | None:
        return self.balancer.choose(ctx, exclude)

    def request_started(self, key: str) -> None:
        if not self.tracks_requests:
            return
        index = self._index_of.get(key)
        if index is not None:
            self.balancer.on_request_start(index)

    def request_finished(self, key: str, latency_s: float, status: int | None) -> bool:
        """``status`` is the upstream's, ``None`` for a failure of our own (connect, reset).
        True when this ejected the host.

        Hosts are named by key, not index: a membership change while the request was in
        flight may have given its index to another host, and the balancer's in-flight counts
        and the outlier detector must both see the host that served it.
        """
        if self.tracks_requests:
            index = self._index_of.get(key)
            if index is not None:
                ok = status is not None and status < 500
                self.balancer.on_request_end(index, latency_s, ok)
        od = self.outlier_detector
        if od is not None and od.report(key, status) is not None:
            self._refresh()
            return True
        return False

    def health_changed(self, event: HealthChanged) -> None:
        self._refresh()

    @property
    def next_outlier_evaluation_at(self) -> float | None:
        """None when a sweep would do nothing: a cluster with only the default local-origin
        detection and nothing ejected needs no timer (most clusters, most of the time)."""
        od = self.outlier_detector
        if od is None or not (od.periodic or od.has_state):
            return None
        return od.next_evaluation_at

    def evaluate_outliers(self) -> list[OutlierEvent]:
        if self.outlier_detector is None:
            return []
        events = self.outlier_detector.evaluate()
        if events:
            self._refresh()
        return events
