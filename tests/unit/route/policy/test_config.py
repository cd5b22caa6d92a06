from __future__ import annotations

from typing import Any

import pytest
import yaml

from pilotfish.config.errors import ConfigError
from pilotfish.config.fields import Node
from pilotfish.config.route_policy import (
    AdaptiveThrottlingConfig,
    CircuitBreakerConfig,
    FallbackTrigger,
    LoadSheddingConfig,
    RetryBudgetConfig,
    RetryOn,
    RetryPolicy,
    RoutePolicy,
)
from pilotfish.config.route_policy_yaml import (
    parse_cluster_resilience,
    parse_load_shedding,
    parse_route_policy,
)

ROUTE = "services.greeter.routes[0]"


def route(text: str) -> RoutePolicy:
    return parse_route_policy(Node(ROUTE, yaml.safe_load(text)))


def error_of(text: str, parse: Any = route) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return str(info.value)


def test_absent_blocks_give_safe_defaults() -> None:
    policy = route("match: {prefix: /}")
    assert policy == RoutePolicy()
    assert policy.retry.attempts == 1 and RetryOn.HTTP_5XX not in policy.retry.retry_on
    cluster = parse_cluster_resilience(Node("services.quotes", {"endpoints": []}))
    assert cluster.circuit_breakers == CircuitBreakerConfig()
    assert cluster.retry_budget == RetryBudgetConfig()
    assert not cluster.adaptive_throttling.enabled
    assert not parse_load_shedding(Node("services.quotes.load_shedding", None)).enabled


def test_full_route_policy() -> None:
    policy = route(
        """
        retry: {attempts: 2, retry_on: [unavailable, reset], per_try_timeout: 500ms,
                backoff: {base: 10ms, max: 1s}, retriable_status_codes: [409],
                retry_non_idempotent: true}
        rate_limit: {max_tokens: 10, fill_interval: 100ms, per_caller: {header: X-User}}
        fault: {header: {name: x-pilotfish-fault, exact: "on"}, delay: {duration: 2s,
                percentage: 12.5}, abort: {grpc_status: RESOURCE_EXHAUSTED, percentage: 5}}
        fallback: {when: [circuit-open], response: {status: 503, body: later,
                   headers: {Retry-After: 5}, grpc_status: unavailable, grpc_message: busy}}
        """
    )
    retry = policy.retry
    assert retry.attempts == 2 and retry.per_try_timeout == 0.5
    assert retry.retry_on == {RetryOn.UNAVAILABLE, RetryOn.RESET, RetryOn.RETRIABLE_STATUS_CODES}
    assert (retry.backoff.base, retry.backoff.max) == (0.01, 1.0)
    assert retry.retriable_status_codes == {409} and retry.retry_non_idempotent
    rl = policy.rate_limit
    assert rl is not None
    assert (rl.max_tokens, rl.tokens_per_fill, rl.fill_interval) == (10, 10, 0.1)
    assert rl.per_caller_header == "x-user" and not rl.per_source
    fault = policy.fault
    assert fault is not None and fault.delay is not None and fault.abort is not None
    assert (fault.delay.duration, fault.delay.percentage) == (2.0, 12.5)
    assert (fault.abort.http_status, fault.abort.grpc_status) == (None, 8)
    assert fault.header is not None and fault.header.matches("on")
    fallback = policy.fallback
    assert fallback is not None and fallback.response is not None
    assert fallback.when == {FallbackTrigger.CIRCUIT_OPEN}
    assert fallback.response.headers == (("retry-after", "5"),)
    assert (fallback.response.status, fallback.response.grpc_status) == (503, 14)


def test_retry_off_and_cluster_fallback() -> None:
    policy = route("retry: off\nfallback: {cluster: quotes-cache}")
    assert policy.retry == RetryPolicy(attempts=0)
    assert policy.fallback is not None and policy.fallback.cluster == "quotes-cache"
    assert policy.fallback.when == frozenset(FallbackTrigger)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("retry: {attempts: -1}", f"{ROUTE}.retry.attempts: expected an integer at least 0"),
        ("retry: {attempts: 11}", f"{ROUTE}.retry.attempts: expected an integer at least 0"),
        ("retry: {attempts: two}", f"{ROUTE}.retry.attempts: expected an integer"),
        ("retry: {retry_on: [5xx, teapot]}", f"{ROUTE}.retry.retry_on[1]: expected one of: 5xx,"),
        ("retry: {per_try_timeout: 0s}", f"{ROUTE}.retry.per_try_timeout: expected a duration"),
        ("retry: {backoff: {base: 1s, max: 10ms}}", f"{ROUTE}.retry.backoff.max: must not be"),
        ("retry: {retries: 2}", f"{ROUTE}.retry.retries: unknown field"),
        ("retry: {retriable_status_codes: [99]}", f"{ROUTE}.retry.retriable_status_codes[0]:"),
        ("rate_limit: {tokens_per_fill: 1}", f"{ROUTE}.rate_limit.max_tokens: required field"),
        ("rate_limit: {max_tokens: 0}", f"{ROUTE}.rate_limit.max_tokens: expected an integer"),
        (
            "rate_limit: {max_tokens: 1, per_caller: {}}",
            f"{ROUTE}.rate_limit.per_caller: exactly one of header, source_address",
        ),
        ("fault: {}", f"{ROUTE}.fault: at least one of delay, abort"),
        ("fault: {abort: {percentage: 5}}", f"{ROUTE}.fault.abort: at least one of http_status"),
        (
            "fault: {abort: {http_status: 503, percentage: 101}}",
            f"{ROUTE}.fault.abort.percentage: expected a number at least 0 and at most 100",
        ),
        ("fault: {abort: {grpc_status: sad}}", f"{ROUTE}.fault.abort.grpc_status: expected a gRPC"),
        ("fault: {abort: {grpc_status: 17}}", f"{ROUTE}.fault.abort.grpc_status: expected an int"),
        (
            "fault: {delay: {duration: 1s}, header: {name: x-f, exact: on}}",
            f"{ROUTE}.fault.header.exact: expected a string: quote",
        ),
        ("fault: {delay: {percentage: 5}}", f"{ROUTE}.fault.delay.duration: required field"),
        ("retry: {on: [reset]}", f"{ROUTE}.retry: YAML reads the key `on` as true: write retry_on"),
        (
            "fallback: {on: [circuit-open]}",
            f"{ROUTE}.fallback: YAML reads the key `on` as true: write when",
        ),
        ("fallback: {}", f"{ROUTE}.fallback: exactly one of response, cluster"),
        ("fallback: {cluster: a, when: [oops]}", f"{ROUTE}.fallback.when[0]: expected one of"),
        ("fallback: {response: {status: 700}}", f"{ROUTE}.fallback.response.status: expected"),
        ("fallback: {response: {body: [1]}}", f"{ROUTE}.fallback.response.body: expected a str"),
    ],
)
def test_route_errors_name_the_field(text: str, message: str) -> None:
    assert error_of(text).startswith(message)


def test_cluster_resilience() -> None:
    node = Node(
        "services.quotes",
        yaml.safe_load(
            """
            circuit_breakers: {max_requests: 100, max_retries: 5}
            retry_budget: off
            adaptive_throttling: {k: 1.5, window: 1m, buckets: 6}
            """
        ),
    )
    policy = parse_cluster_resilience(node)
    assert policy.circuit_breakers == CircuitBreakerConfig(max_requests=100, max_retries=5)
    assert policy.retry_budget is None
    assert policy.adaptive_throttling == AdaptiveThrottlingConfig(
        enabled=True, k=1.5, window=60.0, buckets=6
    )
    on = parse_cluster_resilience(
        Node("s", {"retry_budget": {"percent": 50}, "adaptive_throttling": True})
    )
    assert on.retry_budget == RetryBudgetConfig(percent=50.0)
    assert on.adaptive_throttling.enabled


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"circuit_breakers": {"max_requests": 0}}, "s.circuit_breakers.max_requests: expected"),
        ({"circuit_breakers": {"max_conns": 1}}, "s.circuit_breakers.max_conns: unknown field"),
        ({"retry_budget": {"percent": "20%"}}, "s.retry_budget.percent: expected a number"),
        ({"adaptive_throttling": {"k": 0.5}}, "s.adaptive_throttling.k: expected a number at"),
    ],
)
def test_cluster_errors_name_the_field(value: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_cluster_resilience(Node("s", value))
    assert str(info.value).startswith(message)


def test_load_shedding() -> None:
    node = Node("l.load_shedding", {"cpu_threshold": 90, "window": "5s", "buckets": 50})
    config = parse_load_shedding(node)
    assert config == LoadSheddingConfig(enabled=True, cpu_threshold=0.9, window=5.0, buckets=50)
    assert parse_load_shedding(Node("l", True)).enabled
    assert not parse_load_shedding(Node("l", False)).enabled
    with pytest.raises(ConfigError, match=r"^l.cpu_decay: expected a number at least 0"):
        parse_load_shedding(Node("l", {"cpu_decay": 1}))
