"""Load balancers: which eligible endpoint of a cluster takes the next request. Pure.

All share the interface of ``lb.LoadBalancer``; ``make_balancer`` builds the one a cluster's
``LbPolicy`` names. Randomness and time come in from the caller. The hashing balancers live
in ``hashing``.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from pilotfish.config.cluster_policy import LbKind, LbPolicy
from sidecar.upstream.policy.hashing import Maglev, RingHash
from sidecar.upstream.policy.lb import BalancerBase, LbContext, LbHost, LoadBalancer


class RoundRobin(BalancerBase):
    """Hosts in turn, weights ignored."""

    def __init__(self) -> None:
        super().__init__()
        self._next = 0

    def choose(self, ctx: LbContext, exclude: Collection[int] = ()) -> int | None:
        n = len(self.hosts)
        for step in range(n):
            host = self.hosts[(self._next + step) % n]
            if host.index not in exclude or step == n - 1:
                self._next = (self._next + step + 1) % n
                return host.index
        return None


class SmoothWeightedRoundRobin(BalancerBase):
    """nginx's smooth weighted round robin: exact shares over a cycle, heavy hosts spread out."""

    def __init__(self) -> None:
        super().__init__()
        self._current: dict[str, float] = {}
        self._weights: list[float] = []

    def _hosts_changed(self) -> None:
        # Scores only sum to zero (exact shares per cycle) when they all start together.
        self._current = {}
        self._weights = [h.weight for h in self.hosts]

    def choose(self, ctx: LbContext, exclude: Collection[int] = ()) -> int | None:
        candidates = self._candidates(exclude)
        if len(candidates) == 1:
            return candidates[0].index  # a round of one leaves its score at zero
        return self.pick_weighted(candidates, self._weights)

    def pick_weighted(self, candidates: Sequence[LbHost], weights: Sequence[float]) -> int | None:
        """One smooth round among ``candidates``; ``weights`` are per host of ``self.hosts``."""
        if not candidates:
            return None
        weight_of = {h.index: w for h, w in zip(self.hosts, weights, strict=True)}
        current = self._current
        total = 0.0
        best: LbHost | None = None
        for host in candidates:
            score = current.get(host.key, 0.0) + weight_of[host.index]
            current[host.key] = score
            total += weight_of[host.index]
            if best is None or score > current[best.key]:
                best = host
        assert best is not None
        current[best.key] -= total
        return best.index


class _ActiveRequests(BalancerBase):
    tracks_requests = True

    def __init__(self) -> None:
        super().__init__()
        self.active: dict[str, int] = {}

    def on_request_start(self, index: int) -> None:
        key = self._key_of.get(index)
        if key is not None:
            self.active[key] = self.active.get(key, 0) + 1

    def on_request_end(self, index: int, latency_s: float, ok: bool) -> None:
        key = self._key_of.get(index)
        if key is not None and self.active.get(key, 0) > 0:
            self.active[key] -= 1


class LeastConnections(BalancerBase):
    """The host with the fewest open connections per unit of weight (HAProxy's leastconn).

    Connections are counted by the caller's pools (``connections`` of a host key), so the
    balancer holds no count that could drift from them. Ties go round robin: a cold cluster,
    with no connection anywhere yet, spreads its first requests instead of piling on host 0.
    """

    def __init__(self, connections: Callable[[str], int]) -> None:
        super().__init__()
        self._connections = connections
        self._next = 0

    def choose(self, ctx: LbContext, exclude: Collection[int] = ()) -> int | None:
        candidates = self._candidates(exclude)
        n = len(candidates)
        if n == 0:
            return None
        best: LbHost | None = None
        best_load = math.inf
        for step in range(n):
            host = candidates[(self._next + step) % n]
            load = (self._connections(host.key) + 1) / max(host.weight, 1)
            if load < best_load:
                best, best_load = host, load
        self._next = (self._next + 1) % n
        assert best is not None
        return best.index


def _no_connections(key: str) -> int:
    return 0


def _sample(rng: random.Random, candidates: Sequence[LbHost], count: int) -> list[LbHost]:
    return rng.sample(list(candidates), min(count, len(candidates)))


class LeastRequest(_ActiveRequests):
    """Power of ``choice_count`` choices on active requests.

    With unequal weights it becomes Envoy's weighted form: smooth weighted round robin over the
    effective weights ``weight / (active + 1) ** bias``, so idle hosts share by weight and busy
    ones lose share in proportion to their load.
    """

    def __init__(self, rng: random.Random, choice_count: int = 2, bias: float = 1.0) -> None:
        super().__init__()
        self.rng = rng
        self.choice_count = choice_count
        self.bias = bias
        self._weighted = SmoothWeightedRoundRobin()
        self.weighted = False

    def _hosts_changed(self) -> None:
        self._weighted.set_hosts(self.hosts)
        self.weighted = len({h.weight for h in self.hosts}) > 1

    def choose(self, ctx: LbContext, exclude: Collection[int] = ()) -> int | None:
        candidates = self._candidates(exclude)
        if not candidates:
            return None
        if self.weighted:
            weights = [h.weight / (self.active.get(h.key, 0) + 1) ** self.bias for h in self.hosts]
            return self._weighted.pick_weighted(candidates, weights)
        sampled = _sample(self.rng, candidates, self.choice_count)
        return min(sampled, key=lambda h: self.active.get(h.key, 0)).index


@dataclass(slots=True)
class _Ewma:
    rtt: float
    at: float
    active: int = 0


class PeakEwma(BalancerBase):
    """Power of two choices on ``peak-EWMA latency * (active + 1) / weight`` (Finagle, linkerd).

    The average jumps to any slower sample at once and decays towards faster ones with time
    constant ``decay``; while a host gets no responses its estimate decays towards zero, so a
    host that was slow once is tried again. A failed request counts as at least
    ``failure_penalty`` seconds, or a host failing fast would attract all the traffic.
    """

    tracks_requests = True

    def __init__(
        self,
        rng: random.Random,
        clock: Callable[[], float],
        *,
        choice_count: int = 2,
        decay: float = 10.0,
        default_rtt: float = 0.030,
        failure_penalty: float = 1.0,
    ) -> None:
        super().__init__()
        self.rng = rng
        self.clock = clock
        self.choice_count = choice_count
        self.decay = decay
        self.default_rtt = default_rtt
        self.failure_penalty = failure_penalty
        self._stats: dict[str, _Ewma] = {}

    def _stat(self, key: str) -> _Ewma:
        stat = self._stats.get(key)
        if stat is None:
            stat = self._stats[key] = _Ewma(self.default_rtt, self.clock())
        return stat

    def _hosts_changed(self) -> None:
        keys = {h.key for h in self.hosts}
        # Keep hosts with requests in flight: they may come back, and their ends must count.
        self._stats = {k: s for k, s in self._stats.items() if k in keys or s.active}
        for key in keys:
            self._stat(key)

    def _decayed(self, stat: _Ewma, now: float) -> float:
        return stat.rtt * math.exp(-max(0.0, now - stat.at) / self.decay)

    def cost(self, host: LbHost) -> float:
        stat = self._stat(host.key)
        return self._decayed(stat, self.clock()) * (stat.active + 1) / host.weight

    def choose(self, ctx: LbContext, exclude: Collection[int] = ()) -> int | None:
        candidates = self._candidates(exclude)
        if not candidates:
            return None
        sampled = _sample(self.rng, candidates, self.choice_count)
        return min(sampled, key=self.cost).index

    def on_request_start(self, index: int) -> None:
        key = self._key_of.get(index)
        if key is not None:
            self._stat(key).active += 1

    def on_request_end(self, index: int, latency_s: float, ok: bool) -> None:
        key = self._key_of.get(index)
        if key is None:
            return
        stat = self._stat(key)
        stat.active = max(0, stat.active - 1)
        sample = latency_s if ok else max(latency_s, self.failure_penalty)
        now = self.clock()
        if sample > stat.rtt:
            stat.rtt = sample
        else:
            w = math.exp(-max(0.0, now - stat.at) / self.decay)
            stat.rtt = stat.rtt * w + sample * (1.0 - w)
        stat.at = now


class RandomChoice(BalancerBase):
    """Uniformly random, weights ignored."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self.rng = rng

    def choose(self, ctx: LbContext, exclude: Collection[int] = ()) -> int | None:
        candidates = self._candidates(exclude)
        return self.rng.choice(candidates).index if candidates else None


class WeightedRandom(BalancerBase):
    """Random with probability proportional to weight."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self.rng = rng
        self._cumulative: list[int] = []

    def _hosts_changed(self) -> None:
        self._cumulative = _cumulative(self.hosts)

    def choose(self, ctx: LbContext, exclude: Collection[int] = ()) -> int | None:
        candidates = self._candidates(exclude)
        if not candidates:
            return None
        cumulative = self._cumulative if candidates is self.hosts else _cumulative(candidates)
        point = self.rng.random() * cumulative[-1]
        return candidates[bisect.bisect_right(cumulative, point)].index


def _cumulative(hosts: Sequence[LbHost]) -> list[int]:
    total = 0
    out: list[int] = []
    for host in hosts:
        total += host.weight
        out.append(total)
    return out


def make_balancer(
    policy: LbPolicy,
    rng: random.Random,
    clock: Callable[[], float],
    connections: Callable[[str], int] = _no_connections,
) -> LoadBalancer:
    """The balancer for ``policy``, still without hosts: call ``set_hosts`` next.

    ``connections``: open connections to a host (by key), for ``least_connections``."""
    kind = policy.kind
    if kind is LbKind.ROUND_ROBIN:
        return RoundRobin()
    if kind is LbKind.WEIGHTED_ROUND_ROBIN:
        return SmoothWeightedRoundRobin()
    if kind is LbKind.LEAST_REQUEST:
        return LeastRequest(rng, policy.choice_count, policy.active_request_bias)
    if kind is LbKind.LEAST_CONNECTIONS:
        return LeastConnections(connections)
    if kind is LbKind.PEAK_EWMA:
        return PeakEwma(
            rng,
            clock,
            choice_count=policy.choice_count,
            decay=policy.ewma_decay,
            default_rtt=policy.ewma_default_rtt,
        )
    if kind is LbKind.RANDOM:
        return RandomChoice(rng)
    if kind is LbKind.WEIGHTED_RANDOM:
        return WeightedRandom(rng)
    if kind is LbKind.RING_HASH:
        return RingHash(
            rng,
            policy.hash_on,
            policy.hash_key,
            policy.minimum_ring_size,
            policy.maximum_ring_size,
        )
    return Maglev(rng, policy.hash_on, policy.hash_key, policy.maglev_table_size)
