"""Resilience policy config: frozen dataclasses with safe defaults, shared by sidecar and mesh file.

The YAML parsers live in ``pilotfish.config.route_policy_yaml``. Proposed shape in the mesh file::

    services:
      quotes:
        circuit_breakers: {max_connections: 1024, max_pending_requests: 1024,
                           max_requests: 1024, max_retries: 3}
        retry_budget: {percent: 20, min_concurrency: 3}     # or `retry_budget: off`
        adaptive_throttling: {enabled: true, k: 2.0, window: 5s, buckets: 10,
                              max_rejection_probability: 80, min_requests: 20}
        load_shedding: {enabled: true, max_queue_delay: 20ms, window: 10s, buckets: 40,
                        cool_down: 1s}                      # inbound, on the service's listener
        routes:
          - match: {prefix: /}
            max_concurrent_requests: 100                     # the route's bulkhead
            retry: {attempts: 2, retry_on: [unavailable, reset, connect-failure],
                    per_try_timeout: 500ms, backoff: {base: 25ms, max: 250ms},
                    retriable_status_codes: [409], retry_non_idempotent: false}
            rate_limit: {max_tokens: 100, tokens_per_fill: 100, fill_interval: 1s,
                         per_caller: {header: x-user-id}, max_callers: 10000}
            fault: {header: {name: x-pilotfish-fault, exact: "on"},
                    delay: {duration: 2s, percentage: 10},
                    abort: {http_status: 503, grpc_status: unavailable, percentage: 5}}
            fallback: {when: [no-healthy-upstream, circuit-open, retries-exhausted],
                       response: {status: 200, headers: {content-type: text/plain},
                                  body: "try again later",
                                  grpc_status: unavailable, grpc_message: "degraded"}}
            # a gRPC OK carries a message: grpc_response: {base64: CAE=} or
            #   {json: {status: SERVING}, type: grpc.health.v1.HealthCheckResponse,
            #    descriptor_set: health.pb}
            # or  fallback: {cluster: quotes-cache}

The keys avoid ``on``/``off``/``yes``/``no``: YAML 1.1 (PyYAML) reads them as booleans.

Every default below is documented on the line after its field; ``docs/mesh-reference.md``
copies those lines.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pilotfish.config.matchers import HeaderMatcher

GRPC_STATUS_NAMES: dict[str, int] = {
    "ok": 0, "cancelled": 1, "unknown": 2, "invalid-argument": 3, "deadline-exceeded": 4,
    "not-found": 5, "already-exists": 6, "permission-denied": 7, "resource-exhausted": 8,
    "failed-precondition": 9, "aborted": 10, "out-of-range": 11, "unimplemented": 12,
    "internal": 13, "unavailable": 14, "data-loss": 15, "unauthenticated": 16,
}  # fmt: skip


class RetryOn(enum.Enum):
    """A condition under which a failed attempt may be retried (``retry.retry_on``)."""

    HTTP_5XX = "5xx"  # any 5xx response, a reset, a connect failure, a per-try timeout
    GATEWAY_ERROR = "gateway-error"  # 502, 503, 504, or a per-try timeout
    RESET = "reset"  # the upstream reset or dropped the stream, or the per-try timeout fired
    CONNECT_FAILURE = "connect-failure"
    REFUSED_STREAM = "refused-stream"  # REFUSED_STREAM, beyond a GOAWAY, or shed unprocessed
    RETRIABLE_STATUS_CODES = "retriable-status-codes"  # HTTP status in retriable_status_codes
    UNAVAILABLE = "unavailable"  # grpc-status 14
    CANCELLED = "cancelled"  # grpc-status 1
    DEADLINE_EXCEEDED = "deadline-exceeded"  # grpc-status 4 from the upstream
    RESOURCE_EXHAUSTED = "resource-exhausted"  # grpc-status 8
    INTERNAL = "internal"  # grpc-status 13


DEFAULT_RETRY_ON = frozenset(
    {RetryOn.CONNECT_FAILURE, RetryOn.REFUSED_STREAM, RetryOn.RESET, RetryOn.UNAVAILABLE}
)


@dataclass(frozen=True, slots=True)
class RetryBackoff:
    base: float = 0.025
    """``25ms``: the first retry waits a random time in [0, base) (full jitter, as Envoy)."""
    max: float = 0.25
    """``250ms``: the jitter ceiling doubles per retry (base * (2^n - 1)) up to this."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a route retries. Routes without a ``retry`` block get ``RetryPolicy()``."""

    attempts: int = 1
    """``1``: retries after the first try (not counting transparent retries of requests that
    provably never reached the upstream: refused stream or beyond GOAWAY, up to 3)."""
    retry_on: frozenset[RetryOn] = DEFAULT_RETRY_ON
    """``[connect-failure, refused-stream, reset, unavailable]``: failures that are safe to retry
    for idempotent requests; a non-idempotent request is only retried if it never reached the
    upstream, so the default never duplicates a POST or a gRPC call."""
    per_try_timeout: float | None = None
    """none: each try may use the whole remaining deadline."""
    backoff: RetryBackoff = RetryBackoff()
    """``{base: 25ms, max: 250ms}``."""
    retriable_status_codes: frozenset[int] = frozenset()
    """empty: HTTP statuses retried under ``retriable-status-codes``."""
    retry_non_idempotent: bool = False
    """``false``: POST, PATCH and gRPC calls are retried only when they never reached the
    upstream. ``true`` declares every request of the route safe to repeat (e.g. read-only RPCs)."""


NO_RETRIES = RetryPolicy(attempts=0)


@dataclass(frozen=True, slots=True)
class RetryBudgetConfig:
    """Per cluster: active retries ≤ max(min_concurrency, percent% of active requests)."""

    percent: float = 20.0
    """``20``: retries may add at most 20% load to a cluster."""
    min_concurrency: int = 3
    """``3``: retries always allowed at once, so a quiet cluster can still retry."""


@dataclass(frozen=True, slots=True)
class CircuitBreakerConfig:
    """Per cluster limits; past one, the request fails at once with 503 / UNAVAILABLE (flag UO)."""

    max_connections: int = 1024
    """``1024``: upstream connections to all hosts of the cluster."""
    max_pending_requests: int = 1024
    """``1024``: requests waiting for a connection or a stream."""
    max_requests: int = 1024
    """``1024``: requests in flight to the cluster."""
    max_retries: int = 3
    """``3``: retries in flight to the cluster; only used when the retry budget is off."""


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """Local token bucket per route, or per caller when ``per_caller_header``/``per_source``."""

    max_tokens: int
    """required: the burst size."""
    tokens_per_fill: int
    """``max_tokens`` (in YAML): tokens added every fill_interval."""
    fill_interval: float = 1.0
    """``1s``."""
    per_caller_header: str | None = None
    """none: one bucket for the route; a header name gives each value its own bucket."""
    per_source: bool = False
    """``false``: ``true`` gives each downstream source address its own bucket."""
    max_callers: int = 10_000
    """``10000``: per-caller buckets kept (least recently used dropped; a dropped caller starts
    again with a full bucket, so memory stays bounded at the price of some leniency)."""


@dataclass(frozen=True, slots=True)
class LoadSheddingConfig:
    """Inbound adaptive shedding (BBR-like) on the app's saturation: sheds only while the app
    queues (or its pod's CPU is past the threshold) and more than it sustains is in flight."""

    enabled: bool = False
    """``true`` for a mesh service's inbound listener, ``false`` for a bootstrap listener."""
    max_queue_delay: float = 0.02
    """``20ms``: the app queues when its recent latency exceeds its best by more than this (and
    by more than the best itself)."""
    queue_interval: float = 0.1
    """``100ms``: the app queues only when every call completed over this long was late by
    ``max_queue_delay`` (CoDel's interval): a burst, one slow call or a stall of the whole
    machine is not a queue."""
    min_concurrency: int = 3
    """``3``: never shed with fewer in flight (Envoy's adaptive concurrency has the same floor):
    an estimate taken while traffic is light is far under what the app can take."""
    cgroup: str | None = None
    """none: the pod's cgroup v2 directory (its ``cpu.stat`` and ``cpu.max``), e.g.
    ``/sys/fs/cgroup`` when the sidecar shares the app's cgroup; then CPU past
    ``cpu_threshold`` of the quota counts as saturation too."""
    cpu_threshold: float = 0.8
    """``80`` (percent of the pod's CPU quota): only with ``cgroup``."""
    window: float = 10.0
    """``10s``: history of throughput and latency."""
    buckets: int = 40
    """``40``: so one bucket is 250 ms, and an estimate exists 250 ms after traffic starts
    (until then nothing is shed, and an overloaded app's queue grows)."""
    cool_down: float = 1.0
    """``1s``: after a shed, keep the limit this long even if the app calms down, to avoid
    flapping; also the retry hint of a shed reply."""
    cpu_decay: float = 0.95
    """``0.95``: EWMA weight of the old CPU value per sample (every 250 ms)."""


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    """Inbound isolation per listener: callers cannot hold more of it than these."""

    max_downstream_connections: int | None = None
    """none: a connection past it is closed at once (counted ``downstream_cx_overflow``)."""
    max_requests_per_connection: int | None = None
    """none: after this many requests a connection is drained (GOAWAY, or ``Connection:
    close`` on HTTP/1.1), so long-lived clients reconnect and rebalance across instances."""


@dataclass(frozen=True, slots=True)
class AdaptiveThrottlingConfig:
    """Client-side throttling (Google SRE book): reject locally with p = (req - k*acc)/(req + 1),
    at most ``max_rejection_probability``."""

    enabled: bool = False
    """``false``: opt in per upstream service."""
    k: float = 2.0
    """``2.0``: the backend may reject up to half the requests before the client throttles."""
    window: float = 5.0
    """``5s``: history of requests and accepts; admission recovers within about one window of
    the backend recovering (a longer window throttles more steadily and recovers more slowly)."""
    buckets: int = 10
    """``10``: half-second buckets."""
    max_rejection_probability: float = 0.8
    """``80`` (percent): at least a fifth of the requests still reach a failing backend, so its
    recovery is seen (Envoy's admission control has the same cap and default)."""
    min_requests: int = 20
    """``20``: no throttling until this many requests in the window (no coin toss on 1 error)."""


@dataclass(frozen=True, slots=True)
class FaultDelay:
    duration: float
    """required."""
    percentage: float = 100.0
    """``100``: share of (matching) requests delayed."""


@dataclass(frozen=True, slots=True)
class FaultAbort:
    """At least one of http_status / grpc_status; the other is derived by the gRPC mapping."""

    http_status: int | None = None
    grpc_status: int | None = None
    percentage: float = 100.0
    """``100``: share of (matching) requests aborted."""


@dataclass(frozen=True, slots=True)
class FaultConfig:
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None
    header: HeaderMatcher | None = None
    """none: faults apply to all requests; e.g. ``{name: x-pilotfish-fault, exact: "on"}``."""


class FallbackTrigger(enum.Enum):
    NO_HEALTHY_UPSTREAM = "no-healthy-upstream"
    CIRCUIT_OPEN = "circuit-open"
    RETRIES_EXHAUSTED = "retries-exhausted"


@dataclass(frozen=True, slots=True)
class StaticResponse:
    status: int = 200
    """``200``: HTTP status of the static reply."""
    headers: tuple[tuple[str, str], ...] = ()
    body: str = ""
    grpc_status: int | None = None
    """none (``0`` when ``grpc_response`` is given): gRPC requests do not get this fallback."""
    grpc_message: str = ""
    grpc_response: bytes | None = None
    """none: the serialized protobuf message of a gRPC OK (required with ``grpc_status: 0``:
    a unary OK without a message is an invalid response)."""


@dataclass(frozen=True, slots=True)
class FallbackConfig:
    """Exactly one of ``response`` and ``cluster``."""

    response: StaticResponse | None = None
    cluster: str | None = None
    when: frozenset[FallbackTrigger] = frozenset(FallbackTrigger)
    """all three triggers."""


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    """Everything a route adds to ``RouteAction`` for resilience."""

    retry: RetryPolicy = RetryPolicy()
    rate_limit: RateLimitConfig | None = None
    """none: no local rate limit."""
    fault: FaultConfig | None = None
    fallback: FallbackConfig | None = None
    max_concurrent_requests: int | None = None
    """none: the route's requests in flight are bounded only by its cluster's breakers; a
    number is the route's bulkhead (past it: 503 / UNAVAILABLE, flag RO)."""


@dataclass(frozen=True, slots=True)
class ClusterResilience:
    """Everything a cluster (an upstream service) adds for resilience, client side."""

    circuit_breakers: CircuitBreakerConfig = CircuitBreakerConfig()
    retry_budget: RetryBudgetConfig | None = RetryBudgetConfig()
    """on (20%, at least 3): scales with traffic, unlike ``max_retries``; ``off`` disables it."""
    adaptive_throttling: AdaptiveThrottlingConfig = AdaptiveThrottlingConfig()
