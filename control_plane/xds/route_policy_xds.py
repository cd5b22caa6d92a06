"""A route's resilience policy as Envoy Route fields, and our metadata for the rest.

=====================  ====================================================================
mesh field             Envoy field
=====================  ====================================================================
retry                  ``route.retry_policy``: ``retry_on`` (our condition names are
                       Envoy's), ``num_retries``, ``per_try_timeout``, ``retry_back_off``,
                       ``retriable_status_codes``. Only when the route's retry differs from
                       the default, which a route without ``retry_policy`` means.
                       ``retry: off`` is ``retry_on: ""`` (no condition retries).
rate_limit             ``typed_per_filter_config["envoy.filters.http.local_ratelimit"]``,
                       a ``LocalRateLimit`` token bucket wrapped in an optional
                       ``FilterConfig`` (gRPC clients skip it). A per-caller limit has no
                       Envoy equivalent that fits (descriptors need every value listed) and
                       goes in metadata whole, so Envoy does not enforce one shared bucket.
fault                  ``typed_per_filter_config["envoy.filters.http.fault"]``, an
                       ``HTTPFault`` (delay, abort; gRPC clients apply it too). With both
                       statuses, Envoy gets ``grpc_status`` and metadata the HTTP one. A
                       fault gated by a header goes in metadata whole: gRPC clients ignore
                       ``HTTPFault.headers`` and would fault every call.
fallback               metadata only
=====================  ====================================================================

Metadata: ``Route.metadata.filter_metadata["pilotfish"]`` with ``retry_non_idempotent``
(true), ``rate_limit`` (per caller), ``fault`` (header-gated), ``fault_abort_http_status``
and ``fallback``; the blocks are the mesh file's own (``policy_blocks``).
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.common.fault.v3 import fault_pb2 as common_fault_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.type.v3 import percent_pb2, token_bucket_pb2
from google.protobuf import any_pb2, wrappers_pb2

from control_plane.xds.policy_blocks import fallback_block, fault_block, rate_limit_block
from control_plane.xds.proto_util import duration, pack
from pilotfish.config.route_policy import (
    FaultConfig,
    RateLimitConfig,
    RetryPolicy,
    RoutePolicy,
)

FAULT_FILTER = "envoy.filters.http.fault"
RATE_LIMIT_FILTER = "envoy.filters.http.local_ratelimit"
RATE_LIMIT_STAT_PREFIX = "http_local_rate_limiter"
# Percentages travel as parts per million: four decimals of a percent survive the trip.
_PER_PERCENT = 10_000


def retry_policy(retry: RetryPolicy) -> route_components_pb2.RetryPolicy | None:
    if retry == RetryPolicy():
        return None
    if retry.attempts == 0:
        # No condition: nothing retries (and no num_retries 0, which gRPC may reject). The per-try
        # timeout still means something, for the one try.
        bare = route_components_pb2.RetryPolicy(retry_on="")
        if retry.per_try_timeout is not None:
            bare.per_try_timeout.CopyFrom(duration(retry.per_try_timeout))
        return bare
    policy = route_components_pb2.RetryPolicy(
        retry_on=",".join(sorted(c.value for c in retry.retry_on)),
        num_retries=wrappers_pb2.UInt32Value(value=retry.attempts),
        retriable_status_codes=sorted(retry.retriable_status_codes),
    )
    if retry.per_try_timeout is not None:
        policy.per_try_timeout.CopyFrom(duration(retry.per_try_timeout))
    policy.retry_back_off.base_interval.CopyFrom(duration(retry.backoff.base))
    policy.retry_back_off.max_interval.CopyFrom(duration(retry.backoff.max))
    return policy


def fractional(percentage: float) -> percent_pb2.FractionalPercent:
    return percent_pb2.FractionalPercent(
        numerator=round(percentage * _PER_PERCENT),
        denominator=percent_pb2.FractionalPercent.MILLION,
    )


def local_rate_limit(config: RateLimitConfig | None) -> local_rate_limit_pb2.LocalRateLimit:
    """The route's token bucket; with ``None`` the listener-level (disabled) filter config."""
    limit = local_rate_limit_pb2.LocalRateLimit(stat_prefix=RATE_LIMIT_STAT_PREFIX)
    if config is None:
        return limit
    limit.token_bucket.CopyFrom(token_bucket_pb2.TokenBucket(
        max_tokens=config.max_tokens,
        tokens_per_fill=wrappers_pb2.UInt32Value(value=config.tokens_per_fill),
        fill_interval=duration(config.fill_interval),
    ))
    # Envoy's filter is off unless told otherwise; enable and enforce it for every request.
    for runtime in (limit.filter_enabled, limit.filter_enforced):
        runtime.CopyFrom(base_pb2.RuntimeFractionalPercent(
            default_value=percent_pb2.FractionalPercent(
                numerator=100, denominator=percent_pb2.FractionalPercent.HUNDRED
            ),
            runtime_key=f"{RATE_LIMIT_STAT_PREFIX}_enabled",
        ))
    return limit


def http_fault(config: FaultConfig | None) -> fault_pb2.HTTPFault:
    fault = fault_pb2.HTTPFault()
    if config is None:
        return fault
    if config.delay is not None:
        fault.delay.CopyFrom(common_fault_pb2.FaultDelay(
            fixed_delay=duration(config.delay.duration),
            percentage=fractional(config.delay.percentage),
        ))
    if config.abort is not None:
        fault.abort.percentage.CopyFrom(fractional(config.abort.percentage))
        if config.abort.grpc_status is not None:
            fault.abort.grpc_status = config.abort.grpc_status
        else:
            assert config.abort.http_status is not None
            fault.abort.http_status = config.abort.http_status
    return fault


def per_filter_config(policy: RoutePolicy) -> dict[str, any_pb2.Any]:
    configs: dict[str, any_pb2.Any] = {}
    fault = _envoy_fault(policy)
    if fault is not None:
        configs[FAULT_FILTER] = pack(http_fault(fault))
    limit = policy.rate_limit
    if limit is not None and not _per_caller(limit):
        configs[RATE_LIMIT_FILTER] = pack(route_components_pb2.FilterConfig(
            config=pack(local_rate_limit(limit)), is_optional=True
        ))
    return configs


def route_metadata(policy: RoutePolicy) -> dict[str, object]:
    metadata: dict[str, object] = {}
    if policy.retry.retry_non_idempotent and policy.retry.attempts > 0:
        metadata["retry_non_idempotent"] = True
    limit = policy.rate_limit
    if limit is not None and _per_caller(limit):
        metadata["rate_limit"] = rate_limit_block(limit)
    fault = policy.fault
    if fault is not None and fault.header is not None:
        metadata["fault"] = fault_block(fault)
    elif fault is not None and fault.abort is not None:
        abort = fault.abort
        if abort.grpc_status is not None and abort.http_status is not None:
            metadata["fault_abort_http_status"] = abort.http_status
    if policy.fallback is not None:
        metadata["fallback"] = fallback_block(policy.fallback)
    if policy.max_concurrent_requests is not None:
        # Envoy has no per-route concurrency limit: our metadata carries the bulkhead.
        metadata["max_concurrent_requests"] = policy.max_concurrent_requests
    return metadata


def _per_caller(limit: RateLimitConfig) -> bool:
    return limit.per_caller_header is not None or limit.per_source


def _envoy_fault(policy: RoutePolicy) -> FaultConfig | None:
    """A fault gated by a header stays out of Envoy's fields: gRPC clients ignore
    ``HTTPFault.headers`` and would fault every call."""
    fault = policy.fault
    return fault if fault is not None and fault.header is None else None


def uses_filters(policies: list[RoutePolicy]) -> tuple[bool, bool]:
    """Whether any of these routes needs the fault filter, and the local rate limit filter."""
    fault = any(_envoy_fault(p) is not None for p in policies)
    limit = any(p.rate_limit is not None and not _per_caller(p.rate_limit) for p in policies)
    return fault, limit
