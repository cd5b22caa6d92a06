"""Cluster-side resilience config: load balancing, active health checks, outlier detection.

Frozen values that the sidecar's ``sidecar.upstream.policy`` cores read; the defaults mirror
Envoy's where Envoy has one. Proposed YAML shape, under a service (mesh file) or a cluster
(bootstrap); every field is optional:

.. code-block:: yaml

    load_balancing:
      policy: ring_hash          # round_robin | weighted_round_robin | least_request |
                                 # least_connections | peak_ewma | random | weighted_random |
                                 # ring_hash | maglev
      hash_on: header            # source_ip | source_ip_port | header | cookie (hash policies)
      hash_key: x-user-id        # the header or cookie name; required for header and cookie
      minimum_ring_size: 1024    # ring_hash
      maximum_ring_size: 8388608 # ring_hash
      maglev_table_size: 65537   # maglev; a prime
      choice_count: 2            # least_request, peak_ewma
      active_request_bias: 1.0   # least_request with unequal weights
      ewma_decay: 10s            # peak_ewma
      ewma_default_rtt: 30ms     # peak_ewma
      panic_threshold: 50        # percent; 0 disables panic mode
    health_check:
      type: http                 # http | grpc
      path: /healthz             # http
      host: greeter              # http Host header; default the service name
      expected_statuses: [200-399]   # http; single codes or ranges
      service_name: ""           # grpc; the name sent in HealthCheckRequest.service
      interval: 5s
      unhealthy_interval: 5s     # default: interval
      interval_jitter: 0s
      timeout: 1s
      unhealthy_threshold: 3
      healthy_threshold: 2
      initially_healthy: false
    outlier_detection:
      interval: 10s
      consecutive_5xx: 5
      consecutive_gateway_failure: 5
      base_ejection_time: 30s
      max_ejection_time: 300s
      max_ejection_percent: 10
      enforcing_consecutive_5xx: 100
      enforcing_consecutive_gateway_failure: 0
      enforcing_success_rate: 100
      success_rate_minimum_hosts: 5
      success_rate_request_volume: 100
      success_rate_stdev_factor: 1900
      enforcing_failure_percentage: 0
      failure_percentage_threshold: 85
      failure_percentage_minimum_hosts: 5
      failure_percentage_request_volume: 50
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pilotfish.config.fields import Node


class LbKind(enum.Enum):
    """How a cluster picks an endpoint."""

    ROUND_ROBIN = "round_robin"
    WEIGHTED_ROUND_ROBIN = "weighted_round_robin"
    LEAST_REQUEST = "least_request"
    LEAST_CONNECTIONS = "least_connections"
    PEAK_EWMA = "peak_ewma"
    RANDOM = "random"
    WEIGHTED_RANDOM = "weighted_random"
    RING_HASH = "ring_hash"
    MAGLEV = "maglev"

    @property
    def hashing(self) -> bool:
        return self in (LbKind.RING_HASH, LbKind.MAGLEV)


class HashOn(enum.Enum):
    """What a hashing balancer hashes to keep a client on one endpoint."""

    SOURCE_IP = "source_ip"
    SOURCE_IP_PORT = "source_ip_port"
    HEADER = "header"
    COOKIE = "cookie"


@dataclass(frozen=True, slots=True)
class LbPolicy:
    """A cluster's load balancing policy.

    - ``kind``: ``weighted_round_robin`` (smooth, as nginx; what Pilotfish always did).
      ``round_robin`` and ``random`` ignore endpoint weights; every other kind honours them.
    - ``hash_on``: ``source_ip``. Only read by ``ring_hash`` and ``maglev``. A request without
      the header or cookie goes to a random endpoint.
    - ``hash_key``: none. The header or cookie name; required with ``header`` and ``cookie``.
    - ``minimum_ring_size``: 1024 ring entries (Envoy's default).
    - ``maximum_ring_size``: 8388608 ring entries (Envoy's default).
    - ``maglev_table_size``: 65537 (Envoy's default); must be prime.
    - ``least_connections``: the endpoint with the fewest open connections from this sidecar
      (per unit of weight), as HAProxy's leastconn. Meant for HTTP/1.1 and TCP, where a
      connection carries one request or session; over HTTP/2 ``least_request`` sees more.
    - ``choice_count``: 2 random candidates per pick for ``least_request`` and ``peak_ewma``.
    - ``active_request_bias``: 1.0; ``least_request`` with unequal weights uses the effective
      weight ``weight / (active_requests + 1) ** bias`` (Envoy's).
    - ``ewma_decay``: 10 s, the time constant of ``peak_ewma``'s latency average (linkerd's).
    - ``ewma_default_rtt``: 30 ms, the latency assumed for an endpoint never measured.
    - ``panic_threshold``: 50 (percent, Envoy's ``healthy_panic_threshold``); when fewer than
      this share of the endpoints is healthy, balance over all of them. 0 disables panic mode.
    - ``slow_start``: none. For ``weighted_round_robin``: an endpoint that joins an existing
      cluster ramps up its weight over a window instead of taking its full share at once.
    """

    kind: LbKind = LbKind.WEIGHTED_ROUND_ROBIN
    hash_on: HashOn = HashOn.SOURCE_IP
    hash_key: str | None = None
    minimum_ring_size: int = 1024
    maximum_ring_size: int = 8 * 1024 * 1024
    maglev_table_size: int = 65537
    choice_count: int = 2
    active_request_bias: float = 1.0
    ewma_decay: float = 10.0
    ewma_default_rtt: float = 0.030
    panic_threshold: float = 50.0
    slow_start: SlowStartConfig | None = None


@dataclass(frozen=True, slots=True)
class SlowStartConfig:
    """Envoy's ``slow_start_config``: a new endpoint's weight is its weight times
    ``max(min_weight_percent / 100, (time since it joined / window) ** (1 / aggression))``
    until ``window`` has passed.

    - ``window``: required, above 0.
    - ``aggression``: 1.0, a linear ramp; above 1 ramps faster at first.
    - ``min_weight_percent``: 10.
    """

    window: float
    aggression: float = 1.0
    min_weight_percent: float = 10.0

    def factor(self, elapsed: float) -> float:
        """The share of its weight an endpoint that joined ``elapsed`` seconds ago gets."""
        if elapsed >= self.window:
            return 1.0
        ramp = max(elapsed, 0.0) / self.window
        return max(self.min_weight_percent / 100.0, float(ramp ** (1.0 / self.aggression)))


class HealthCheckType(enum.Enum):
    HTTP = "http"
    GRPC = "grpc"


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    """Active health checking of a cluster's endpoints.

    Envoy requires ``interval``, ``timeout`` and both thresholds; the defaults here are ours.

    - ``type``: ``http``, a GET of ``path``; ``grpc`` calls ``grpc.health.v1.Health/Check``.
    - ``path``: ``/healthz``.
    - ``host``: none, meaning the cluster name is sent as the Host header.
    - ``expected_statuses``: 200-399; half-open ranges ``(start, end)``, healthy if any holds.
    - ``service_name``: ``""``, the whole server (gRPC); SERVING is healthy.
    - ``interval``: 5 s between checks of a healthy endpoint.
    - ``unhealthy_interval``: none, meaning ``interval``; between checks of an unhealthy one.
    - ``interval_jitter``: 0 s; up to this much random time is added to every interval.
    - ``timeout``: 1 s; a check that takes longer fails.
    - ``unhealthy_threshold``: 3 consecutive failures take a healthy endpoint out.
    - ``healthy_threshold``: 2 consecutive successes bring an unhealthy endpoint back.
    - ``initially_healthy``: false (Envoy's). A new endpoint gets no traffic until checked;
      its first check decides at once (one success or one failure), as in Envoy.
    """

    type: HealthCheckType = HealthCheckType.HTTP
    path: str = "/healthz"
    host: str | None = None
    expected_statuses: tuple[tuple[int, int], ...] = ((200, 400),)
    service_name: str = ""
    interval: float = 5.0
    unhealthy_interval: float | None = None
    interval_jitter: float = 0.0
    timeout: float = 1.0
    unhealthy_threshold: int = 3
    healthy_threshold: int = 2
    initially_healthy: bool = False

    def status_ok(self, status: int) -> bool:
        return any(start <= status < end for start, end in self.expected_statuses)


@dataclass(frozen=True, slots=True)
class OutlierDetectionConfig:
    """Passive health checking: eject endpoints that answer worse than their peers.

    Defaults are Envoy's:

    - ``interval``: 10 s between sweeps (success rate, failure percentage, unejection).
    - ``consecutive_5xx``: 5 consecutive 5xx (or connect failures) eject.
    - ``consecutive_gateway_failure``: 5 consecutive 502/503/504 or connect failures eject.
    - ``base_ejection_time``: 30 s, times the number of recent ejections of the endpoint.
    - ``max_ejection_time``: 300 s caps the ejection time.
    - ``max_ejection_percent``: 10; no more ejections once this share of the endpoints is
      ejected. So one endpoint can always be ejected, and the share can end one endpoint
      above the limit (Envoy's and gRPC's rule). 0 disables ejection.
    - ``enforcing_consecutive_5xx``: 100 (percent chance that a detection ejects).
    - ``enforcing_consecutive_gateway_failure``: 0, so detected but not enforced.
    - ``enforcing_success_rate``: 100.
    - ``success_rate_minimum_hosts``: 5 endpoints with enough requests, or no success rate
      ejection at all.
    - ``success_rate_request_volume``: 100 requests in the interval for an endpoint to count.
    - ``success_rate_stdev_factor``: 1900, i.e. eject below mean - 1.9 * stdev.
    - ``enforcing_failure_percentage``: 0, so failure percentage ejection is off.
    - ``failure_percentage_threshold``: 85; eject at this failure percentage or above.
    - ``failure_percentage_minimum_hosts``: 5.
    - ``failure_percentage_request_volume``: 50.
    - ``split_external_local_origin_errors``: true (Envoy: false). Failures of the proxy's own
      making (connect failure, timeout, reset) count apart from the host's answers, so a
      host that cannot be reached is ejected after ``consecutive_local_origin_failure``.
    - ``consecutive_local_origin_failure``: 5.
    - ``enforcing_consecutive_local_origin_failure``: 100.

    A cluster without ``outlier_detection`` still gets ``LOCAL_ORIGIN_ONLY``: unreachable
    hosts are ejected, nothing else is.
    """

    interval: float = 10.0
    consecutive_5xx: int = 5
    consecutive_gateway_failure: int = 5
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejection_percent: int = 10
    enforcing_consecutive_5xx: int = 100
    enforcing_consecutive_gateway_failure: int = 0
    enforcing_success_rate: int = 100
    success_rate_minimum_hosts: int = 5
    success_rate_request_volume: int = 100
    success_rate_stdev_factor: int = 1900
    enforcing_failure_percentage: int = 0
    failure_percentage_threshold: int = 85
    failure_percentage_minimum_hosts: int = 5
    failure_percentage_request_volume: int = 50
    split_external_local_origin_errors: bool = True
    consecutive_local_origin_failure: int = 5
    enforcing_consecutive_local_origin_failure: int = 100


LOCAL_ORIGIN_ONLY = OutlierDetectionConfig(enforcing_consecutive_5xx=0, enforcing_success_rate=0)
"""What a cluster without ``outlier_detection`` gets: 5 consecutive connect failures, timeouts
or resets eject a host (base 30 s); answers, good or bad, eject nothing."""


def _as_float(node: Node, default: float, minimum: float, maximum: float | None = None) -> float:
    if node.value is None:
        return default
    value = node.value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise node.error("expected a number")
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and at most {maximum:g}" if maximum is not None else ""
        raise node.error(f"expected a number at least {minimum:g}{upper}")
    return float(value)


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, int(n**0.5) + 1))


_HASHING = tuple(k for k in LbKind if k.hashing)
# The policies each field applies to; a field set for another policy is an error, since it
# would be silently ignored.
_LB_FIELD_KINDS: dict[str, tuple[LbKind, ...]] = {
    "policy": tuple(LbKind),
    "hash_on": _HASHING,
    "hash_key": _HASHING,
    "minimum_ring_size": (LbKind.RING_HASH,),
    "maximum_ring_size": (LbKind.RING_HASH,),
    "maglev_table_size": (LbKind.MAGLEV,),
    "choice_count": (LbKind.LEAST_REQUEST, LbKind.PEAK_EWMA),
    "active_request_bias": (LbKind.LEAST_REQUEST,),
    "ewma_decay": (LbKind.PEAK_EWMA,),
    "ewma_default_rtt": (LbKind.PEAK_EWMA,),
    "panic_threshold": tuple(LbKind),
    "slow_start": (LbKind.WEIGHTED_ROUND_ROBIN,),
}


def parse_lb_policy(node: Node) -> LbPolicy:
    """The ``load_balancing`` mapping; a missing one (``None``) gives the defaults."""
    if node.value is None:
        return LbPolicy()
    node.mapping(set(_LB_FIELD_KINDS))
    d = LbPolicy()
    kind = LbKind(node.get("policy").as_choice(tuple(k.value for k in LbKind), d.kind.value))
    for name, kinds in _LB_FIELD_KINDS.items():
        if node.has(name) and kind not in kinds:
            names = " and ".join(k.value for k in kinds)
            raise node.get(name).error(
                f"only for the {names} {'policy' if len(kinds) == 1 else 'policies'}"
            )
    hash_on = HashOn(node.get("hash_on").as_choice(tuple(h.value for h in HashOn), "source_ip"))
    hash_key: str | None = None
    if hash_on in (HashOn.HEADER, HashOn.COOKIE):
        hash_key = node.require("hash_key").as_str()
        if hash_on is HashOn.HEADER:
            hash_key = hash_key.lower()
    elif node.has("hash_key"):
        raise node.get("hash_key").error("only with hash_on: header or cookie")
    minimum = node.get("minimum_ring_size").as_int(d.minimum_ring_size, 1, 8 * 1024 * 1024)
    maximum = node.get("maximum_ring_size").as_int(d.maximum_ring_size, 1, 8 * 1024 * 1024)
    if maximum < minimum:
        raise node.get("maximum_ring_size").error("must not be below minimum_ring_size")
    table = node.get("maglev_table_size").as_int(d.maglev_table_size, 2, 5_000_011)
    if not _is_prime(table):
        raise node.get("maglev_table_size").error("expected a prime number, like 65537")
    return LbPolicy(
        kind=kind,
        hash_on=hash_on,
        hash_key=hash_key,
        minimum_ring_size=minimum,
        maximum_ring_size=maximum,
        maglev_table_size=table,
        choice_count=node.get("choice_count").as_int(d.choice_count, 2, 100),
        active_request_bias=_as_float(node.get("active_request_bias"), 1.0, 0.0, 10.0),
        ewma_decay=node.get("ewma_decay").as_duration(d.ewma_decay),
        ewma_default_rtt=node.get("ewma_default_rtt").as_duration(d.ewma_default_rtt),
        panic_threshold=_as_float(node.get("panic_threshold"), d.panic_threshold, 0.0, 100.0),
        slow_start=parse_slow_start(node.get("slow_start")) if node.has("slow_start") else None,
    )


def parse_slow_start(node: Node) -> SlowStartConfig:
    node.mapping({"window", "aggression", "min_weight_percent"})
    window = node.require("window").as_duration()
    if window <= 0:
        raise node.get("window").error("expected a duration above 0s")
    aggression = _as_float(node.get("aggression"), 1.0, 0.0)
    if aggression <= 0:
        raise node.get("aggression").error("expected a number above 0")
    return SlowStartConfig(
        window=window,
        aggression=aggression,
        min_weight_percent=_as_float(node.get("min_weight_percent"), 10.0, 0.0, 100.0),
    )


def _parse_statuses(node: Node) -> tuple[tuple[int, int], ...]:
    ranges: list[tuple[int, int]] = []
    for element in node.elements():
        value = element.value
        if isinstance(value, int) and not isinstance(value, bool):
            start, end = value, value
        elif isinstance(value, str) and value.count("-") == 1:
            low, _, high = value.partition("-")
            if not (low.strip().isdigit() and high.strip().isdigit()):
                raise element.error("expected a status like 200 or a range like 200-399")
            start, end = int(low), int(high)
        else:
            raise element.error("expected a status like 200 or a range like 200-399")
        if not 100 <= start <= end <= 599:
            raise element.error("expected statuses between 100 and 599, low to high")
        ranges.append((start, end + 1))
    if not ranges:
        raise node.error("expected at least one status")
    return tuple(ranges)


def parse_health_check(node: Node) -> HealthCheckConfig:
    """The ``health_check`` mapping (required: ``type``); ``None`` means no health checking."""
    node.mapping(
        {
            "type",
            "path",
            "host",
            "expected_statuses",
            "service_name",
            "interval",
            "unhealthy_interval",
            "interval_jitter",
            "timeout",
            "unhealthy_threshold",
            "healthy_threshold",
            "initially_healthy",
        }
    )
    d = HealthCheckConfig()
    kind = HealthCheckType(node.require("type").as_choice(tuple(t.value for t in HealthCheckType)))
    http_only = ("path", "host", "expected_statuses")
    for name in http_only if kind is HealthCheckType.GRPC else ("service_name",):
        if node.has(name):
            raise node.get(name).error(f"not for {kind.value} health checks")
    path = node.get("path").as_str(d.path)
    if not path.startswith("/"):
        raise node.get("path").error("expected a path starting with /")
    service_name = node.get("service_name").value
    if service_name is not None and not isinstance(service_name, str):
        raise node.get("service_name").error("expected a string")
    interval = node.get("interval").as_duration(d.interval)
    if interval <= 0:
        raise node.get("interval").error("expected a duration above 0s")
    unhealthy_interval = None
    if node.has("unhealthy_interval"):
        unhealthy_interval = node.get("unhealthy_interval").as_duration()
        if unhealthy_interval <= 0:
            raise node.get("unhealthy_interval").error("expected a duration above 0s")
    timeout = node.get("timeout").as_duration(d.timeout)
    if timeout <= 0:
        raise node.get("timeout").error("expected a duration above 0s")
    return HealthCheckConfig(
        type=kind,
        path=path,
        host=node.get("host").as_str() if node.has("host") else None,
        expected_statuses=(
            _parse_statuses(node.get("expected_statuses"))
            if node.has("expected_statuses")
            else d.expected_statuses
        ),
        service_name=service_name or "",
        interval=interval,
        unhealthy_interval=unhealthy_interval,
        interval_jitter=node.get("interval_jitter").as_duration(d.interval_jitter),
        timeout=timeout,
        unhealthy_threshold=node.get("unhealthy_threshold").as_int(d.unhealthy_threshold, 1),
        healthy_threshold=node.get("healthy_threshold").as_int(d.healthy_threshold, 1),
        initially_healthy=node.get("initially_healthy").as_bool(d.initially_healthy),
    )


def parse_outlier_detection(node: Node) -> OutlierDetectionConfig:
    """The ``outlier_detection`` mapping; ``{}`` enables it with Envoy's defaults."""
    node.mapping(set(OutlierDetectionConfig.__slots__))
    d = OutlierDetectionConfig()

    def percent(name: str) -> int:
        return node.get(name).as_int(getattr(d, name), 0, 100)

    def count(name: str) -> int:
        return node.get(name).as_int(getattr(d, name), 1)

    def duration(name: str) -> float:
        seconds = node.get(name).as_duration(getattr(d, name))
        if seconds <= 0:
            raise node.get(name).error("expected a duration above 0s")
        return seconds

    config = OutlierDetectionConfig(
        interval=duration("interval"),
        consecutive_5xx=count("consecutive_5xx"),
        consecutive_gateway_failure=count("consecutive_gateway_failure"),
        base_ejection_time=duration("base_ejection_time"),
        max_ejection_time=duration("max_ejection_time"),
        max_ejection_percent=percent("max_ejection_percent"),
        enforcing_consecutive_5xx=percent("enforcing_consecutive_5xx"),
        enforcing_consecutive_gateway_failure=percent("enforcing_consecutive_gateway_failure"),
        enforcing_success_rate=percent("enforcing_success_rate"),
        success_rate_minimum_hosts=count("success_rate_minimum_hosts"),
        success_rate_request_volume=count("success_rate_request_volume"),
        success_rate_stdev_factor=count("success_rate_stdev_factor"),
        enforcing_failure_percentage=percent("enforcing_failure_percentage"),
        failure_percentage_threshold=percent("failure_percentage_threshold"),
        failure_percentage_minimum_hosts=count("failure_percentage_minimum_hosts"),
        failure_percentage_request_volume=count("failure_percentage_request_volume"),
        split_external_local_origin_errors=node.get("split_external_local_origin_errors").as_bool(
            d.split_external_local_origin_errors
        ),
        consecutive_local_origin_failure=count("consecutive_local_origin_failure"),
        enforcing_consecutive_local_origin_failure=percent(
            "enforcing_consecutive_local_origin_failure"
        ),
    )
    if config.max_ejection_time < config.base_ejection_time:
        raise node.get("max_ejection_time").error("must not be below base_ejection_time")
    return config
