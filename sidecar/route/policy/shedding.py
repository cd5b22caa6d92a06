"""Inbound load shedding on the app's saturation, as the sidecar sees it from the outside.

The sidecar in front of an app sees every request the app serves: when each started, when it
ended. From that, as BBR does for a network path, it estimates what the app sustains at its
best: the highest delivery rate (completions per second, over completed buckets of the
window) times the lowest latency (``min_rt``, the lowest per-bucket mean) is the concurrency
the app serves without queueing (Little's law). Past that, more in flight only waits.

The app is *saturated* when its requests queue: every call that completed over the last
``queue_interval`` took longer than ``min_rt`` plus ``max(max_queue_delay, min_rt)`` (a
standing queue, as CoDel tells one from a burst: one slow call, or a stall of the whole machine
that delays the calls in flight and is over, is not saturation); or, when the pod's cgroup v2
is given (``cgroup``), its CPU use is past ``cpu_threshold`` of its quota. While saturated, a
request arriving with the limit already in flight is shed: answered at once, so the queue
stops growing instead of every request getting slower. The limit is twice the estimate, and
never under ``min_concurrency``: an estimate taken while traffic was light says little of what
the app can do. After a shed the limit stays in force for ``cool_down`` even if the signals
calm down (shedding itself calms them), then lifts.

The sidecar's own CPU is no signal: it is busy relaying, not serving. A shed request never
reached the app: the reply says so (``x-pilotfish-overloaded``), so a caller's sidecar can retry
it on another host, and it carries a retry hint (``retry-after`` / ``grpc-retry-pushback-ms``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pilotfish.config.route_policy import LoadSheddingConfig
from sidecar.flags import ResponseFlag
from sidecar.route.policy import Clock
from sidecar.route.policy.reply import LocalReply

OVERLOADED_HEADER = b"x-pilotfish-overloaded"
"""On a shed reply: the request was not processed (Envoy says ``x-envoy-overloaded``)."""
HEADROOM = 2.0
"""The limit is this times the estimate, as BBR's congestion window is twice the path's: with
exactly the estimate in flight an app idles between a reply and the next call, the delivery
rate measured then is lower, and an estimate fed by its own limit only shrinks. Twice keeps
the app busy with at most about one service time of queue."""
LATENCY_EWMA_WEIGHT = 0.1
"""Weight of each completion in the recent latency: about the last ten requests."""


def shed_reply(config: LoadSheddingConfig) -> LocalReply:
    """503 for HTTP, RESOURCE_EXHAUSTED for gRPC, flag OM, and when to come back."""
    flag = ResponseFlag.OVERLOAD_SHED
    hint = max(1, math.ceil(config.cool_down))
    return LocalReply(
        http_status=flag.http_status,
        grpc_status=int(flag.grpc_status),
        message=flag.message,
        flag_code=flag.code,
        extra_headers=(
            (OVERLOADED_HEADER, b"true"),
            (b"retry-after", str(hint).encode()),
            (b"grpc-retry-pushback-ms", str(hint * 1000).encode()),
        ),
    )


@dataclass(frozen=True, slots=True)
class ShedStats:
    cpu: float | None
    in_flight: int
    max_rate: float
    min_rt: float
    recent_rt: float
    max_in_flight: int | None
    saturated: bool
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
        self.cpu: float | None = None
        self.recent_rt: float | None = None
        # A completion slower than this is queueing; recomputed as each bucket starts, so a
        # completion costs a comparison, not a scan of the window. Infinite: no estimate yet.
        self._slow_rt = math.inf
        # When the current run of slow completions began; None: the last one was not slow.
        self._slow_since: float | None = None
        self.in_flight = 0
        self._last_shed: float | None = None
        self.admitted_total = 0
        self.shed_total = 0
        self.reply = shed_reply(config)

    def record_cpu(self, usage: float) -> None:
        """A sample of the pod's CPU use, 0..1 of its quota (from its cgroup)."""
        usage = min(max(usage, 0.0), 1.0)
        if self.cpu is None:
            self.cpu = usage
            return
        decay = self.config.cpu_decay
        self.cpu = self.cpu * decay + usage * (1.0 - decay)

    def try_admit(self) -> InFlight | None:
        """An ``InFlight`` to finish later, or None: shed this request (``reply``)."""
        now = self._clock()
        if self.config.enabled and self._should_shed(now):
            self.shed_total += 1
            return None
        self.in_flight += 1
        self.admitted_total += 1
        return InFlight(self, now)

    def _should_shed(self, now: float) -> bool:
        limit = self.max_in_flight(now)
        if limit is None or self.in_flight < limit:
            return False  # no estimate yet, or room under it
        if self.saturated(now):
            self._last_shed = now
            return True
        if self._last_shed is not None and now - self._last_shed <= self.config.cool_down:
            return True
        self._last_shed = None
        return False

    def saturated(self, now: float) -> bool:
        cpu = self.cpu
        if cpu is not None and cpu > self.config.cpu_threshold:
            return True
        since = self._slow_since
        return since is not None and now - since >= self.config.queue_interval

    def _completed(self, started: float) -> None:
        now = self._clock()
        self.in_flight -= 1
        rt = max(0.0, now - started)
        recent = self.recent_rt
        self.recent_rt = (
            rt if recent is None else recent + LATENCY_EWMA_WEIGHT * (rt - recent)
        )
        bucket = math.floor(now / self._width)
        slot = bucket % self.config.buckets
        if self._bucket_ids[slot] != bucket:
            self._bucket_ids[slot] = bucket
            self._passes[slot] = 0
            self._rt_sums[slot] = 0.0
            estimate = self._estimate(now)
            self._slow_rt = (
                math.inf if estimate is None
                else estimate[1] + max(self.config.max_queue_delay, estimate[1])
            )
        self._passes[slot] += 1
        self._rt_sums[slot] += rt
        if rt <= self._slow_rt:
            self._slow_since = None
        elif self._slow_since is None:
            self._slow_since = now

    def _full_buckets(self, now: float) -> list[int]:
        current = math.floor(now / self._width)
        oldest = current - self.config.buckets
        return [
            slot
            for slot, bucket in enumerate(self._bucket_ids)
            if oldest < bucket < current and self._passes[slot]
        ]

    def _estimate(self, now: float) -> tuple[float, float] | None:
        """(max delivery rate per second, min mean latency) over completed buckets."""
        slots = self._full_buckets(now)
        if not slots:
            return None
        max_rate = max(self._passes[s] for s in slots) / self._width
        min_rt = min(self._rt_sums[s] / self._passes[s] for s in slots)
        return max_rate, min_rt

    def max_in_flight(self, now: float) -> int | None:
        """The concurrency the app sustains (max rate x min latency) with ``HEADROOM``, at least
        ``min_concurrency``; None while nothing has completed in a full bucket of the window."""
        estimate = self._estimate(now)
        if estimate is None:
            return None
        max_rate, min_rt = estimate
        # Rounded first so that 100 requests/s x 0.05 s is 5, not 6 through float error.
        return max(
            self.config.min_concurrency, math.ceil(round(max_rate * min_rt * HEADROOM, 6))
        )

    def stats(self) -> ShedStats:
        now = self._clock()
        estimate = self._estimate(now)
        return ShedStats(
            cpu=self.cpu,
            in_flight=self.in_flight,
            max_rate=estimate[0] if estimate else 0.0,
            min_rt=estimate[1] if estimate else 0.0,
            recent_rt=self.recent_rt or 0.0,
            max_in_flight=self.max_in_flight(now),
            saturated=self.saturated(now),
            cooling_down=self._last_shed is not None
            and now - self._last_shed <= self.config.cool_down,
            admitted_total=self.admitted_total,
            shed_total=self.shed_total,
        )
