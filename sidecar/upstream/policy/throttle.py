"""Client-side adaptive throttling, as in the Google SRE book ("Handling Overload").

Over a sliding window the client counts ``requests`` (everything the application tried,
including what was rejected here) and ``accepts`` (what the backend answered with anything but
an overload signal). A new request is rejected locally with probability

    min(max_rejection_probability, max(0, (requests - k * accepts) / (requests + 1)))

so a healthy backend (accepts ≈ requests) sees no throttling, and a backend rejecting most work
stops receiving most of it: the rejections cost the client nothing to make. Rejected requests
still count as requests, which keeps some traffic probing the backend, and recovery comes as
accepts grow back. One throttle per upstream cluster; count every try (retries included).

Uncapped, the probability tends to requests / (requests + 1) during an outage, so almost nothing
probes the recovered backend and the accepts that would lower it trickle in: with a 2-minute
window half the calls were admitted again only minutes after recovery. The cap (80% by default,
as Envoy's admission control) keeps a fifth of the traffic flowing, and the short default window
(5 s) forgets the outage soon after it ends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pilotfish.config.route_policy import AdaptiveThrottlingConfig
from sidecar.upstream.policy import Clock, RandomSource


def reject_probability(requests: int, accepts: int, k: float, cap: float = 1.0) -> float:
    return min(cap, max(0.0, (requests - k * accepts) / (requests + 1)))


@dataclass(frozen=True, slots=True)
class ThrottleStats:
    requests: int
    accepts: int
    reject_probability: float
    rejected_total: int


class AdaptiveThrottle:
    def __init__(
        self, config: AdaptiveThrottlingConfig, clock: Clock, random: RandomSource
    ) -> None:
        self.config = config
        self._clock = clock
        self._random = random
        self._width = config.window / config.buckets
        self._bucket_ids = [-1] * config.buckets
        self._requests = [0] * config.buckets
        self._accepts = [0] * config.buckets
        self.rejected_total = 0

    def _slot(self, now: float) -> int:
        bucket = math.floor(now / self._width)
        slot = bucket % self.config.buckets
        if self._bucket_ids[slot] != bucket:
            self._bucket_ids[slot] = bucket
            self._requests[slot] = 0
            self._accepts[slot] = 0
        return slot

    def _totals(self, now: float) -> tuple[int, int]:
        current = math.floor(now / self._width)
        oldest = current - self.config.buckets
        requests = accepts = 0
        for slot, bucket in enumerate(self._bucket_ids):
            if oldest < bucket <= current:
                requests += self._requests[slot]
                accepts += self._accepts[slot]
        return requests, accepts

    def probability(self) -> float:
        """The chance that the next request is rejected here."""
        requests, accepts = self._totals(self._clock())
        if not self.config.enabled or requests < self.config.min_requests:
            return 0.0
        return reject_probability(
            requests, accepts, self.config.k, self.config.max_rejection_probability
        )

    def try_admit(self) -> bool:
        """Count one request; False: reject it locally (503 / UNAVAILABLE)."""
        p = self.probability()
        self._requests[self._slot(self._clock())] += 1
        if p > 0.0 and self._random() < p:
            self.rejected_total += 1
            return False
        return True

    def record(self, accepted: bool) -> None:
        """The result of an admitted request: whether the backend took it (``Outcome.accepted``:
        it answered, and not with an overload signal)."""
        if accepted:
            self._accepts[self._slot(self._clock())] += 1

    def stats(self) -> ThrottleStats:
        requests, accepts = self._totals(self._clock())
        return ThrottleStats(requests, accepts, self.probability(), self.rejected_total)
