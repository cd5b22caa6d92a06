"""Policies: mesh file → our xDS resources → the sidecar's model equals what the bootstrap
parser makes of the same YAML; and errors name their field, on either side."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from control_plane.xds.resources import ViewKey
from control_plane.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE
from pilotfish.config.bootstrap import parse_cluster, parse_listener, parse_route
from pilotfish.config.errors import ConfigError
from pilotfish.config.fields import Node
from pilotfish.config.model import ClusterConfig, ListenerConfig, RouteEntry
from pilotfish.config.route_policy_yaml import LISTENER_POLICY_KEYS
from sidecar.observability.access_log import AccessLogConfig
from sidecar.observability.tracing_config import TracingConfig
from sidecar.xds.translate import XdsConfig, translate_all
from tests.control_plane.helpers import mesh
from tests.control_plane.test_xds_translate import _view

SERVICE_POLICIES = [
    "{}",
    "load_balancing: {policy: round_robin, panic_threshold: 0}",
    "load_balancing: {policy: weighted_round_robin}",
    "load_balancing: {slow_start: {window: 30s}}",
    "load_balancing: {slow_start: {window: 2s, aggression: 2.5, min_weight_percent: 5}}",
    "outlier_detection: {split_external_local_origin_errors: false,"
    " consecutive_local_origin_failure: 2, enforcing_consecutive_local_origin_failure: 50}",
    "load_balancing: {policy: least_request, choice_count: 3, active_request_bias: 0.5,"
    " panic_threshold: 30}",
    "load_balancing: {policy: peak_ewma, choice_count: 4, ewma_decay: 5s, ewma_default_rtt: 50ms}",
    "load_balancing: {policy: least_connections}",
    "load_balancing: {policy: random}",
    "load_balancing: {policy: weighted_random}",
    "load_balancing: {policy: ring_hash, hash_on: header, hash_key: X-User,"
    " minimum_ring_size: 64, maximum_ring_size: 4096}",
    "load_balancing: {policy: ring_hash, hash_on: source_ip_port}",
    "load_balancing: {policy: maglev, hash_on: cookie, hash_key: session, maglev_table_size: 131}",
    "load_balancing: {policy: maglev}",
    "health_check: {type: http, path: /ready, host: h, expected_statuses: [200, 204-206],"
    " interval: 2s, unhealthy_interval: 500ms, interval_jitter: 100ms, timeout: 250ms,"
    " unhealthy_threshold: 4, healthy_threshold: 1, initially_healthy: true}",
    "health_check: {type: http}",
    "health_check: {type: grpc, service_name: greeter}",
    "outlier_detection: {}",
    "outlier_detection: {interval: 1s, consecutive_5xx: 2, consecutive_gateway_failure: 3,"
    " base_ejection_time: 5s, max_ejection_time: 50s, max_ejection_percent: 100,"
    " enforcing_consecutive_5xx: 50, enforcing_consecutive_gateway_failure: 100,"
    " enforcing_success_rate: 0, success_rate_minimum_hosts: 2, success_rate_request_volume: 9,"
    " success_rate_stdev_factor: 1000, enforcing_failure_percentage: 100,"
    " failure_percentage_threshold: 50, failure_percentage_minimum_hosts: 1,"
    " failure_percentage_request_volume: 7}",
    "circuit_breakers: {max_connections: 10, max_pending_requests: 0, max_requests: 20,"
    " max_retries: 1}\n    retry_budget: off",
    "retry_budget: {percent: 12.5, min_concurrency: 0}",
    "adaptive_throttling: true",
    "adaptive_throttling: {k: 1.5, window: 30s, buckets: 6, min_requests: 5}",
    "adaptive_throttling: {enabled: false, k: 3}",
    "load_shedding: true",
    "load_shedding: off",
    "load_shedding: {max_queue_delay: 5ms, cgroup: /sys/fs/cgroup/pod}",
    "max_downstream_connections: 100",
    "max_requests_per_connection: 1000\n    max_downstream_connections: 5",
    "load_shedding: {cpu_threshold: 75.5, window: 5s, buckets: 5, cool_down: 0s, cpu_decay: 0.9}",
]

ROUTE_POLICIES = [
    "{}",
    "retry: off",
    "retry: {attempts: 2}",
    "retry: {attempts: 0, per_try_timeout: 2s}",
    "retry: {attempts: 3, retry_on: [5xx, gateway-error, reset, connect-failure, refused-stream,"
    " cancelled, deadline-exceeded, resource-exhausted, internal, unavailable],"
    " per_try_timeout: 300ms, backoff: {base: 10ms, max: 1s}, retriable_status_codes: [409, 429],"
    " retry_non_idempotent: true}",
    "retry: {retry_on: [retriable-status-codes], retriable_status_codes: [503]}",
    "rate_limit: {max_tokens: 50, tokens_per_fill: 10, fill_interval: 250ms}",
    "rate_limit: {max_tokens: 5, per_caller: {header: X-User}, max_callers: 5}",
    "rate_limit: {max_tokens: 5, fill_interval: 2s, per_caller: {source_address: true}}",
    "fault: {delay: {duration: 2s, percentage: 10}}",
    "fault: {abort: {http_status: 503, percentage: 0.5}}",
    "fault: {abort: {grpc_status: unavailable}}",
    "fault: {abort: {http_status: 429, grpc_status: resource-exhausted, percentage: 12.3456},"
    " delay: {duration: 1.5s}}",
    'fault: {header: {name: X-Fault, exact: "on"}, abort: {http_status: 500}}',
    "fault: {header: {name: x-fault, regex: 'a.*', invert: true}, delay: {duration: 10ms},"
    " abort: {http_status: 500, grpc_status: internal, percentage: 1}}",
    "fallback: {cluster: other}",
    "max_concurrent_requests: 7",
    'fallback: {when: [circuit-open], response: {status: 503, headers: {b: "2", a: "1"},'
    ' body: "x", grpc_status: unavailable, grpc_message: "m"}}',
    "fallback: {response: {body: sorry}}",
    "fallback: {response: {grpc_response: {base64: CAE=}, grpc_message: cached}}",
]


def _mesh_yaml(service_policy: str, route_policy: str) -> str:
    return f"""
services:
  svc:
    endpoints: [127.0.0.1:9001]
    {service_policy if service_policy != "{}" else ""}
    routes:
      - match: {{prefix: /}}
        {route_policy if route_policy != "{}" else ""}
  other:
    endpoints: [127.0.0.1:9002]
"""


def _through_xds(service_policy: str, route_policy: str) -> XdsConfig:
    key = ViewKey(service="svc", app_address=("127.0.0.1", 8080))
    return _translate(_view(key, _mesh_yaml(service_policy, route_policy)))


def _translate(view: dict[str, dict[str, Any]]) -> XdsConfig:
    return translate_all(view[LISTENER].values(), view[ROUTE].values(),
                         view[CLUSTER].values(), view[ENDPOINT].values())


def _block(text: str) -> dict[str, Any]:
    value = yaml.safe_load("\n".join(line.strip() for line in text.splitlines()))
    assert isinstance(value, dict)
    return value


def _bootstrap_cluster(service_policy: str) -> ClusterConfig:
    block = {k: v for k, v in _block(service_policy).items() if k not in LISTENER_POLICY_KEYS}
    return parse_cluster(Node("clusters[0]", {"name": "svc", "endpoints": [], **block}))


def _bootstrap_route(route_policy: str) -> RouteEntry:
    node = Node("r", {"match": {"prefix": "/"}, "route": {"cluster": "svc"},
                      **_block(route_policy)})
    return parse_route(node, "0")


def _bootstrap_listener(service_policy: str) -> ListenerConfig:
    block = {k: v for k, v in _block(service_policy).items() if k in LISTENER_POLICY_KEYS}
    # A mesh service sheds on its inbound listener unless told otherwise; a bootstrap opts in.
    block.setdefault("load_shedding", True)
    return parse_listener(Node("l", {"address": "0.0.0.0:1", "route_config": "x", **block}))


@pytest.mark.parametrize("service_policy", SERVICE_POLICIES)
def test_cluster_and_listener_policies_survive_the_trip(service_policy: str) -> None:
    config = _through_xds(service_policy, "{}")
    expected = _bootstrap_cluster(service_policy)
    cluster = config.clusters["svc"]
    assert cluster.lb_policy == expected.lb_policy
    assert cluster.health_check == expected.health_check
    assert cluster.outlier_detection == expected.outlier_detection
    assert cluster.resilience == expected.resilience
    [inbound] = config.listeners
    assert inbound.load_shedding == _bootstrap_listener(service_policy).load_shedding
    assert inbound.listener_limits == _bootstrap_listener(service_policy).listener_limits


@pytest.mark.parametrize("route_policy", ROUTE_POLICIES)
def test_route_policies_survive_the_trip(route_policy: str) -> None:
    config = _through_xds("{}", route_policy)
    [route] = config.route_configs["svc"].virtual_hosts[0].routes
    assert route.policy == _bootstrap_route(route_policy).policy


def test_hashing_clusters_give_their_routes_a_hash_policy() -> None:
    view = _view(ViewKey(), _mesh_yaml(
        "load_balancing: {policy: ring_hash, hash_on: header, hash_key: X-User}", "{}"))
    [route] = view[ROUTE]["svc"].virtual_hosts[0].routes
    [hash_policy] = route.route.hash_policy
    assert hash_policy.header.header_name == "x-user"
    cluster = view[CLUSTER]["svc"]
    assert cluster.ring_hash_lb_config.minimum_ring_size.value == 1024
    # gRPC clients read the list, and take the first policy they support.
    maglev = _view(ViewKey(), _mesh_yaml("load_balancing: {policy: maglev}", "{}"))[CLUSTER]
    names = [p.typed_extension_config.name
             for p in maglev["svc"].load_balancing_policy.policies]
    assert names == ["envoy.load_balancing_policies.maglev",
                     "envoy.load_balancing_policies.round_robin"]


def test_filters_before_the_router_only_where_routes_need_them() -> None:
    plain = _view(ViewKey(), _mesh_yaml("{}", "{}"))[LISTENER]["svc"]
    faulty = _view(ViewKey(), _mesh_yaml(
        "{}", "fault: {delay: {duration: 1s}}\n        rate_limit: {max_tokens: 1}"))[LISTENER]

    def filters(listener: Any) -> list[tuple[str, bool]]:
        hcm = hcm_pb2.HttpConnectionManager()
        assert listener.api_listener.api_listener.Unpack(hcm)
        return [(f.name, f.is_optional) for f in hcm.http_filters]

    assert filters(plain) == [("envoy.filters.http.router", False)]
    assert filters(faulty["svc"]) == [
        ("envoy.filters.http.fault", False),
        ("envoy.filters.http.local_ratelimit", True),
        ("envoy.filters.http.router", False),
    ]


TELEMETRY = """
telemetry:
  tracing: {sampling: 2.5%, otlp_endpoint: "http://jaeger:4317"}
  access_log: {sink: file, path: /tmp/access.log}
"""


def test_telemetry_reaches_the_sidecar() -> None:
    view = _view(ViewKey(service="svc", app_address=("127.0.0.1", 8080)),
                 TELEMETRY + _mesh_yaml("{}", "{}"))
    config = _translate(view)
    assert config.tracing == TracingConfig(
        enabled=True, service_name="svc", endpoint="http://jaeger:4317", insecure=True,
        sample_ratio=0.025,
    )
    assert config.access_log == AccessLogConfig(sink="file", path="/tmp/access.log")
    tls = _view(ViewKey(), """
telemetry:
  tracing: {otlp_endpoint: "https://collector.example:4317", service_name: edge}
  access_log: {}
""" + _mesh_yaml("{}", "{}"))
    config = _translate(tls)
    assert config.tracing == TracingConfig(
        enabled=True, service_name="edge", endpoint="https://collector.example:4317",
        insecure=False, sample_ratio=1.0,
    )
    assert config.access_log == AccessLogConfig(sink="stdout")
    assert _translate(_view(ViewKey(), _mesh_yaml("{}", "{}"))).tracing is None


MESH_ERRORS = [
    ("{}", "retry: {attempts: 11}",
     "services.svc.routes[0].retry.attempts: expected an integer at least 0 and at most 10"),
    ("{}", "retry: {retry_on: [sometimes]}",
     "services.svc.routes[0].retry.retry_on[0]: expected one of: 5xx, gateway-error, reset, "
     "connect-failure, refused-stream, retriable-status-codes, unavailable, cancelled, "
     "deadline-exceeded, resource-exhausted, internal"),
    ("{}", "fallback: {cluster: nope}",
     "services.svc.routes[0].fallback.cluster: service 'nope' does not exist"),
    ("{}", "rate_limit: {tokens_per_fill: 1}",
     "services.svc.routes[0].rate_limit.max_tokens: required field is missing"),
    ("{}", "fault: {header: {name: x}}",
     "services.svc.routes[0].fault: at least one of delay, abort is required"),
    ("load_balancing: {policy: maglev, maglev_table_size: 100}", "{}",
     "services.svc.load_balancing.maglev_table_size: expected a prime number, like 65537"),
    ("load_balancing: {policy: round_robin, choice_count: 3}", "{}",
     "services.svc.load_balancing.choice_count: only for the least_request and peak_ewma "
     "policies"),
    ("load_balancing: {policy: random, slow_start: {window: 1s}}", "{}",
     "services.svc.load_balancing.slow_start: only for the weighted_round_robin policy"),
    ("load_balancing: {slow_start: {window: 0s}}", "{}",
     "services.svc.load_balancing.slow_start.window: expected a duration above 0s"),
    ("load_balancing: {slow_start: {aggression: 2}}", "{}",
     "services.svc.load_balancing.slow_start.window: required field is missing"),
    ("health_check: {type: grpc, path: /x}", "{}",
     "services.svc.health_check.path: not for grpc health checks"),
    ("outlier_detection: {max_ejection_percent: 101}", "{}",
     "services.svc.outlier_detection.max_ejection_percent: expected an integer at least 0 and "
     "at most 100"),
    ("circuit_breakers: {max_requests: 0}", "{}",
     "services.svc.circuit_breakers.max_requests: expected an integer at least 1 and at most "
     "1000000"),
    ("load_shedding: {cpu_threshold: 0}", "{}",
     "services.svc.load_shedding.cpu_threshold: expected a number at least 1 and at most 100"),
]


@pytest.mark.parametrize(("service_policy", "route_policy", "message"), MESH_ERRORS)
def test_mesh_policy_errors_name_the_field(
    service_policy: str, route_policy: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        mesh(_mesh_yaml(service_policy, route_policy))
    assert str(info.value) == message


@pytest.mark.parametrize(("text", "message"), [
    ("telemetry: {tracing: {sampling: 1%}}",
     "telemetry.tracing.otlp_endpoint: required field is missing"),
    ("telemetry: {tracing: {otlp_endpoint: 'jaeger:4317'}}",
     "telemetry.tracing.otlp_endpoint: expected a URL like http://jaeger:4317"),
    ("telemetry: {tracing: {otlp_endpoint: 'http://j:4317', sampling: 200%}}",
     "telemetry.tracing.sampling: expected a percentage between 0% and 100%"),
    ("telemetry: {access_log: {sink: file}}", "telemetry.access_log.path: required field is "
     "missing"),
    ("services: {t: {protocol: tcp, endpoints: [], load_shedding: true}}",
     "services.t.load_shedding: not for a tcp service (it has no HTTP requests)"),
])
def test_mesh_telemetry_errors_name_the_field(text: str, message: str) -> None:
    if "services" not in text:
        text += "\nservices: {}"
    with pytest.raises(ConfigError) as info:
        mesh(text)
    assert str(info.value) == message


def _svc_cluster(service_policy: str = "{}") -> Any:
    return _view(ViewKey(), _mesh_yaml(service_policy, "{}"))[CLUSTER]["svc"]


def _svc_routes(route_policy: str) -> Any:
    return _view(ViewKey(), _mesh_yaml("{}", route_policy))[ROUTE]["svc"]


def _error(translate: Any, message: Any) -> str:
    with pytest.raises(ConfigError) as info:
        translate(message)
    return str(info.value)


def test_xds_policy_rejections_name_the_field() -> None:
    from envoy.config.route.v3 import route_components_pb2
    from envoy.extensions.filters.http.fault.v3 import fault_pb2
    from google.protobuf import struct_pb2

    from sidecar.xds.translate import translate_cluster, translate_route_config

    cluster = _svc_cluster("load_balancing: {policy: peak_ewma}")
    cluster.metadata.filter_metadata["pilotfish"]["load_balancing"]["policy"] = "weighted_random"
    assert _error(translate_cluster, cluster) == (
        "cluster[svc].metadata.filter_metadata.pilotfish.load_balancing.policy: "
        "weighted_random does not refine least_request"
    )
    cluster = _svc_cluster()
    cluster.ring_hash_lb_config.minimum_ring_size.value = 8
    assert _error(translate_cluster, cluster) == (
        "cluster[svc].ring_hash_lb_config: only with lb_policy RING_HASH"
    )
    cluster = _svc_cluster("health_check: {type: http}")
    cluster.health_checks[0].tcp_health_check.SetInParent()
    assert _error(translate_cluster, cluster) == (
        "cluster[svc].health_checks[0].tcp_health_check: not supported"
    )
    cluster = _svc_cluster("outlier_detection: {}")
    cluster.outlier_detection.consecutive_local_origin_failure.value = 3
    cluster.outlier_detection.successful_active_health_check_uneject_host.value = False
    assert _error(translate_cluster, cluster) == (
        "cluster[svc].outlier_detection.successful_active_health_check_uneject_host: "
        "not supported"
    )
    cluster = _svc_cluster()
    cluster.metadata.filter_metadata["pilotfish"].update({"colour": "red"})
    assert _error(translate_cluster, cluster) == (
        "cluster[svc].metadata.filter_metadata.pilotfish.colour: not supported"
    )
    cluster = _svc_cluster("adaptive_throttling: {k: 2.5}")
    cluster.metadata.filter_metadata["pilotfish"]["adaptive_throttling"]["k"] = 0.5
    assert _error(translate_cluster, cluster) == (
        "cluster[svc].metadata.filter_metadata.pilotfish.adaptive_throttling.k: "
        "expected a number at least 1 and at most 100"
    )

    path = "route_config[svc].virtual_hosts[0].routes[0]"
    rc = _svc_routes("retry: {attempts: 2}")
    rc.virtual_hosts[0].routes[0].route.retry_policy.retry_on = "5xx,sometimes"
    assert _error(translate_route_config, rc) == (
        f"{path}.route.retry_policy.retry_on: unsupported condition 'sometimes'"
    )
    rc = _svc_routes("{}")
    rc.virtual_hosts[0].routes[0].route.hash_policy.add().query_parameter.name = "q"
    assert _error(translate_route_config, rc) == (
        f"{path}.route.hash_policy[0].query_parameter: not supported"
    )
    rc = _svc_routes("fault: {abort: {http_status: 503}}")
    route = rc.virtual_hosts[0].routes[0]
    fault = fault_pb2.HTTPFault()
    assert route.typed_per_filter_config["envoy.filters.http.fault"].Unpack(fault)
    fault.headers.add(name="x")
    route.typed_per_filter_config["envoy.filters.http.fault"].Pack(fault)
    assert _error(translate_route_config, rc) == (
        f"{path}.typed_per_filter_config[envoy.filters.http.fault].headers: not supported"
    )
    rc = _svc_routes("{}")
    rc.virtual_hosts[0].routes[0].typed_per_filter_config["x"].Pack(struct_pb2.Struct())
    assert _error(translate_route_config, rc) == (
        f"{path}.typed_per_filter_config[x]: unsupported filter config 'google.protobuf.Struct'"
    )
    rc = _svc_routes("{}")
    optional = route_components_pb2.FilterConfig(is_optional=True)
    optional.config.Pack(struct_pb2.Struct())
    rc.virtual_hosts[0].routes[0].typed_per_filter_config["x"].Pack(optional)
    translate_route_config(rc)  # an optional filter we do not know is skipped
    rc = _svc_routes("fallback: {response: {status: 503}}")
    metadata = rc.virtual_hosts[0].routes[0].metadata.filter_metadata["pilotfish"]
    metadata["fallback"]["response"]["status"] = 99
    assert _error(translate_route_config, rc) == (
        f"{path}.metadata.filter_metadata.pilotfish.fallback.response.status: "
        "expected an integer at least 200 and at most 599"
    )


def test_xds_telemetry_rejections_name_the_field() -> None:
    from envoy.config.trace.v3 import opentelemetry_pb2

    from sidecar.xds.translate import translate_listener

    listener = _view(ViewKey(), TELEMETRY + _mesh_yaml("{}", "{}"))[LISTENER]["svc"]
    hcm = hcm_pb2.HttpConnectionManager()
    assert listener.api_listener.api_listener.Unpack(hcm)
    otel = opentelemetry_pb2.OpenTelemetryConfig()
    assert hcm.tracing.provider.typed_config.Unpack(otel)
    otel.grpc_service.envoy_grpc.cluster_name = "jaeger"
    hcm.tracing.provider.typed_config.Pack(otel)
    listener.api_listener.api_listener.Pack(hcm)
    assert _error(translate_listener, listener) == (
        "listener[svc].api_listener.tracing.provider.typed_config.grpc_service.envoy_grpc: "
        "not supported: the sidecar exports directly; use google_grpc"
    )
    hcm.ClearField("tracing")
    hcm.access_log.add(name="second").CopyFrom(hcm.access_log[0])
    listener.api_listener.api_listener.Pack(hcm)
    assert _error(translate_listener, listener) == (
        "listener[svc].api_listener.access_log: at most one access log is supported"
    )


def test_standard_values_sit_in_envoys_own_fields() -> None:
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.config.route.v3 import route_components_pb2
    from envoy.extensions.filters.http.fault.v3 import fault_pb2
    from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2

    cluster = _svc_cluster(
        "load_balancing: {policy: least_request, choice_count: 3}\n"
        "    health_check: {type: grpc, service_name: s, interval: 2s}\n"
        "    outlier_detection: {consecutive_5xx: 9}\n"
        "    circuit_breakers: {max_requests: 7}"
    )
    assert cluster.lb_policy == cluster_pb2.Cluster.LEAST_REQUEST
    assert cluster.least_request_lb_config.choice_count.value == 3
    [check] = cluster.health_checks
    assert check.grpc_health_check.service_name == "s" and check.interval.seconds == 2
    assert cluster.outlier_detection.consecutive_5xx.value == 9
    [thresholds] = cluster.circuit_breakers.thresholds
    assert thresholds.max_requests.value == 7
    assert thresholds.retry_budget.budget_percent.value == 20.0
    assert "pilotfish" not in cluster.metadata.filter_metadata or set(
        cluster.metadata.filter_metadata["pilotfish"].fields) == {"protocol"}

    [route] = _svc_routes(
        "retry: {attempts: 2, retry_on: [unavailable, 5xx], per_try_timeout: 1s}\n"
        "        rate_limit: {max_tokens: 9}\n"
        "        fault: {abort: {http_status: 503, grpc_status: unavailable, percentage: 5}}"
    ).virtual_hosts[0].routes
    retry = route.route.retry_policy
    assert (retry.retry_on, retry.num_retries.value, retry.per_try_timeout.seconds) == (
        "5xx,unavailable", 2, 1)
    fault = fault_pb2.HTTPFault()
    assert route.typed_per_filter_config["envoy.filters.http.fault"].Unpack(fault)
    assert fault.abort.grpc_status == 14 and fault.abort.percentage.numerator == 50_000
    wrapper = route_components_pb2.FilterConfig()
    assert route.typed_per_filter_config["envoy.filters.http.local_ratelimit"].Unpack(wrapper)
    limit = local_rate_limit_pb2.LocalRateLimit()
    assert wrapper.is_optional and wrapper.config.Unpack(limit)
    assert limit.token_bucket.max_tokens == 9
    assert limit.filter_enforced.default_value.numerator == 100
    assert route.metadata.filter_metadata["pilotfish"]["fault_abort_http_status"] == 503
