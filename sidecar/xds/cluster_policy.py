"""A Cluster's policy fields back into the model: load balancing, health checks, outlier
detection, circuit breakers, retry budget, and our metadata (adaptive throttling, the
load-balancing details Envoy has no field for). The mapping is the control plane's
(``control_plane/xds/cluster_policy_xds.py``), read in reverse.
"""

from __future__ import annotations

from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import base_pb2, health_check_pb2
from envoy.extensions.load_balancing_policies.least_request.v3 import least_request_pb2
from envoy.extensions.load_balancing_policies.maglev.v3 import maglev_pb2
from envoy.extensions.load_balancing_policies.random.v3 import random_pb2
from envoy.extensions.load_balancing_policies.ring_hash.v3 import ring_hash_pb2
from envoy.extensions.load_balancing_policies.round_robin.v3 import round_robin_pb2

from pilotfish.config.cluster_policy import (
    HashOn,
    HealthCheckConfig,
    HealthCheckType,
    LbKind,
    LbPolicy,
    OutlierDetectionConfig,
    SlowStartConfig,
)
from pilotfish.config.errors import ConfigError
from pilotfish.config.route_policy import (
    CircuitBreakerConfig,
    ClusterResilience,
    RetryBudgetConfig,
)
from pilotfish.config.route_policy_yaml import parse_adaptive_throttling
from sidecar.xds.common import OurMetadata, seconds, type_name, unpack, unsupported

Cluster = cluster_pb2.Cluster
CLUSTER_METADATA_KEYS = {"protocol", "load_balancing", "health_check", "adaptive_throttling"}
_ENUM_KIND = {
    Cluster.ROUND_ROBIN: LbKind.WEIGHTED_ROUND_ROBIN,  # Envoy's round robin honours weights
    Cluster.LEAST_REQUEST: LbKind.LEAST_REQUEST,
    Cluster.RANDOM: LbKind.RANDOM,
    Cluster.RING_HASH: LbKind.RING_HASH,
    Cluster.MAGLEV: LbKind.MAGLEV,
}
# What our metadata may refine each Envoy policy into.
_REFINES = {
    LbKind.WEIGHTED_ROUND_ROBIN: (LbKind.ROUND_ROBIN,),
    LbKind.RANDOM: (LbKind.WEIGHTED_RANDOM,),
    LbKind.LEAST_REQUEST: (LbKind.PEAK_EWMA, LbKind.LEAST_CONNECTIONS),
}
_TYPED_KIND = {
    round_robin_pb2.RoundRobin: LbKind.WEIGHTED_ROUND_ROBIN,
    least_request_pb2.LeastRequest: LbKind.LEAST_REQUEST,
    random_pb2.Random: LbKind.RANDOM,
    ring_hash_pb2.RingHash: LbKind.RING_HASH,
    maglev_pb2.Maglev: LbKind.MAGLEV,
}


@dataclass(frozen=True, slots=True)
class ClusterPolicies:
    lb_policy: LbPolicy
    health_check: HealthCheckConfig | None
    outlier_detection: OutlierDetectionConfig | None
    resilience: ClusterResilience


def translate_cluster_policies(cluster: cluster_pb2.Cluster, path: str) -> ClusterPolicies:
    ours = OurMetadata(cluster.metadata, path, CLUSTER_METADATA_KEYS)
    checks = list(cluster.health_checks)
    if len(checks) > 1:
        raise ConfigError(f"{path}.health_checks", "at most one health check is supported")
    initially_healthy = False
    if ours.has("health_check"):
        block = ours.node("health_check").mapping({"initially_healthy"})
        initially_healthy = block.get("initially_healthy").as_bool(False)
    resilience = _resilience(cluster, path)
    if ours.has("adaptive_throttling"):
        throttling = parse_adaptive_throttling(ours.node("adaptive_throttling"))
        resilience = ClusterResilience(
            resilience.circuit_breakers, resilience.retry_budget, throttling
        )
    return ClusterPolicies(
        lb_policy=_lb_policy(cluster, path, ours),
        health_check=(
            _health_check(checks[0], f"{path}.health_checks[0]", initially_healthy)
            if checks else None
        ),
        outlier_detection=(
            _outlier_detection(cluster.outlier_detection, f"{path}.outlier_detection")
            if cluster.HasField("outlier_detection") else None
        ),
        resilience=resilience,
    )


# ---------------------------------------------------------------- load balancing


def _lb_policy(cluster: cluster_pb2.Cluster, path: str, ours: OurMetadata) -> LbPolicy:
    d = LbPolicy()
    values: dict[str, object] = {}
    if cluster.HasField("load_balancing_policy"):
        # Envoy and gRPC take the first policy they support, and ignore `lb_policy`.
        kind = _typed_policy(cluster.load_balancing_policy, f"{path}.load_balancing_policy",
                             values)
    else:
        if cluster.lb_policy not in _ENUM_KIND:
            raise ConfigError(f"{path}.lb_policy",
                              "only ROUND_ROBIN, LEAST_REQUEST, RANDOM, RING_HASH, MAGLEV")
        kind = _ENUM_KIND[cluster.lb_policy]
        _classic_configs(cluster, path, kind, values)
    if cluster.HasField("common_lb_config"):
        common = cluster.common_lb_config
        unsupported(common, f"{path}.common_lb_config", {"healthy_panic_threshold"})
        values["panic_threshold"] = common.healthy_panic_threshold.value
    hash_on, hash_key = d.hash_on, d.hash_key
    if ours.has("load_balancing"):
        block = ours.node("load_balancing").mapping(
            {"policy", "hash_on", "hash_key", "ewma_decay", "ewma_default_rtt"}
        )
        if block.has("policy"):
            choices = tuple(k.value for kinds in _REFINES.values() for k in kinds)
            refined = LbKind(block.get("policy").as_choice(choices))
            if refined not in _REFINES.get(kind, ()):
                raise block.get("policy").error(f"{refined.value} does not refine {kind.value}")
            kind = refined
        if block.has("hash_on") or block.has("hash_key"):
            if not kind.hashing:
                raise block.error("hash_on and hash_key are only for ring_hash and maglev")
            hash_on = HashOn(block.get("hash_on").as_choice(tuple(h.value for h in HashOn)))
            if hash_on in (HashOn.HEADER, HashOn.COOKIE):
                hash_key = block.require("hash_key").as_str()
        for name in ("ewma_decay", "ewma_default_rtt"):
            if block.has(name):
                if kind is not LbKind.PEAK_EWMA:
                    raise block.get(name).error("only for the peak_ewma policy")
                values[name] = block.get(name).as_duration()
    if values.get("slow_start") is not None and kind is not LbKind.WEIGHTED_ROUND_ROBIN:
        raise ConfigError(f"{path}.round_robin_lb_config.slow_start_config",
                          f"only for weighted_round_robin, not {kind.value}")
    policy = LbPolicy(kind=kind, hash_on=hash_on, hash_key=hash_key, **values)  # type: ignore[arg-type]
    if policy.choice_count < 2 and kind in (LbKind.LEAST_REQUEST, LbKind.PEAK_EWMA):
        raise ConfigError(f"{path}.least_request_lb_config.choice_count", "must be at least 2")
    if policy.maximum_ring_size < policy.minimum_ring_size:
        raise ConfigError(f"{path}.ring_hash_lb_config", "maximum below minimum ring size")
    return policy


def _classic_configs(
    cluster: cluster_pb2.Cluster, path: str, kind: LbKind, values: dict[str, object]
) -> None:
    configs = {"least_request_lb_config": LbKind.LEAST_REQUEST,
               "ring_hash_lb_config": LbKind.RING_HASH, "maglev_lb_config": LbKind.MAGLEV}
    for name, needs in configs.items():
        if cluster.HasField(name) and kind is not needs:
            raise ConfigError(f"{path}.{name}", f"only with lb_policy {needs.name}")
    if cluster.HasField("round_robin_lb_config"):
        rr_path = f"{path}.round_robin_lb_config"
        if kind is not LbKind.WEIGHTED_ROUND_ROBIN:
            raise ConfigError(rr_path, "only with lb_policy ROUND_ROBIN")
        unsupported(cluster.round_robin_lb_config, rr_path, {"slow_start_config"})
        values["slow_start"] = _slow_start(
            cluster.round_robin_lb_config.slow_start_config, f"{rr_path}.slow_start_config"
        )
    if kind is LbKind.LEAST_REQUEST:
        _least_request(cluster.least_request_lb_config, f"{path}.least_request_lb_config", values)
    elif kind is LbKind.RING_HASH:
        ring = cluster.ring_hash_lb_config
        ring_path = f"{path}.ring_hash_lb_config"
        unsupported(ring, ring_path, {"minimum_ring_size", "maximum_ring_size", "hash_function"})
        if ring.hash_function != Cluster.RingHashLbConfig.XX_HASH:
            raise ConfigError(f"{ring_path}.hash_function", "only XX_HASH is supported")
        _ring_sizes(ring, values)
    elif kind is LbKind.MAGLEV and cluster.maglev_lb_config.HasField("table_size"):
        values["maglev_table_size"] = cluster.maglev_lb_config.table_size.value


def _slow_start(config: cluster_pb2.Cluster.SlowStartConfig, path: str) -> SlowStartConfig:
    unsupported(config, path, {"slow_start_window", "aggression", "min_weight_percent"})
    window = seconds(config.slow_start_window)
    if window <= 0:
        raise ConfigError(f"{path}.slow_start_window", "must be above 0")
    aggression = config.aggression.default_value if config.HasField("aggression") else 1.0
    if aggression <= 0:
        raise ConfigError(f"{path}.aggression", "must be above 0")
    minimum = (
        config.min_weight_percent.value if config.HasField("min_weight_percent") else 10.0
    )
    if not 0 <= minimum <= 100:
        raise ConfigError(f"{path}.min_weight_percent", "must be 0 to 100")
    return SlowStartConfig(window=window, aggression=aggression, min_weight_percent=minimum)


def _least_request(
    config: cluster_pb2.Cluster.LeastRequestLbConfig | least_request_pb2.LeastRequest,
    path: str,
    values: dict[str, object],
) -> None:
    unsupported(config, path, {"choice_count", "active_request_bias"})
    if config.HasField("choice_count"):
        values["choice_count"] = config.choice_count.value
    if config.HasField("active_request_bias"):
        values["active_request_bias"] = config.active_request_bias.default_value


def _ring_sizes(
    ring: cluster_pb2.Cluster.RingHashLbConfig | ring_hash_pb2.RingHash,
    values: dict[str, object],
) -> None:
    if ring.HasField("minimum_ring_size"):
        values["minimum_ring_size"] = ring.minimum_ring_size.value
    if ring.HasField("maximum_ring_size"):
        values["maximum_ring_size"] = ring.maximum_ring_size.value


def _typed_policy(
    lbp: cluster_pb2.LoadBalancingPolicy, path: str, values: dict[str, object]
) -> LbKind:
    for i, entry in enumerate(lbp.policies):
        packed = entry.typed_extension_config.typed_config
        entry_path = f"{path}.policies[{i}].typed_extension_config.typed_config"
        for message_type, kind in _TYPED_KIND.items():
            if type_name(packed) != message_type.DESCRIPTOR.full_name:
                continue
            message = message_type()
            unpack(entry_path, packed, message)
            if isinstance(message, least_request_pb2.LeastRequest):
                _least_request(message, entry_path, values)
            elif isinstance(message, ring_hash_pb2.RingHash):
                unsupported(message, entry_path, {"minimum_ring_size", "maximum_ring_size",
                                                  "hash_function"})
                _ring_sizes(message, values)
            elif isinstance(message, maglev_pb2.Maglev):
                unsupported(message, entry_path, {"table_size"})
                if message.HasField("table_size"):
                    values["maglev_table_size"] = message.table_size.value
            else:
                unsupported(message, entry_path, set())
            return kind
    raise ConfigError(f"{path}.policies", "none of these policies is supported")


# ---------------------------------------------------------------- health


def _health_check(
    check: health_check_pb2.HealthCheck, path: str, initially_healthy: bool
) -> HealthCheckConfig:
    unsupported(check, path, {
        "timeout", "interval", "interval_jitter", "unhealthy_threshold", "healthy_threshold",
        "unhealthy_interval", "http_health_check", "grpc_health_check",
    })
    for name in ("timeout", "interval", "unhealthy_threshold", "healthy_threshold"):
        if not check.HasField(name):
            raise ConfigError(f"{path}.{name}", "required")
    d = HealthCheckConfig()
    kind = check.WhichOneof("health_checker")
    if kind == "http_health_check":
        http = check.http_health_check
        http_path = f"{path}.http_health_check"
        unsupported(http, http_path, {"host", "path", "expected_statuses"})
        if not http.path.startswith("/"):
            raise ConfigError(f"{http_path}.path", "expected a path starting with /")
        statuses = tuple((r.start, r.end) for r in http.expected_statuses)
        for i, (start, end) in enumerate(statuses):
            if not 100 <= start < end <= 600:
                raise ConfigError(f"{http_path}.expected_statuses[{i}]",
                                  "expected a range within [100, 600)")
        type_, check_path, host = HealthCheckType.HTTP, http.path, http.host or None
        service_name = ""
    elif kind == "grpc_health_check":
        unsupported(check.grpc_health_check, f"{path}.grpc_health_check", {"service_name"})
        type_, check_path, host, statuses = HealthCheckType.GRPC, d.path, None, ()
        service_name = check.grpc_health_check.service_name
    else:
        raise ConfigError(f"{path}.health_checker", "only http and grpc health checks")
    timeout, interval = seconds(check.timeout), seconds(check.interval)
    if timeout <= 0 or interval <= 0:
        raise ConfigError(f"{path}.{'timeout' if timeout <= 0 else 'interval'}",
                          "must be more than 0")
    return HealthCheckConfig(
        type=type_,
        path=check_path,
        host=host,
        expected_statuses=statuses or d.expected_statuses,
        service_name=service_name,
        interval=interval,
        unhealthy_interval=(
            seconds(check.unhealthy_interval) if check.HasField("unhealthy_interval") else None
        ),
        interval_jitter=seconds(check.interval_jitter),
        timeout=timeout,
        unhealthy_threshold=max(1, check.unhealthy_threshold.value),
        healthy_threshold=max(1, check.healthy_threshold.value),
        initially_healthy=initially_healthy,
    )


def _outlier_detection(
    od: outlier_detection_pb2.OutlierDetection, path: str
) -> OutlierDetectionConfig:
    names = set(OutlierDetectionConfig.__slots__)
    unsupported(od, path, names)
    d = OutlierDetectionConfig()
    values: dict[str, float | int] = {}
    # A plain bool: false when unset, Envoy's default (our control plane always sets it).
    values["split_external_local_origin_errors"] = od.split_external_local_origin_errors
    for name in names - {"split_external_local_origin_errors"}:
        if od.HasField(name):
            field = getattr(od, name)
            default = getattr(d, name)
            values[name] = seconds(field) if isinstance(default, float) else int(field.value)
    config = OutlierDetectionConfig(**values)  # type: ignore[arg-type]
    for name in names:
        value = getattr(config, name)
        if (name.startswith("enforcing") or name.endswith("percent")
                or name == "failure_percentage_threshold") and value > 100:
            raise ConfigError(f"{path}.{name}", "must be at most 100")
    return config


# ---------------------------------------------------------------- limits


def _resilience(cluster: cluster_pb2.Cluster, path: str) -> ClusterResilience:
    """Without ``circuit_breakers`` a cluster gets Pilotfish's defaults (a retry budget on);
    thresholds without a ``retry_budget`` mean none, so ``max_retries`` applies (Envoy's)."""
    if not cluster.HasField("circuit_breakers"):
        return ClusterResilience()
    cb_path = f"{path}.circuit_breakers"
    unsupported(cluster.circuit_breakers, cb_path, {"thresholds"})
    d = CircuitBreakerConfig()
    limits, budget = d, None
    for i, t in enumerate(cluster.circuit_breakers.thresholds):
        t_path = f"{cb_path}.thresholds[{i}]"
        if t.priority != base_pb2.DEFAULT:
            raise ConfigError(f"{t_path}.priority", "only DEFAULT is supported")
        unsupported(t, t_path, {"priority", "max_connections", "max_pending_requests",
                                "max_requests", "max_retries", "retry_budget"})

        def value(name: str, default: int, t: cluster_pb2.CircuitBreakers.Thresholds = t) -> int:
            return int(getattr(t, name).value) if t.HasField(name) else default

        limits = CircuitBreakerConfig(
            max_connections=value("max_connections", d.max_connections),
            max_pending_requests=value("max_pending_requests", d.max_pending_requests),
            max_requests=value("max_requests", d.max_requests),
            max_retries=value("max_retries", d.max_retries),
        )
        if t.HasField("retry_budget"):
            rb, rd = t.retry_budget, RetryBudgetConfig()
            budget = RetryBudgetConfig(
                percent=rb.budget_percent.value if rb.HasField("budget_percent") else rd.percent,
                min_concurrency=(rb.min_retry_concurrency.value
                                 if rb.HasField("min_retry_concurrency") else rd.min_concurrency),
            )
    return ClusterResilience(circuit_breakers=limits, retry_budget=budget)
