"""A Route's policy fields back into the model's ``RoutePolicy``, the HTTP filters allowed
before the router, and a listener's load shedding. The mapping is the control plane's
(``control_plane/xds/route_policy_xds.py``), read in reverse.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2

from pilotfish.config.errors import ConfigError
from pilotfish.config.route_policy import (
    FallbackConfig,
    FaultAbort,
    FaultConfig,
    FaultDelay,
    ListenerLimits,
    LoadSheddingConfig,
    RateLimitConfig,
    RetryBackoff,
    RetryOn,
    RetryPolicy,
    RoutePolicy,
)
from pilotfish.config.route_policy_yaml import (
    parse_fallback,
    parse_fault,
    parse_listener_limits,
    parse_load_shedding,
    parse_max_concurrent_requests,
    parse_rate_limit,
)
from sidecar.xds.authn import JWT_TYPE, RBAC_TYPE, ROUTE_SECURITY_TYPES
from sidecar.xds.common import OurMetadata, percent, seconds, type_name, unpack, unsupported

ROUTER_TYPE = "envoy.extensions.filters.http.router.v3.Router"
FAULT_TYPE = fault_pb2.HTTPFault.DESCRIPTOR.full_name
RATE_LIMIT_TYPE = local_rate_limit_pb2.LocalRateLimit.DESCRIPTOR.full_name
FILTER_CONFIG_TYPE = route_components_pb2.FilterConfig.DESCRIPTOR.full_name
ROUTE_METADATA_KEYS = {"retry_non_idempotent", "rate_limit", "fault", "fault_abort_http_status",
                       "fallback", "max_concurrent_requests"}
LISTENER_METADATA_KEYS = {"load_shedding", "listener_limits", "jwt_providers"}
_RETRY_ON = {c.value: c for c in RetryOn}


# ---------------------------------------------------------------- the HCM's filters


def check_http_filters(hcm: hcm_pb2.HttpConnectionManager, path: str) -> None:
    """Router last; before it only the fault and local rate limit filters (configured per
    route: a listener-wide fault or bucket has no place in the model), JWT and RBAC (read by
    ``sidecar.xds.authn``), or optional ones."""
    filters = list(hcm.http_filters)
    if not filters or type_name(filters[-1].typed_config) != ROUTER_TYPE:
        raise ConfigError(f"{path}.http_filters", "the last filter must be the router")
    for i, http_filter in enumerate(filters):
        name = type_name(http_filter.typed_config)
        f_path = f"{path}.http_filters[{i}].typed_config"
        if name == ROUTER_TYPE:
            if i != len(filters) - 1:
                raise ConfigError(f"{path}.http_filters[{i}]", "the router must be last")
        elif name == FAULT_TYPE:
            fault = fault_pb2.HTTPFault()
            unpack(f_path, http_filter.typed_config, fault)
            unsupported(fault, f_path, set())  # an empty config: faults come per route
        elif name == RATE_LIMIT_TYPE:
            limit = local_rate_limit_pb2.LocalRateLimit()
            unpack(f_path, http_filter.typed_config, limit)
            unsupported(limit, f_path, {"stat_prefix"})
        elif name not in (JWT_TYPE, RBAC_TYPE) and not http_filter.is_optional:
            raise ConfigError(f"{path}.http_filters[{i}]", f"unsupported filter {name!r}")


# ---------------------------------------------------------------- per route


def translate_route_policy(
    route: route_components_pb2.Route, action: route_components_pb2.RouteAction, path: str
) -> RoutePolicy:
    ours = OurMetadata(route.metadata, path, ROUTE_METADATA_KEYS)
    retry = RetryPolicy()
    if action.HasField("retry_policy"):
        retry = _retry(action.retry_policy, f"{path}.route.retry_policy", ours)
    elif ours.has("retry_non_idempotent"):
        raise ours.node("retry_non_idempotent").error("needs a route.retry_policy")
    for i, hash_policy in enumerate(action.hash_policy):
        _check_hash_policy(hash_policy, f"{path}.route.hash_policy[{i}]")
    fault, limit = _per_filter(route.typed_per_filter_config, f"{path}.typed_per_filter_config")
    if ours.has("fault"):
        if fault is not None:
            raise ours.node("fault").error("not together with an envoy.filters.http.fault config")
        fault = parse_fault(ours.node("fault"))
    if ours.has("fault_abort_http_status"):
        node = ours.node("fault_abort_http_status")
        if fault is None or fault.abort is None or fault.abort.grpc_status is None:
            raise node.error("only with a fault abort by grpc_status")
        abort = FaultAbort(node.as_int(minimum=200, maximum=599), fault.abort.grpc_status,
                           fault.abort.percentage)
        fault = FaultConfig(delay=fault.delay, abort=abort, header=fault.header)
    if ours.has("rate_limit"):
        if limit is not None:
            raise ours.node("rate_limit").error("not together with a local rate limit config")
        limit = parse_rate_limit(ours.node("rate_limit"))
    return RoutePolicy(
        retry=retry,
        rate_limit=limit,
        fault=fault,
        fallback=_fallback(ours) if ours.has("fallback") else None,
        max_concurrent_requests=(
            parse_max_concurrent_requests(ours.node("max_concurrent_requests"))
            if ours.has("max_concurrent_requests") else None
        ),
    )


def _retry(policy: route_components_pb2.RetryPolicy, path: str, ours: OurMetadata) -> RetryPolicy:
    unsupported(policy, path, {"retry_on", "num_retries", "per_try_timeout",
                               "retriable_status_codes", "retry_back_off"})
    names = [n.strip() for n in policy.retry_on.split(",") if n.strip()]
    per_try = (seconds(policy.per_try_timeout) or None
               if policy.HasField("per_try_timeout") else None)
    if not names:  # no condition: nothing is ever retried
        return RetryPolicy(attempts=0, per_try_timeout=per_try)
    conditions = set()
    for name in names:
        if name not in _RETRY_ON:
            raise ConfigError(f"{path}.retry_on", f"unsupported condition {name!r}")
        conditions.add(_RETRY_ON[name])
    attempts = policy.num_retries.value if policy.HasField("num_retries") else 1
    if attempts > 10:
        raise ConfigError(f"{path}.num_retries", "at most 10")
    backoff = RetryBackoff()
    if policy.HasField("retry_back_off"):
        b = policy.retry_back_off
        if seconds(b.base_interval) <= 0:
            raise ConfigError(f"{path}.retry_back_off.base_interval", "must be more than 0")
        base = seconds(b.base_interval)
        # Envoy's default ceiling is ten times the base.
        ceiling = seconds(b.max_interval) if b.HasField("max_interval") else 10 * base
        if ceiling < base:
            raise ConfigError(f"{path}.retry_back_off.max_interval", "must not be below base")
        backoff = RetryBackoff(base=base, max=ceiling)
    codes = frozenset(int(c) for c in policy.retriable_status_codes)
    for code in codes:
        if not 200 <= code <= 599:
            raise ConfigError(f"{path}.retriable_status_codes", f"{code} is not an HTTP status")
    non_idempotent = False
    if ours.has("retry_non_idempotent"):
        non_idempotent = ours.node("retry_non_idempotent").as_bool()
    return RetryPolicy(
        attempts=attempts,
        retry_on=frozenset(conditions),
        per_try_timeout=per_try,
        backoff=backoff,
        retriable_status_codes=codes,
        retry_non_idempotent=non_idempotent,
    )


def _check_hash_policy(policy: route_components_pb2.RouteAction.HashPolicy, path: str) -> None:
    """The model keeps what to hash on the cluster (our metadata); routes just must not ask
    for something the balancers cannot do."""
    kind = policy.WhichOneof("policy_specifier")
    if kind == "header":
        unsupported(policy.header, f"{path}.header", {"header_name"})
    elif kind == "cookie":
        unsupported(policy.cookie, f"{path}.cookie", {"name"})
    elif kind == "connection_properties":
        unsupported(policy.connection_properties, f"{path}.connection_properties",
                    {"source_ip"})
    else:
        raise ConfigError(f"{path}.{kind or 'policy_specifier'}", "not supported")


def _per_filter(
    configs: Mapping[str, any_pb2.Any], path: str
) -> tuple[FaultConfig | None, RateLimitConfig | None]:
    fault: FaultConfig | None = None
    limit: RateLimitConfig | None = None
    for name in sorted(configs):
        packed, f_path, optional = configs[name], f"{path}[{name}]", False
        if type_name(packed) == FILTER_CONFIG_TYPE:
            wrapper = route_components_pb2.FilterConfig()
            unpack(f_path, packed, wrapper)
            if wrapper.disabled:
                raise ConfigError(f"{f_path}.disabled", "not supported")
            packed, f_path, optional = wrapper.config, f"{f_path}.config", wrapper.is_optional
        if type_name(packed) == FAULT_TYPE:
            message = fault_pb2.HTTPFault()
            unpack(f_path, packed, message)
            fault = _fault(message, f_path)
        elif type_name(packed) == RATE_LIMIT_TYPE:
            bucket = local_rate_limit_pb2.LocalRateLimit()
            unpack(f_path, packed, bucket)
            limit = _local_rate_limit(bucket, f_path)
        elif type_name(packed) in ROUTE_SECURITY_TYPES:
            continue  # read by ``sidecar.xds.authn.translate_route_security``
        elif not optional:
            raise ConfigError(f_path, f"unsupported filter config {type_name(packed)!r}")
    return fault, limit


def _fault(fault: fault_pb2.HTTPFault, path: str) -> FaultConfig | None:
    unsupported(fault, path, {"delay", "abort"})
    delay = abort = None
    if fault.HasField("delay"):
        d_path = f"{path}.delay"
        unsupported(fault.delay, d_path, {"fixed_delay", "percentage"})
        if not fault.delay.HasField("fixed_delay") or seconds(fault.delay.fixed_delay) <= 0:
            raise ConfigError(f"{d_path}.fixed_delay", "required, more than 0")
        delay = FaultDelay(seconds(fault.delay.fixed_delay),
                           percent(fault.delay.percentage, f"{d_path}.percentage"))
    if fault.HasField("abort"):
        a_path = f"{path}.abort"
        unsupported(fault.abort, a_path, {"http_status", "grpc_status", "percentage"})
        kind = fault.abort.WhichOneof("error_type")
        if kind not in ("http_status", "grpc_status"):
            raise ConfigError(f"{a_path}.error_type", "one of http_status, grpc_status")
        share = percent(fault.abort.percentage, f"{a_path}.percentage")
        if kind == "http_status":
            if not 200 <= fault.abort.http_status <= 599:
                raise ConfigError(f"{a_path}.http_status", "expected 200-599")
            abort = FaultAbort(http_status=fault.abort.http_status, percentage=share)
        else:
            if fault.abort.grpc_status > 16:
                raise ConfigError(f"{a_path}.grpc_status", "expected 0-16")
            abort = FaultAbort(grpc_status=fault.abort.grpc_status, percentage=share)
    if delay is None and abort is None:
        return None
    return FaultConfig(delay=delay, abort=abort)


def _local_rate_limit(
    limit: local_rate_limit_pb2.LocalRateLimit, path: str
) -> RateLimitConfig | None:
    unsupported(limit, path, {"stat_prefix", "token_bucket", "filter_enabled",
                              "filter_enforced"})
    if not limit.HasField("token_bucket"):
        return None
    for name in ("filter_enabled", "filter_enforced"):
        runtime: base_pb2.RuntimeFractionalPercent = getattr(limit, name)
        # Envoy's filter does nothing without both; anything but 100% we cannot do.
        if not limit.HasField(name) or percent(runtime.default_value, path) != 100:
            raise ConfigError(f"{path}.{name}", "must be 100%")
    bucket = limit.token_bucket
    interval = seconds(bucket.fill_interval)
    if bucket.max_tokens < 1 or interval <= 0:
        raise ConfigError(f"{path}.token_bucket", "needs max_tokens and a fill_interval")
    return RateLimitConfig(
        max_tokens=bucket.max_tokens,
        tokens_per_fill=bucket.tokens_per_fill.value if bucket.HasField("tokens_per_fill") else 1,
        fill_interval=interval,
    )


def _fallback(ours: OurMetadata) -> FallbackConfig:
    node = ours.node("fallback")
    value: Any = node.value
    response = value.get("response") if isinstance(value, dict) else None
    if isinstance(response, dict) and isinstance(response.get("headers"), list):
        # Sent as [name, value] pairs (a Struct keeps no order); the parser wants a mapping.
        pairs = response["headers"]
        if not all(isinstance(p, list) and len(p) == 2 for p in pairs):
            raise ConfigError(f"{node.path}.response.headers", "expected [name, value] pairs")
        value = {**value, "response": {**response, "headers": {p[0]: p[1] for p in pairs}}}
    return parse_fallback(type(node)(node.path, value))


# ---------------------------------------------------------------- per listener


def translate_listener_limits(listener: listener_pb2.Listener, path: str) -> ListenerLimits:
    ours = OurMetadata(listener.metadata, path, LISTENER_METADATA_KEYS)
    if not ours.has("listener_limits"):
        return ListenerLimits()
    block = ours.node("listener_limits").mapping(
        {"max_downstream_connections", "max_requests_per_connection"}
    )
    return parse_listener_limits(block)


def translate_load_shedding(listener: listener_pb2.Listener, path: str) -> LoadSheddingConfig:
    ours = OurMetadata(listener.metadata, path, LISTENER_METADATA_KEYS)
    if not ours.has("load_shedding"):
        return LoadSheddingConfig()
    return parse_load_shedding(ours.node("load_shedding"))
