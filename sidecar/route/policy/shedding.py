"""Adaptive inbound load shedding, after the idea of Kratos' BBR limiter.

Little's law gives the concurrency the service sustains at its best: the highest throughput
seen (``max_pass`` requests in one bucket, times buckets per second) times the lowest latency
seen (``min_rt``, the lowest per-bucket mean). While the CPU is busy past the threshold, a
request arriving when more than that many are already in flight is shed (503 / UNAVAILABLE), so
the queue stops growing instead of every request getting slower. After a shed the limit stays
in force for ``cool_down`` even if the CPU dips, so it does not flap; then it lifts by itself.

Only completed buckets count (the current one is still filling). The CPU reading is fed in by
the I/O side (``record_cpu``, a fraction 0..1, e.g. from /proc/stat or psutil every ~250 ms)
and smoothed here by an EWMA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pilotfish.config.route_policy import LoadSheddingConfig
from sidecar.route.policy import Clock
from sidecar.route.policy.reply import LocalReply

HTTP_STATUS = 503
GRPC_STATUS = 14  # UNAVAILABLE: the caller may retry elsewhere
RESPONSE_FLAG_CODE = "OM"
"""Envoy's flag for overload-manager rejections: the lead adds it to ``ResponseFlag``."""
SHED_REPLY = LocalReply(
    http_status=HTTP_STATUS,
    grpc_status=GRPC_STATUS,
    message="overloaded: request shed",
    flag_code=RESPONSE_FLAG_CODE,
)


@dataclass(frozen=True, slots=True)
class ShedStats:
    cpu: float
    in_flight: int
    max_pass: int
    min_rt: float
    max_in_flight: int
    cooling_down: bool
    admitted_total: int
    shed_total: int


class InFlight:
    """One admitted request; call ``done`` when it ends (any way; twice is harmless)."""

    __slots__ = ("_shedder", "started")

    def __init__(self, shedder: LoadShedder, started: float) -> None:
        self._shedder: LoadShedder | None = shedder
        self.started = started

    def done(self) -> None:
        shedder, self._shedder = self._shedder, None
        if shedder is not None:
            shedder._completed(self.started)


class LoadShedder:
    """One per inbound listener (or service)."""

    def __init__(self, config: LoadSheddingConfig, clock: Clock) -> None:
        self.config = config
        self._clock = clock
        self._width = config.window / config.buckets
        self._bucket_ids = [-1] * config.buckets
        self._passes = [0] * config.buckets
        self._rt_sums = [0.0] * config.buckets
        self.cpu = 0.0
        self.in_flight = 0
        self._last_shed: float | None = None
        self.admitted_total = 0
        self.shed_total = 0

    def record_cpu(self, usage: float) -> None:
        """A CPU usage sample, 0..1 (of the CPUs the process may use)."""
        decay = self.config.cpu_decay
        self.cpu = self.cpu * decay + min(max(usage, 0.0), 1.0) * (1.0 - decay)

    def try_admit(self) -> InFlight | None:
        """An ``InFlight`` to finish later, or None: shed this request."""
        now = self._clock()
        if self.config.enabled and self._should_shed(now):
            self.shed_total += 1
            return None
        self.in_flight += 1
        self.admitted_total += 1
        return InFlight(self, now)

    def _should_shed(self, now: float) -> bool:
        if self.cpu <= self.config.cpu_threshold:
            if self._last_shed is None:
                return False
            if now - self._last_shed <= self.config.cool_down:
                return self.in_flight > self.max_in_flight(now)
            self._last_shed = None
            return False
        shed = self.in_flight > self.max_in_flight(now)
        if shed:
            self._last_shed = now
        return shed

    def _completed(self, started: float) -> None:
        now = self._clock()
        self.in_flight -= 1
        bucket = math.floor(now / self._width)
        slot = bucket % self.config.buckets
        if self._bucket_ids[slot] != bucket:
            self._bucket_ids[slot] = bucket
            self._passes[slot] = 0
            self._rt_sums[slot] = 0.0
        self._passes[slot] += 1
        self._rt_sums[slot] += max(0.0, now - started)

    def _full_buckets(self, now: float) -> list[int]:
        current = math.floor(now / self._width)
        oldest = current - self.config.buckets
        return [
            slot
            for slot, bucket in enumerate(self._bucket_ids)
            if oldest < bucket < current and self._passes[slot]
        ]

    def max_in_flight(self, now: float) -> int:
        """The sustainable concurrency: max_pass * min_rt * buckets per second, at least 1."""
        slots = self._full_buckets(now)
        if not slots:
            return 1
        max_pass = max(self._passes[s] for s in slots)
        min_rt = min(self._rt_sums[s] / self._passes[s] for s in slots)
        # Rounded first so that 100 requests x 0.05 s is 5, not 6 through float error.
        return max(1, math.ceil(round(max_pass * min_rt / self._width, 6)))

    def stats(self) -> ShedStats:
        now = self._clock()
        slots = self._full_buckets(now)
        return ShedStats(
            cpu=self.cpu,
            in_flight=self.in_flight,
            max_pass=max((self._passes[s] for s in slots), default=0),
            min_rt=min((self._rt_sums[s] / self._passes[s] for s in slots), default=0.0),
            max_in_flight=self.max_in_flight(now),
            cooling_down=self._last_shed is not None
            and now - self._last_shed <= self.config.cool_down,
            admitted_total=self.admitted_total,
            shed_total=self.shed_total,
        )
