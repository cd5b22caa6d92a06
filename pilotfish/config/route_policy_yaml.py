"""YAML readers for the resilience policy (shape in ``pilotfish.config.route_policy``).

Each reader takes the ``Node`` of its block, so errors name the whole path, e.g.
``services.greeter.routes[0].retry.attempts: expected an integer at least 0 and at most 10``.
``parse_route_policy`` and ``parse_cluster_resilience`` read their keys out of a route or service
node that has other keys too; add ``ROUTE_POLICY_KEYS`` / ``CLUSTER_RESILIENCE_KEYS`` (and
``LISTENER_POLICY_KEYS`` for ``parse_load_shedding``) to the ``mapping(...)`` sets of those nodes.
"""

from __future__ import annotations

from pilotfish.config.fields import Node
from pilotfish.config.grpc_message import parse_grpc_message
from pilotfish.config.matchers import parse_header_matcher
from pilotfish.config.route_policy import (
    GRPC_STATUS_NAMES,
    AdaptiveThrottlingConfig,
    CircuitBreakerConfig,
    ClusterResilience,
    FallbackConfig,
    FallbackTrigger,
    FaultAbort,
    FaultConfig,
    FaultDelay,
    ListenerLimits,
    LoadSheddingConfig,
    RateLimitConfig,
    RetryBackoff,
    RetryBudgetConfig,
    RetryOn,
    RetryPolicy,
    RoutePolicy,
    StaticResponse,
)

ROUTE_POLICY_KEYS = frozenset(
    {"retry", "rate_limit", "fault", "fallback", "max_concurrent_requests"}
)
CLUSTER_RESILIENCE_KEYS = frozenset({"circuit_breakers", "retry_budget", "adaptive_throttling"})
LISTENER_POLICY_KEYS = frozenset(
    {"load_shedding", "max_downstream_connections", "max_requests_per_connection"}
)
"""Inbound: on a service (its sidecar's inbound listener) or a bootstrap listener."""
MAX_RETRY_ATTEMPTS = 10
MIN_FILL_INTERVAL = 0.05
"""Envoy's local rate limit refuses a token bucket that fills more often than every 50 ms."""
_MAX_LIMIT = 1_000_000


def as_number(
    node: Node, default: float | None = None, minimum: float = 0.0, maximum: float | None = None
) -> float:
    """An int or a float within [minimum, maximum]."""
    value = node.value
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise node.error("expected a number")
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and at most {maximum:g}" if maximum is not None else ""
        raise node.error(f"expected a number at least {minimum:g}{upper}")
    return float(value)


def as_percentage(node: Node, default: float) -> float:
    return as_number(node, default, 0.0, 100.0)


def as_positive_duration(node: Node, default: float | None = None) -> float:
    seconds = node.as_duration(default)
    if seconds <= 0:
        raise node.error("expected a duration above 0")
    return seconds


def as_grpc_status(node: Node) -> int:
    """``unavailable``, ``RESOURCE_EXHAUSTED`` or a number 0-16."""
    value = node.value
    if isinstance(value, str):
        code = GRPC_STATUS_NAMES.get(value.lower().replace("_", "-"))
        if code is not None:
            return code
        raise node.error("expected a gRPC status like unavailable or 14")
    return node.as_int(minimum=0, maximum=16)


def as_http_status(node: Node, default: int | None = None) -> int:
    return node.as_int(default, minimum=200, maximum=599)


def _reject_boolean_keys(node: Node, instead: str) -> None:
    """``on:`` as a key is YAML 1.1 for ``true:``; say what to write instead."""
    if isinstance(node.value, dict) and any(isinstance(k, bool) for k in node.value):
        raise node.error(f"YAML reads the key `on` as true: write {instead}")


def _is_off(node: Node) -> bool:
    """``off``/``false`` (YAML 1.1 reads ``off`` as false) or the string ``"off"``."""
    return node.value is False or node.value == "off"


# -- per route --------------------------------------------------------------------------------


def parse_retry(node: Node) -> RetryPolicy:
    if _is_off(node):
        return RetryPolicy(attempts=0)
    _reject_boolean_keys(node, "retry_on")
    node.mapping(
        {"attempts", "retry_on", "per_try_timeout", "backoff", "retriable_status_codes",
         "retry_non_idempotent"}
    )  # fmt: skip
    default = RetryPolicy()
    on = default.retry_on
    if node.has("retry_on"):
        names = {c.value: c for c in RetryOn}
        conditions: set[RetryOn] = set()
        for element in node.get("retry_on").elements():
            condition = names.get(element.value) if isinstance(element.value, str) else None
            if condition is None:
                raise element.error(f"expected one of: {', '.join(names)}")
            conditions.add(condition)
        on = frozenset(conditions)
    codes = (
        frozenset(as_http_status(n) for n in node.get("retriable_status_codes").elements())
        if node.has("retriable_status_codes")
        else frozenset()
    )
    if codes and RetryOn.RETRIABLE_STATUS_CODES not in on:
        on = on | {RetryOn.RETRIABLE_STATUS_CODES}
    return RetryPolicy(
        attempts=node.get("attempts").as_int(default.attempts, maximum=MAX_RETRY_ATTEMPTS),
        retry_on=on,
        per_try_timeout=(
            as_positive_duration(node.get("per_try_timeout"))
            if node.has("per_try_timeout")
            else None
        ),
        backoff=parse_backoff(node.get("backoff")),
        retriable_status_codes=codes,
        retry_non_idempotent=node.get("retry_non_idempotent").as_bool(False),
    )


def parse_backoff(node: Node) -> RetryBackoff:
    default = RetryBackoff()
    if node.value is None:
        return default
    node.mapping({"base", "max"})
    base = as_positive_duration(node.get("base"), default.base)
    maximum = node.get("max").as_duration(max(default.max, base))
    if maximum < base:
        raise node.get("max").error("must not be less than base")
    return RetryBackoff(base=base, max=maximum)


def parse_rate_limit(node: Node) -> RateLimitConfig:
    node.mapping({"max_tokens", "tokens_per_fill", "fill_interval", "per_caller", "max_callers"})
    max_tokens = node.require("max_tokens").as_int(minimum=1, maximum=_MAX_LIMIT)
    header: str | None = None
    per_source = False
    if node.has("per_caller"):
        caller = node.get("per_caller").mapping({"header", "source_address"})
        if caller.has("header") == caller.has("source_address"):
            raise caller.error("exactly one of header, source_address is required")
        if caller.has("header"):
            header = caller.get("header").as_str().lower()
        elif not caller.get("source_address").as_bool():
            raise caller.get("source_address").error("expected true (or leave per_caller out)")
        else:
            per_source = True
    fill_interval = as_positive_duration(node.get("fill_interval"), 1.0)
    if fill_interval < MIN_FILL_INTERVAL:
        raise node.get("fill_interval").error(
            "expected at least 50ms (Envoy refuses a faster token bucket)"
        )
    return RateLimitConfig(
        max_tokens=max_tokens,
        tokens_per_fill=node.get("tokens_per_fill").as_int(max_tokens, 1, _MAX_LIMIT),
        fill_interval=fill_interval,
        per_caller_header=header,
        per_source=per_source,
        max_callers=node.get("max_callers").as_int(10_000, minimum=1, maximum=_MAX_LIMIT),
    )


def parse_fault(node: Node) -> FaultConfig:
    node.mapping({"delay", "abort", "header"})
    if not node.has("delay") and not node.has("abort"):
        raise node.error("at least one of delay, abort is required")
    delay = None
    if node.has("delay"):
        d = node.get("delay").mapping({"duration", "percentage"})
        delay = FaultDelay(
            duration=as_positive_duration(d.require("duration")),
            percentage=as_percentage(d.get("percentage"), 100.0),
        )
    abort = None
    if node.has("abort"):
        a = node.get("abort").mapping({"http_status", "grpc_status", "percentage"})
        if not a.has("http_status") and not a.has("grpc_status"):
            raise a.error("at least one of http_status, grpc_status is required")
        abort = FaultAbort(
            http_status=as_http_status(a.get("http_status")) if a.has("http_status") else None,
            grpc_status=as_grpc_status(a.get("grpc_status")) if a.has("grpc_status") else None,
            percentage=as_percentage(a.get("percentage"), 100.0),
        )
    header = None
    if node.has("header"):
        header_node = node.get("header")
        exact = header_node.get("exact")
        if isinstance(exact.value, bool):
            # `exact: on` is YAML 1.1 for true, which would never match the header "on".
            raise exact.error('expected a string: quote values like "on", "off", "yes"')
        header = parse_header_matcher(header_node)
    return FaultConfig(delay=delay, abort=abort, header=header)


def parse_fallback(node: Node) -> FallbackConfig:
    _reject_boolean_keys(node, "when")
    node.mapping({"when", "response", "cluster"})
    if node.has("response") == node.has("cluster"):
        raise node.error("exactly one of response, cluster is required")
    on = FallbackConfig().when
    if node.has("when"):
        names = {t.value: t for t in FallbackTrigger}
        triggers: set[FallbackTrigger] = set()
        for element in node.get("when").elements():
            trigger = names.get(element.value) if isinstance(element.value, str) else None
            if trigger is None:
                raise element.error(f"expected one of: {', '.join(names)}")
            triggers.add(trigger)
        on = frozenset(triggers)
    if node.has("cluster"):
        return FallbackConfig(cluster=node.get("cluster").as_str(), when=on)
    return FallbackConfig(response=parse_static_response(node.get("response")), when=on)


def parse_static_response(node: Node) -> StaticResponse:
    node.mapping({"status", "headers", "body", "grpc_status", "grpc_message", "grpc_response"})
    headers: list[tuple[str, str]] = []
    if node.has("headers"):
        for name, value in node.get("headers").items():
            if name.startswith(":") or not name:
                raise value.error("expected a regular header name")
            if isinstance(value.value, bool) or not isinstance(value.value, str | int | float):
                raise value.error("expected a string")
            headers.append((name.lower(), str(value.value)))
    body = node.get("body")
    if body.value is not None and not isinstance(body.value, str):
        raise body.error("expected a string")
    message = node.get("grpc_message")
    if message.value is not None and not isinstance(message.value, str):
        raise message.error("expected a string")
    grpc_status = as_grpc_status(node.get("grpc_status")) if node.has("grpc_status") else None
    grpc_response = None
    if node.has("grpc_response"):
        grpc_response = parse_grpc_message(node.get("grpc_response"))
        if grpc_status not in (None, 0):
            raise node.get("grpc_response").error("a message goes only with grpc_status ok (0)")
        grpc_status = 0
    elif grpc_status == 0:
        raise node.get("grpc_status").error(
            "an OK needs a response message: add grpc_response {base64: ...} or"
            " {json: ..., type: ..., descriptor_set: ...}"
        )
    return StaticResponse(
        status=as_http_status(node.get("status"), 200),
        headers=tuple(headers),
        body=body.value or "",
        grpc_status=grpc_status,
        grpc_message=message.value or "",
        grpc_response=grpc_response,
    )


def parse_route_policy(route: Node) -> RoutePolicy:
    """The policy keys of a route node (which has other keys too)."""
    return RoutePolicy(
        retry=parse_retry(route.get("retry")) if route.has("retry") else RetryPolicy(),
        rate_limit=parse_rate_limit(route.get("rate_limit")) if route.has("rate_limit") else None,
        fault=parse_fault(route.get("fault")) if route.has("fault") else None,
        fallback=parse_fallback(route.get("fallback")) if route.has("fallback") else None,
        max_concurrent_requests=parse_max_concurrent_requests(
            route.get("max_concurrent_requests")
        ),
    )


def parse_max_concurrent_requests(node: Node) -> int | None:
    return node.as_int(minimum=1, maximum=_MAX_LIMIT) if node.value is not None else None


# -- per cluster and per listener -------------------------------------------------------------


def parse_circuit_breakers(node: Node) -> CircuitBreakerConfig:
    default = CircuitBreakerConfig()
    if node.value is None:
        return default
    node.mapping({"max_connections", "max_pending_requests", "max_requests", "max_retries"})
    return CircuitBreakerConfig(
        max_connections=node.get("max_connections").as_int(default.max_connections, 1, _MAX_LIMIT),
        max_pending_requests=node.get("max_pending_requests").as_int(
            default.max_pending_requests, 0, _MAX_LIMIT
        ),
        max_requests=node.get("max_requests").as_int(default.max_requests, 1, _MAX_LIMIT),
        max_retries=node.get("max_retries").as_int(default.max_retries, 0, _MAX_LIMIT),
    )


def parse_retry_budget(node: Node) -> RetryBudgetConfig | None:
    """A mapping, ``off`` (no budget: ``max_retries`` applies) or absent (the default budget)."""
    default = RetryBudgetConfig()
    if node.value is None or node.value is True:
        return default
    if _is_off(node):
        return None
    node.mapping({"percent", "min_concurrency"})
    return RetryBudgetConfig(
        percent=as_percentage(node.get("percent"), default.percent),
        min_concurrency=node.get("min_concurrency").as_int(default.min_concurrency, 0, 10_000),
    )


def parse_adaptive_throttling(node: Node) -> AdaptiveThrottlingConfig:
    default = AdaptiveThrottlingConfig()
    if node.value is None or _is_off(node):
        return default
    if node.value is True:
        return AdaptiveThrottlingConfig(enabled=True)
    node.mapping({"enabled", "k", "window", "buckets", "max_rejection_probability", "min_requests"})
    # The file says percent, as Envoy's max_rejection_probability; the model holds a fraction.
    cap_percent = as_percentage(
        node.get("max_rejection_probability"), default.max_rejection_probability * 100
    )
    return AdaptiveThrottlingConfig(
        enabled=node.get("enabled").as_bool(True),
        k=as_number(node.get("k"), default.k, minimum=1.0, maximum=100.0),
        window=as_positive_duration(node.get("window"), default.window),
        buckets=node.get("buckets").as_int(default.buckets, 1, 1000),
        max_rejection_probability=cap_percent / 100.0,
        min_requests=node.get("min_requests").as_int(default.min_requests, 0, _MAX_LIMIT),
    )


def parse_cluster_resilience(service: Node) -> ClusterResilience:
    """The policy keys of a service (cluster) node (which has other keys too)."""
    return ClusterResilience(
        circuit_breakers=parse_circuit_breakers(service.get("circuit_breakers")),
        retry_budget=parse_retry_budget(service.get("retry_budget")),
        adaptive_throttling=parse_adaptive_throttling(service.get("adaptive_throttling")),
    )


def parse_load_shedding(node: Node, on_by_default: bool = False) -> LoadSheddingConfig:
    """``on_by_default``: a mesh service's inbound listener sheds unless told ``off``."""
    default = LoadSheddingConfig()
    if _is_off(node):
        return default
    if node.value is None:
        return LoadSheddingConfig(enabled=on_by_default)
    if node.value is True:
        return LoadSheddingConfig(enabled=True)
    node.mapping(
        {"enabled", "max_queue_delay", "queue_interval", "min_concurrency", "cgroup",
         "cpu_threshold", "window", "buckets", "cool_down", "cpu_decay"}
    )  # fmt: skip
    return LoadSheddingConfig(
        enabled=node.get("enabled").as_bool(True),
        max_queue_delay=node.get("max_queue_delay").as_duration(default.max_queue_delay),
        queue_interval=node.get("queue_interval").as_duration(default.queue_interval),
        min_concurrency=node.get("min_concurrency").as_int(default.min_concurrency, 1, 1_000_000),
        cgroup=node.get("cgroup").as_str() if node.has("cgroup") else None,
        cpu_threshold=as_number(node.get("cpu_threshold"), 80.0, 1.0, 100.0) / 100.0,
        window=as_positive_duration(node.get("window"), default.window),
        buckets=node.get("buckets").as_int(default.buckets, 1, 1000),
        cool_down=node.get("cool_down").as_duration(default.cool_down),
        cpu_decay=as_number(node.get("cpu_decay"), default.cpu_decay, 0.0, 0.999),
    )


def parse_listener_limits(listener: Node) -> ListenerLimits:
    """The limit keys of a listener or service node (which has other keys too)."""
    values = {}
    for key in ("max_downstream_connections", "max_requests_per_connection"):
        node = listener.get(key)
        values[key] = node.as_int(minimum=1, maximum=_MAX_LIMIT) if node.value is not None else None
    return ListenerLimits(**values)
