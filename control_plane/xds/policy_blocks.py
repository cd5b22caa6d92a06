"""Policies Envoy has no field for, written back as the mesh file's own YAML blocks.

Our metadata (``filter_metadata["pilotfish"]``) carries these blocks in a
``google.protobuf.Struct``, and the sidecar reads them with the very parsers of the mesh file
and bootstrap (``pilotfish.config.route_policy_yaml``), so there is one schema and one set of
checks. Durations are written as strings (``"0.25s"``): a Struct has doubles only, and the
parsers want durations with a unit.
"""

from __future__ import annotations

import base64

from pilotfish.config.matchers import HeaderMatcher
from pilotfish.config.route_policy import (
    AdaptiveThrottlingConfig,
    FallbackConfig,
    FaultConfig,
    ListenerLimits,
    LoadSheddingConfig,
    RateLimitConfig,
)


def duration_text(seconds: float) -> str:
    """The shortest text that parses back to exactly ``seconds``."""
    text = repr(float(seconds))
    if "e" in text:
        text = f"{seconds:.9f}".rstrip("0").rstrip(".")
    return f"{text}s"


def header_block(h: HeaderMatcher) -> dict[str, object]:
    block: dict[str, object] = {"name": h.name}
    if h.exact is not None:
        block["exact"] = h.exact
    elif h.prefix is not None:
        block["prefix"] = h.prefix
    elif h.regex is not None:
        block["regex"] = h.regex.pattern
    elif h.present is not None:
        block["present"] = h.present
    if h.invert:
        block["invert"] = True
    return block


def fault_block(fault: FaultConfig) -> dict[str, object]:
    block: dict[str, object] = {}
    if fault.delay is not None:
        block["delay"] = {"duration": duration_text(fault.delay.duration),
                          "percentage": fault.delay.percentage}
    if fault.abort is not None:
        abort: dict[str, object] = {"percentage": fault.abort.percentage}
        if fault.abort.http_status is not None:
            abort["http_status"] = fault.abort.http_status
        if fault.abort.grpc_status is not None:
            abort["grpc_status"] = fault.abort.grpc_status
        block["abort"] = abort
    if fault.header is not None:
        block["header"] = header_block(fault.header)
    return block


def rate_limit_block(limit: RateLimitConfig) -> dict[str, object]:
    block: dict[str, object] = {
        "max_tokens": limit.max_tokens,
        "tokens_per_fill": limit.tokens_per_fill,
        "fill_interval": duration_text(limit.fill_interval),
        "max_callers": limit.max_callers,
    }
    if limit.per_caller_header is not None:
        block["per_caller"] = {"header": limit.per_caller_header}
    elif limit.per_source:
        block["per_caller"] = {"source_address": True}
    return block


def fallback_block(fallback: FallbackConfig) -> dict[str, object]:
    """``response.headers`` is a list of ``[name, value]`` pairs: a Struct keeps no order."""
    block: dict[str, object] = {"when": sorted(t.value for t in fallback.when)}
    if fallback.cluster is not None:
        block["cluster"] = fallback.cluster
        return block
    response = fallback.response
    assert response is not None
    reply: dict[str, object] = {
        "status": response.status,
        "headers": [[name, value] for name, value in response.headers],
        "body": response.body,
        "grpc_message": response.grpc_message,
    }
    if response.grpc_status is not None:
        reply["grpc_status"] = response.grpc_status
    if response.grpc_response is not None:
        # JSON was encoded when the mesh file was read: the sidecar needs no descriptors.
        reply["grpc_response"] = {"base64": base64.b64encode(response.grpc_response).decode()}
    block["response"] = reply
    return block


def adaptive_throttling_block(config: AdaptiveThrottlingConfig) -> dict[str, object]:
    return {
        "enabled": config.enabled,
        "k": config.k,
        "window": duration_text(config.window),
        "buckets": config.buckets,
        "max_rejection_probability": round(config.max_rejection_probability * 100, 9),
        "min_requests": config.min_requests,
    }


def load_shedding_block(config: LoadSheddingConfig) -> dict[str, object]:
    block: dict[str, object] = {
        "enabled": config.enabled,
        "max_queue_delay": duration_text(config.max_queue_delay),
        "queue_interval": duration_text(config.queue_interval),
        "min_concurrency": config.min_concurrency,
        # The file says percent; the model holds a fraction.
        "cpu_threshold": round(config.cpu_threshold * 100, 9),
        "window": duration_text(config.window),
        "buckets": config.buckets,
        "cool_down": duration_text(config.cool_down),
        "cpu_decay": config.cpu_decay,
    }
    if config.cgroup is not None:
        block["cgroup"] = config.cgroup
    return block


def listener_limits_block(limits: ListenerLimits) -> dict[str, object]:
    block: dict[str, object] = {}
    if limits.max_downstream_connections is not None:
        block["max_downstream_connections"] = limits.max_downstream_connections
    if limits.max_requests_per_connection is not None:
        block["max_requests_per_connection"] = limits.max_requests_per_connection
    return block
