"""A service's cluster policies as Envoy Cluster fields (and route hash policies).

==========================  ==============================================================
mesh field                  Envoy field
==========================  ==============================================================
load_balancing.policy       ``lb_policy``: weighted_round_robin → ROUND_ROBIN (Envoy's round
                            robin honours endpoint weights), least_request → LEAST_REQUEST,
                            random → RANDOM, ring_hash → RING_HASH, maglev → MAGLEV. The
                            variants Envoy lacks use the nearest one and say which in
                            metadata: round_robin (unweighted) → ROUND_ROBIN, weighted_random
                            → RANDOM, peak_ewma and least_connections → LEAST_REQUEST.
choice_count, bias          ``least_request_lb_config``
ring sizes                  ``ring_hash_lb_config``
maglev_table_size           ``maglev_lb_config.table_size``
panic_threshold             ``common_lb_config.healthy_panic_threshold``
hash_on, hash_key           each route's ``hash_policy`` (for Envoy and gRPC), and metadata
health_check                ``health_checks[0]``
outlier_detection           ``outlier_detection``
circuit_breakers            ``circuit_breakers.thresholds[0]`` (priority DEFAULT)
retry_budget                ``circuit_breakers.thresholds[0].retry_budget``
==========================  ==============================================================

gRPC clients only take ROUND_ROBIN and RING_HASH from ``lb_policy`` and reject the rest, but
read ``load_balancing_policy`` first when it is set: the other policies also go there, as a
list whose last entry is round robin, so gRPC (and Envoy) take the first one they support.
"""

from __future__ import annotations

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import base_pb2, extension_pb2, health_check_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.load_balancing_policies.least_request.v3 import least_request_pb2
from envoy.extensions.load_balancing_policies.maglev.v3 import maglev_pb2
from envoy.extensions.load_balancing_policies.random.v3 import random_pb2
from envoy.extensions.load_balancing_policies.round_robin.v3 import round_robin_pb2
from envoy.type.v3 import percent_pb2, range_pb2
from google.protobuf import any_pb2, wrappers_pb2

from control_plane.xds.policy_blocks import adaptive_throttling_block, duration_text
from control_plane.xds.proto_util import duration, pack
from pilotfish.config.cluster_policy import (
    HashOn,
    HealthCheckConfig,
    HealthCheckType,
    LbKind,
    LbPolicy,
    OutlierDetectionConfig,
)
from pilotfish.config.route_policy import (
    AdaptiveThrottlingConfig,
    ClusterResilience,
)

Cluster = cluster_pb2.Cluster
LB_ENUM: dict[LbKind, int] = {
    LbKind.WEIGHTED_ROUND_ROBIN: Cluster.ROUND_ROBIN,
    LbKind.ROUND_ROBIN: Cluster.ROUND_ROBIN,
    LbKind.LEAST_REQUEST: Cluster.LEAST_REQUEST,
    LbKind.PEAK_EWMA: Cluster.LEAST_REQUEST,
    LbKind.LEAST_CONNECTIONS: Cluster.LEAST_REQUEST,
    LbKind.RANDOM: Cluster.RANDOM,
    LbKind.WEIGHTED_RANDOM: Cluster.RANDOM,
    LbKind.RING_HASH: Cluster.RING_HASH,
    LbKind.MAGLEV: Cluster.MAGLEV,
}
# The kind each enum means when the metadata names no other.
ENUM_KIND: dict[int, LbKind] = {
    Cluster.ROUND_ROBIN: LbKind.WEIGHTED_ROUND_ROBIN,
    Cluster.LEAST_REQUEST: LbKind.LEAST_REQUEST,
    Cluster.RANDOM: LbKind.RANDOM,
    Cluster.RING_HASH: LbKind.RING_HASH,
    Cluster.MAGLEV: LbKind.MAGLEV,
}
ACTIVE_REQUEST_BIAS_KEY = "pilotfish.lb.active_request_bias"
SLOW_START_AGGRESSION_KEY = "pilotfish.lb.slow_start_aggression"


def apply_lb_policy(
    cluster: cluster_pb2.Cluster, lb: LbPolicy, metadata: dict[str, object]
) -> None:
    """``metadata`` receives the ``load_balancing`` block of what Envoy cannot say."""
    cluster.lb_policy = LB_ENUM[lb.kind]
    ours: dict[str, object] = {}
    if ENUM_KIND[LB_ENUM[lb.kind]] is not lb.kind:
        ours["policy"] = lb.kind.value
    if lb.kind in (LbKind.LEAST_REQUEST, LbKind.PEAK_EWMA):
        cluster.least_request_lb_config.CopyFrom(_least_request(lb))
    if lb.kind is LbKind.PEAK_EWMA:
        ours["ewma_decay"] = duration_text(lb.ewma_decay)
        ours["ewma_default_rtt"] = duration_text(lb.ewma_default_rtt)
    if lb.kind is LbKind.RING_HASH:
        ring = cluster.ring_hash_lb_config
        ring.minimum_ring_size.value = lb.minimum_ring_size
        ring.maximum_ring_size.value = lb.maximum_ring_size
    if lb.kind is LbKind.MAGLEV:
        cluster.maglev_lb_config.table_size.value = lb.maglev_table_size
    if lb.kind.hashing:
        # Envoy reads these from each route's hash_policy; our clusters hold them.
        ours["hash_on"] = lb.hash_on.value
        if lb.hash_key is not None:
            ours["hash_key"] = lb.hash_key
    if ours:
        metadata["load_balancing"] = ours
    if lb.panic_threshold != LbPolicy().panic_threshold:
        cluster.common_lb_config.healthy_panic_threshold.value = lb.panic_threshold
    if lb.slow_start is not None:
        slow = cluster.round_robin_lb_config.slow_start_config
        slow.slow_start_window.CopyFrom(duration(lb.slow_start.window))
        slow.aggression.CopyFrom(base_pb2.RuntimeDouble(
            default_value=lb.slow_start.aggression, runtime_key=SLOW_START_AGGRESSION_KEY
        ))
        slow.min_weight_percent.value = lb.slow_start.min_weight_percent
    typed = _typed_policy(lb)
    if typed is not None:
        for name, config in ((typed[0], typed[1]), ("envoy.load_balancing_policies.round_robin",
                                                     pack(round_robin_pb2.RoundRobin()))):
            cluster.load_balancing_policy.policies.add(
                typed_extension_config=extension_pb2.TypedExtensionConfig(
                    name=name, typed_config=config
                )
            )


def _least_request(lb: LbPolicy) -> cluster_pb2.Cluster.LeastRequestLbConfig:
    config = cluster_pb2.Cluster.LeastRequestLbConfig(
        choice_count=wrappers_pb2.UInt32Value(value=lb.choice_count)
    )
    if lb.kind is LbKind.LEAST_REQUEST:
        config.active_request_bias.CopyFrom(
            base_pb2.RuntimeDouble(default_value=lb.active_request_bias,
                                   runtime_key=ACTIVE_REQUEST_BIAS_KEY)
        )
    return config


def _typed_policy(lb: LbPolicy) -> tuple[str, any_pb2.Any] | None:
    """The policies gRPC cannot take from ``lb_policy``, as typed extensions."""
    if LB_ENUM[lb.kind] == Cluster.LEAST_REQUEST:
        least = least_request_pb2.LeastRequest(
            choice_count=wrappers_pb2.UInt32Value(value=lb.choice_count)
        )
        if lb.kind is LbKind.LEAST_REQUEST:
            least.active_request_bias.CopyFrom(
                base_pb2.RuntimeDouble(default_value=lb.active_request_bias,
                                       runtime_key=ACTIVE_REQUEST_BIAS_KEY)
            )
        return "envoy.load_balancing_policies.least_request", pack(least)
    if LB_ENUM[lb.kind] == Cluster.RANDOM:
        return "envoy.load_balancing_policies.random", pack(random_pb2.Random())
    if lb.kind is LbKind.MAGLEV:
        maglev = maglev_pb2.Maglev(table_size=wrappers_pb2.UInt64Value(value=lb.maglev_table_size))
        return "envoy.load_balancing_policies.maglev", pack(maglev)
    return None


def hash_policies(lb: LbPolicy) -> list[route_components_pb2.RouteAction.HashPolicy]:
    """What a route to a hashing cluster hashes (Envoy and gRPC read it from the route)."""
    if not lb.kind.hashing:
        return []
    policy = route_components_pb2.RouteAction.HashPolicy()
    if lb.hash_on is HashOn.HEADER:
        assert lb.hash_key is not None
        policy.header.header_name = lb.hash_key
    elif lb.hash_on is HashOn.COOKIE:
        assert lb.hash_key is not None
        policy.cookie.name = lb.hash_key
    else:
        # Envoy cannot hash the source port; the address alone is the nearest key.
        policy.connection_properties.source_ip = True
    return [policy]


def health_check(config: HealthCheckConfig) -> health_check_pb2.HealthCheck:
    check = health_check_pb2.HealthCheck(
        timeout=duration(config.timeout),
        interval=duration(config.interval),
        unhealthy_threshold=wrappers_pb2.UInt32Value(value=config.unhealthy_threshold),
        healthy_threshold=wrappers_pb2.UInt32Value(value=config.healthy_threshold),
    )
    if config.interval_jitter:
        check.interval_jitter.CopyFrom(duration(config.interval_jitter))
    if config.unhealthy_interval is not None:
        check.unhealthy_interval.CopyFrom(duration(config.unhealthy_interval))
    if config.type is HealthCheckType.GRPC:
        check.grpc_health_check.service_name = config.service_name
    else:
        http = check.http_health_check
        http.path = config.path
        if config.host is not None:
            http.host = config.host
        if config.expected_statuses != HealthCheckConfig().expected_statuses:
            http.expected_statuses.extend(
                range_pb2.Int64Range(start=start, end=end)
                for start, end in config.expected_statuses
            )
    return check


def outlier_detection(config: OutlierDetectionConfig) -> outlier_detection_pb2.OutlierDetection:
    od = outlier_detection_pb2.OutlierDetection()
    for name in OutlierDetectionConfig.__slots__:
        value = getattr(config, name)
        if isinstance(value, bool):  # a plain bool in the proto, not a wrapper
            setattr(od, name, value)
            continue
        target = getattr(od, name)
        if isinstance(value, float):
            target.CopyFrom(duration(value))
        else:
            target.value = value
    return od


def circuit_breakers(resilience: ClusterResilience) -> circuit_breaker_pb2.CircuitBreakers:
    limits = resilience.circuit_breakers
    thresholds = circuit_breaker_pb2.CircuitBreakers.Thresholds(
        priority=base_pb2.DEFAULT,
        max_connections=wrappers_pb2.UInt32Value(value=limits.max_connections),
        max_pending_requests=wrappers_pb2.UInt32Value(value=limits.max_pending_requests),
        max_requests=wrappers_pb2.UInt32Value(value=limits.max_requests),
        max_retries=wrappers_pb2.UInt32Value(value=limits.max_retries),
    )
    budget = resilience.retry_budget
    if budget is not None:
        thresholds.retry_budget.budget_percent.CopyFrom(percent_pb2.Percent(value=budget.percent))
        thresholds.retry_budget.min_retry_concurrency.value = budget.min_concurrency
    return circuit_breaker_pb2.CircuitBreakers(thresholds=[thresholds])


def adaptive_throttling_metadata(config: AdaptiveThrottlingConfig) -> dict[str, object] | None:
    """Envoy has no per-cluster client-side throttling: our metadata carries it."""
    return None if config == AdaptiveThrottlingConfig() else adaptive_throttling_block(config)
