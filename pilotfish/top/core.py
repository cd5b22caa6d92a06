"""What ``pilotfish top`` computes, from two scrapes of the sidecars' Prometheus metrics.

Pure: scrape text comes in with the time it was taken, rows go out. Rates and percentiles are
over the window between two scrapes of the same sidecar, as Prometheus's ``rate`` and
``histogram_quantile`` compute them: a counter that went down (the sidecar restarted) counts
from zero, and a percentile is interpolated linearly inside the bucket it falls in.

A request succeeded when its sidecar sent a response that is neither a 5xx nor a gRPC status
other than OK (Linkerd's rule); a request that got no response at all (``response_code`` 0, the
caller went away) is a failure too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

REQUESTS = "pilotfish_requests_total"
DURATION = "pilotfish_request_duration_seconds"
ALL_ROUTES = "(all)"
DIRECTIONS = ("inbound", "outbound")


class ScrapeError(ValueError):
    """The text is not Prometheus exposition format."""


@dataclass(frozen=True, slots=True, order=True)
class RouteKey:
    direction: str
    service: str
    route: str


@dataclass(slots=True)
class Counts:
    """Cumulative counts of one route on one sidecar (or their growth over a window)."""

    requests: float = 0.0
    successes: float = 0.0
    # Upper bound (seconds, +inf last) -> requests at most that long, cumulative as scraped.
    buckets: dict[float, float] = field(default_factory=dict)

    def add(self, other: Counts) -> None:
        self.requests += other.requests
        self.successes += other.successes
        for bound, count in other.buckets.items():
            self.buckets[bound] = self.buckets.get(bound, 0.0) + count

    def minus(self, earlier: Counts) -> Counts:
        """The growth since ``earlier``; all of self when a counter went down (a restart)."""
        if self.requests < earlier.requests or any(
            self.buckets.get(b, 0.0) < c for b, c in earlier.buckets.items()
        ):
            return Counts(self.requests, self.successes, dict(self.buckets))
        return Counts(
            self.requests - earlier.requests,
            max(0.0, self.successes - earlier.successes),
            {b: c - earlier.buckets.get(b, 0.0) for b, c in self.buckets.items()},
        )


@dataclass(frozen=True, slots=True)
class Scrape:
    at: float  # seconds, on the caller's monotonic clock
    routes: Mapping[RouteKey, Counts]


def succeeded(response_code: str, grpc_status: str) -> bool:
    try:
        code = int(response_code)
    except ValueError:
        return False
    return 0 < code < 500 and grpc_status in ("", "0")


def parse_scrape(text: str, at: float) -> Scrape:
    """The request counts and duration buckets per (direction, service, route) in ``text``."""
    routes: dict[RouteKey, Counts] = {}

    def counts(labels: Mapping[str, str]) -> Counts:
        key = RouteKey(
            labels.get("direction", ""), labels.get("service", ""), labels.get("route", "")
        )
        found = routes.get(key)
        if found is None:
            found = routes[key] = Counts()
        return found

    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as exc:
        raise ScrapeError(f"not Prometheus text format: {exc}") from exc
    for family in families:
        if family.name == REQUESTS.removesuffix("_total"):
            for sample in family.samples:
                if sample.name != REQUESTS:
                    continue
                c = counts(sample.labels)
                c.requests += sample.value
                if succeeded(
                    sample.labels.get("response_code", ""), sample.labels.get("grpc_status", "")
                ):
                    c.successes += sample.value
        elif family.name == DURATION:
            for sample in family.samples:
                if sample.name != f"{DURATION}_bucket" or "le" not in sample.labels:
                    continue
                c = counts(sample.labels)
                bound = float(sample.labels["le"])
                c.buckets[bound] = c.buckets.get(bound, 0.0) + sample.value
    return Scrape(at=at, routes=routes)


def quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """The ``q``-quantile (0..1) of cumulative ``buckets``, as ``histogram_quantile`` does:
    linear inside the bucket it falls in (from 0 for the first); the highest finite bound when
    it falls in the +Inf bucket. None without observations."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} is outside 0..1")
    bounds = sorted(buckets)
    if not bounds or not math.isinf(bounds[-1]):
        return None
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank and count > below:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


@dataclass(frozen=True, slots=True)
class Row:
    direction: str
    service: str
    route: str  # ALL_ROUTES for the service as a whole
    requests: float  # in the window
    rps: float
    success_rate: float | None  # 0..1; None without requests
    p50: float | None  # seconds
    p99: float | None

    def as_json(self) -> dict[str, object]:
        def ms(value: float | None) -> float | None:
            return None if value is None else round(value * 1000, 3)

        return {
            "direction": self.direction,
            "service": self.service,
            "route": self.route,
            "requests": round(self.requests),
            "rps": round(self.rps, 3),
            "success_rate": None if self.success_rate is None else round(self.success_rate, 4),
            "p50_ms": ms(self.p50),
            "p99_ms": ms(self.p99),
        }


def window_rows(
    before: Mapping[str, Scrape],
    after: Mapping[str, Scrape],
    directions: Iterable[str] = DIRECTIONS,
) -> list[Row]:
    """A row per service (route ``(all)``) and per route, from what each sidecar in both
    scrapes did in between; sorted by direction, service, then route. A sidecar seen only once
    has no window yet and is left out."""
    wanted = set(directions)
    grown: dict[RouteKey, Counts] = {}
    rates: dict[RouteKey, float] = {}
    for sidecar, later in after.items():
        earlier = before.get(sidecar)
        if earlier is None or later.at <= earlier.at:
            continue
        seconds = later.at - earlier.at
        for key, now in later.routes.items():
            if key.direction not in wanted or not key.service:
                continue  # no service: the request matched no route (its own row is noise)
            delta = now.minus(earlier.routes.get(key, Counts()))
            for k in (key, RouteKey(key.direction, key.service, ALL_ROUTES)):
                grown.setdefault(k, Counts()).add(delta)
                rates[k] = rates.get(k, 0.0) + delta.requests / seconds
    rows = []
    for key in sorted(grown, key=lambda k: (k.direction, k.service, k.route != ALL_ROUTES, k)):
        c = grown[key]
        rows.append(
            Row(
                direction=key.direction,
                service=key.service,
                route=key.route,
                requests=c.requests,
                rps=rates[key],
                success_rate=c.successes / c.requests if c.requests > 0 else None,
                p50=quantile(0.5, c.buckets),
                p99=quantile(0.99, c.buckets),
            )
        )
    return rows
