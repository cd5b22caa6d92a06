"""Parsing ``load_balancing``, ``health_check`` and ``outlier_detection``: values and errors."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from pilotfish.config.cluster_policy import (
    HashOn,
    HealthCheckConfig,
    HealthCheckType,
    LbKind,
    LbPolicy,
    OutlierDetectionConfig,
    parse_health_check,
    parse_lb_policy,
    parse_outlier_detection,
)
from pilotfish.config.errors import ConfigError
from pilotfish.config.fields import Node

LB = "services.x.load_balancing"
HC = "services.x.health_check"
OD = "services.x.outlier_detection"


def node(path: str, text: str) -> Node:
    return Node(path, yaml.safe_load(text))


def error(parse: Any, path: str, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(node(path, text))
    return str(info.value)


def test_defaults_are_envoys() -> None:
    od = OutlierDetectionConfig()
    assert (od.consecutive_5xx, od.interval, od.base_ejection_time) == (5, 10.0, 30.0)
    assert (od.max_ejection_percent, od.max_ejection_time, od.success_rate_stdev_factor) == (
        10,
        300.0,
        1900,
    )
    assert (od.enforcing_consecutive_gateway_failure, od.enforcing_failure_percentage) == (0, 0)
    assert LbPolicy().maglev_table_size == 65537 and LbPolicy().minimum_ring_size == 1024
    assert LbPolicy().panic_threshold == 50.0


def test_absent_or_empty_sections_give_defaults() -> None:
    assert parse_lb_policy(Node(LB, None)) == LbPolicy()
    assert parse_outlier_detection(node(OD, "{}")) == OutlierDetectionConfig()
    assert parse_health_check(node(HC, "{type: http}")) == HealthCheckConfig()


def test_lb_policy_in_full() -> None:
    policy = parse_lb_policy(
        node(
            LB,
            """
            policy: maglev
            hash_on: header
            hash_key: X-User
            maglev_table_size: 4099
            panic_threshold: 25
            """,
        )
    )
    assert policy == LbPolicy(
        kind=LbKind.MAGLEV,
        hash_on=HashOn.HEADER,
        hash_key="x-user",  # header names are matched lower-case
        maglev_table_size=4099,
        panic_threshold=25.0,
    )
    peak = parse_lb_policy(node(LB, "{policy: peak_ewma, ewma_decay: 5s, ewma_default_rtt: 5ms}"))
    assert (peak.ewma_decay, peak.ewma_default_rtt) == (5.0, 0.005)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{policy: fastest}", f"{LB}.policy: expected one of: round_robin, "),
        ("{policy: ring_hash, hash_on: ip}", f"{LB}.hash_on: expected one of: source_ip, "),
        ("{policy: ring_hash, hash_on: cookie}", f"{LB}.hash_key: required field is missing"),
        ("{policy: ring_hash, hash_key: x}", f"{LB}.hash_key: only with hash_on: header or"),
        ("{policy: random, hash_on: source_ip}", f"{LB}.hash_on: only for the ring_hash and"),
        ("{policy: maglev, maglev_table_size: 65536}", f"{LB}.maglev_table_size: expected a prime"),
        (
            "{policy: ring_hash, minimum_ring_size: 4096, maximum_ring_size: 1024}",
            f"{LB}.maximum_ring_size: must not be below minimum_ring_size",
        ),
        ("{panic_threshold: 150}", f"{LB}.panic_threshold: expected a number at least 0 and at"),
        ("{panic_threshold: high}", f"{LB}.panic_threshold: expected a number"),
        (
            "{policy: least_request, choice_count: 1}",
            f"{LB}.choice_count: expected an integer at least 2",
        ),
        ("{choice_count: 3}", f"{LB}.choice_count: only for the least_request and peak_ewma"),
        ("{policy: ring_hash, maglev_table_size: 7}", f"{LB}.maglev_table_size: only for the"),
        ("{weights: 1}", f"{LB}.weights: unknown field"),
    ],
)
def test_lb_policy_errors_name_the_field(text: str, message: str) -> None:
    assert error(parse_lb_policy, LB, text).startswith(message)


def test_health_check_in_full() -> None:
    hc = parse_health_check(
        node(
            HC,
            """
            type: http
            path: /ready
            host: greeter.local
            expected_statuses: [200-204, 302]
            interval: 2s
            unhealthy_interval: 500ms
            interval_jitter: 100ms
            timeout: 250ms
            unhealthy_threshold: 2
            healthy_threshold: 1
            initially_healthy: true
            """,
        )
    )
    assert hc.expected_statuses == ((200, 205), (302, 303))
    assert hc.status_ok(204) and hc.status_ok(302) and not hc.status_ok(301)
    assert (hc.interval, hc.unhealthy_interval, hc.interval_jitter, hc.timeout) == (
        2.0,
        0.5,
        0.1,
        0.25,
    )
    assert (hc.unhealthy_threshold, hc.healthy_threshold, hc.initially_healthy) == (2, 1, True)
    grpc = parse_health_check(node(HC, "{type: grpc, service_name: helloworld.Greeter}"))
    assert grpc.type is HealthCheckType.GRPC and grpc.service_name == "helloworld.Greeter"
    assert HealthCheckConfig().status_ok(399) and not HealthCheckConfig().status_ok(400)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{}", f"{HC}.type: required field is missing"),
        ("{type: tcp}", f"{HC}.type: expected one of: http, grpc"),
        ("{type: grpc, path: /x}", f"{HC}.path: not for grpc health checks"),
        ("{type: http, service_name: x}", f"{HC}.service_name: not for http health checks"),
        ("{type: http, path: ready}", f"{HC}.path: expected a path starting with /"),
        ("{type: http, expected_statuses: [2xx]}", f"{HC}.expected_statuses[0]: expected a"),
        ("{type: http, expected_statuses: [399-200]}", f"{HC}.expected_statuses[0]: expected"),
        ("{type: http, expected_statuses: []}", f"{HC}.expected_statuses: expected at least"),
        ("{type: http, interval: 0s}", f"{HC}.interval: expected a duration above 0s"),
        ("{type: http, timeout: 5}", f"{HC}.timeout: expected a duration like 250ms"),
        ("{type: http, healthy_threshold: 0}", f"{HC}.healthy_threshold: expected an integer"),
    ],
)
def test_health_check_errors_name_the_field(text: str, message: str) -> None:
    assert error(parse_health_check, HC, text).startswith(message)


def test_outlier_detection_overrides() -> None:
    od = parse_outlier_detection(
        node(OD, "{consecutive_5xx: 3, interval: 1s, max_ejection_percent: 50}")
    )
    assert od == OutlierDetectionConfig(consecutive_5xx=3, interval=1.0, max_ejection_percent=50)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{max_ejection_percent: 101}", f"{OD}.max_ejection_percent: expected an integer"),
        ("{consecutive_5xx: 0}", f"{OD}.consecutive_5xx: expected an integer at least 1"),
        ("{interval: 0ms}", f"{OD}.interval: expected a duration above 0s"),
        (
            "{base_ejection_time: 10m}",
            f"{OD}.max_ejection_time: must not be below base_ejection_time",
        ),
        ("{consecutive_errors: 5}", f"{OD}.consecutive_errors: unknown field"),
        ("[]", f"{OD}: expected a mapping"),
    ],
)
def test_outlier_detection_errors_name_the_field(text: str, message: str) -> None:
    assert error(parse_outlier_detection, OD, text).startswith(message)
