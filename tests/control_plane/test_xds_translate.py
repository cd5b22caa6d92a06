"""Round trip: mesh file → our xDS resources → the sidecar's config model; and rejections."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from control_plane.xds.resources import ViewKey, build_view
from control_plane.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE
from pilotfish.config.errors import ConfigError
from pilotfish.config.model import (
    ConnectionLimits,
    Endpoint,
    HeaderMatcher,
    ListenerConfig,
    PathMatch,
    Protocol,
    WeightedCluster,
)
from pilotfish.config.route_policy import LoadSheddingConfig
from sidecar.route.table import RouteTable
from sidecar.xds.translate import (
    ApiListener,
    XdsConfig,
    eds_service_name,
    translate_all,
    translate_cluster,
    translate_endpoints,
    translate_listener,
    translate_route_config,
)
from tests.control_plane.helpers import MESH_YAML, mesh

RICH_YAML = MESH_YAML + """
  api:
    protocol: http1
    port: 8080
    endpoints: [127.0.0.1:8081]
    routes:
      - name: users
        match:
          regex: /users/[0-9]+
          headers: [{name: X-Canary, exact: "yes"}, {name: x-debug, present: false}]
        cluster: quotes
        timeout: 0s
      - match: {path: /health}
  db:
    protocol: tcp
    endpoints: [127.0.0.1:5432]
"""

def _view(key: ViewKey, text: str = RICH_YAML) -> dict[str, dict[str, Any]]:
    decoded: dict[str, dict[str, Any]] = {}
    for type_url, resources in build_view(mesh(text), key).items():
        cls = {LISTENER: listener_pb2.Listener, ROUTE: route_pb2.RouteConfiguration,
               CLUSTER: cluster_pb2.Cluster, ENDPOINT: endpoint_pb2.ClusterLoadAssignment}[type_url]
        decoded[type_url] = {}
        for name, resource in resources.items():
            message = cls()
            assert resource.packed.Unpack(message)
            decoded[type_url][name] = message
    return decoded


def test_round_trip_outbound() -> None:
    view = _view(ViewKey())
    listener = translate_listener(view[LISTENER]["greeter"])
    assert listener == ApiListener("greeter", "greeter")
    assert "db" not in view[LISTENER]  # tcp services get clusters only

    greeter = translate_route_config(view[ROUTE]["greeter"])
    [vhost] = greeter.virtual_hosts
    assert vhost.domains == ("greeter", "greeter:50051")
    [route] = vhost.routes
    assert route.match.path == PathMatch(prefix="/helloworld.Greeter/")
    assert route.action.clusters == (WeightedCluster("greeter", 90),
                                     WeightedCluster("greeter-canary", 10))
    assert route.action.timeout == 2.0

    api = translate_route_config(view[ROUTE]["api"])
    users, health = api.virtual_hosts[0].routes
    assert users.name == "users"
    assert users.match.path.regex is not None and users.match.path.regex.pattern == "/users/[0-9]+"
    assert users.match.headers == (HeaderMatcher(name="x-canary", exact="yes"),
                                   HeaderMatcher(name="x-debug", present=False))
    assert users.action.timeout is None
    assert users.action.clusters == (WeightedCluster("quotes", 1),)
    assert health.match.path == PathMatch(exact="/health")
    assert health.action.clusters == (WeightedCluster("api", 1),)

    clusters = view[CLUSTER]
    for name, cluster in clusters.items():
        assert eds_service_name(cluster) == (None if name == "PassthroughCluster" else name)
    greeter_cluster = translate_cluster(
        clusters["greeter"], view[ENDPOINT]["greeter"]
    )
    assert greeter_cluster.protocol is Protocol.HTTP2
    assert greeter_cluster.endpoints == (Endpoint("127.0.0.1", 50061, 1),
                                         Endpoint("127.0.0.1", 50062, 3))
    assert greeter_cluster.connect_timeout == 5.0
    assert translate_cluster(clusters["api"]).protocol is Protocol.HTTP1
    db = translate_cluster(clusters["db"], view[ENDPOINT]["db"])
    assert db.protocol is Protocol.TCP and db.endpoints == (Endpoint("127.0.0.1", 5432),)


def test_round_trip_inbound() -> None:
    key = ViewKey(service="api", app_address=("127.0.0.1", 9000),
                  inbound_address=("127.0.0.1", 15006))
    view = _view(key)
    listener = translate_listener(view[LISTENER]["inbound|api"])
    # A mesh service's inbound listener sheds on its app's saturation by default.
    assert listener == ListenerConfig(name="inbound|api", host="127.0.0.1", port=15006,
                                      route_config="inbound|api",
                                      load_shedding=LoadSheddingConfig(enabled=True))
    rc = translate_route_config(view[ROUTE]["inbound|api"])
    [vhost] = rc.virtual_hosts
    assert vhost.domains == ("*",)
    assert vhost.routes[0].action.clusters == (WeightedCluster("inbound|api", 1),)
    assert vhost.routes[0].action.timeout is None
    cluster = view[CLUSTER]["inbound|api"]
    assert eds_service_name(cluster) is None
    translated = translate_cluster(cluster)
    assert translated.endpoints == (Endpoint("127.0.0.1", 9000),)
    assert translated.protocol is Protocol.HTTP1


def test_endpoint_weights_multiply_by_locality_and_skip_unhealthy() -> None:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name="x")
    locality = cla.endpoints.add()
    locality.load_balancing_weight.value = 2
    for port, health in ((1, 0), (2, 2)):  # UNKNOWN serves, UNHEALTHY does not
        lb = locality.lb_endpoints.add(health_status=health)
        lb.endpoint.address.socket_address.address = "10.0.0.1"
        lb.endpoint.address.socket_address.port_value = port
        lb.load_balancing_weight.value = 3
    assert translate_endpoints(cla) == (Endpoint("10.0.0.1", 1, 6),)


def _greeter_route_config() -> route_pb2.RouteConfiguration:
    rc = _view(ViewKey())[ROUTE]["greeter"]
    assert isinstance(rc, route_pb2.RouteConfiguration)
    return rc


def test_route_rejections_name_the_field() -> None:
    rc = _greeter_route_config()
    rc.virtual_hosts[0].routes[0].match.query_parameters.add(name="q")
    with pytest.raises(ConfigError) as info:
        translate_route_config(rc)
    assert str(info.value) == (
        "route_config[greeter].virtual_hosts[0].routes[0].match.query_parameters: not supported"
    )

    rc = _greeter_route_config()
    rc.virtual_hosts[0].routes[0].redirect.host_redirect = "x"
    with pytest.raises(ConfigError, match=r"routes\[0\]\.redirect: not supported"):
        translate_route_config(rc)

    rc = _greeter_route_config()
    rc.virtual_hosts[0].routes[0].match.safe_regex.regex = "("
    with pytest.raises(ConfigError, match=r"match\.safe_regex\.regex: invalid regular expression"):
        translate_route_config(rc)

    rc = _greeter_route_config()
    rc.virtual_hosts[0].routes[0].route.retry_policy.retriable_headers.add(name="x")
    with pytest.raises(ConfigError, match=r"routes\[0\]\.route\.retry_policy\.retriable_headers: "
                                          "not supported"):
        translate_route_config(rc)


def test_listener_rejections_name_the_field() -> None:
    listener = _view(ViewKey())[LISTENER]["greeter"]
    assert isinstance(listener, listener_pb2.Listener)
    hcm = hcm_pb2.HttpConnectionManager()
    listener.api_listener.api_listener.Unpack(hcm)
    hcm.http_filters.add(name="late")  # router no longer last
    listener.api_listener.api_listener.Pack(hcm)
    with pytest.raises(ConfigError) as info:
        translate_listener(listener)
    assert str(info.value) == (
        "listener[greeter].api_listener.http_filters: the last filter must be the router"
    )
    hcm.ClearField("http_filters")
    hcm.route_config.name = "inline"
    listener.api_listener.api_listener.Pack(hcm)
    with pytest.raises(ConfigError, match=r"api_listener\.route_specifier: only rds"):
        translate_listener(listener)


def test_inbound_listener_limits_come_from_the_hcm() -> None:
    key = ViewKey(service="api", app_address=("127.0.0.1", 9000),
                  inbound_address=("127.0.0.1", 15006))
    listener = _view(key)[LISTENER]["inbound|api"]
    assert isinstance(listener, listener_pb2.Listener)
    packed = listener.filter_chains[0].filters[0].typed_config
    hcm = hcm_pb2.HttpConnectionManager()
    packed.Unpack(hcm)
    hcm.http2_protocol_options.max_concurrent_streams.value = 50
    hcm.stream_idle_timeout.FromSeconds(30)
    hcm.common_http_protocol_options.idle_timeout.FromSeconds(600)
    packed.Pack(hcm)
    translated = translate_listener(listener)
    assert isinstance(translated, ListenerConfig)
    limits = translated.limits
    assert (limits.max_concurrent_streams, limits.stream_idle_timeout) == (50, 30.0)
    assert limits.http2_idle_timeout == 600.0
    assert limits.header_timeout == ConnectionLimits().header_timeout
    hcm.request_headers_timeout.FromSeconds(0)  # Envoy: "no timeout"; we always keep one
    packed.Pack(hcm)
    with pytest.raises(ConfigError) as info:
        translate_listener(listener)
    assert str(info.value).startswith(
        "listener[inbound|api].filter_chains[0].filters[0].typed_config.request_headers_timeout"
    )


def test_cluster_rejections_name_the_field() -> None:
    cluster = _view(ViewKey())[CLUSTER]["quotes"]
    assert isinstance(cluster, cluster_pb2.Cluster)
    cluster.lb_policy = cluster_pb2.Cluster.CLUSTER_PROVIDED
    with pytest.raises(ConfigError) as info:
        translate_cluster(cluster)
    assert str(info.value) == (
        "cluster[quotes].lb_policy: only ROUND_ROBIN, LEAST_REQUEST, RANDOM, RING_HASH, MAGLEV"
    )
    cluster.lb_policy = cluster_pb2.Cluster.ROUND_ROBIN
    cluster.type = cluster_pb2.Cluster.LOGICAL_DNS
    with pytest.raises(ConfigError, match=r"cluster\[quotes\]\.type: only EDS"):
        translate_cluster(cluster)


def _all(key: ViewKey) -> XdsConfig:
    view = _view(key)
    return translate_all(view[LISTENER].values(), view[ROUTE].values(),
                         view[CLUSTER].values(), view[ENDPOINT].values())


def test_translate_all_for_a_sidecar_feeds_the_sidecar_router() -> None:
    config = _all(ViewKey(service="greeter", app_address=("127.0.0.1", 50061)))
    [inbound] = config.listeners
    assert inbound.name == "inbound|greeter" and inbound.port == 15006
    assert sorted(config.clusters) == ["inbound|greeter", "quotes"]
    assert config.clusters["quotes"].endpoints == (Endpoint("127.0.0.1", 50071),)
    outbound = RouteTable(config.route_configs["outbound"])
    decision = outbound.match("quotes", "/pilotfish.demo.v1.Quotes/GetQuote", "POST", {})
    assert decision is not None and decision.cluster == "quotes"
    assert outbound.match("greeter", "/x", "POST", {}) is None  # not in greeter's view
    app = RouteTable(config.route_configs["inbound|greeter"])
    decision = app.match("anything:15006", "/helloworld.Greeter/SayHello", "POST", {})
    assert decision is not None and decision.cluster == "inbound|greeter"


def test_translate_all_full_view_splits_by_weight() -> None:
    config = _all(ViewKey())
    assert config.listeners == ()
    table = RouteTable(config.route_configs["outbound"])
    low = table.match("greeter:50051", "/helloworld.Greeter/SayHello", "POST", {},
                      rng=lambda: 0.0)
    high = table.match("greeter", "/helloworld.Greeter/SayHello", "POST", {}, rng=lambda: 0.95)
    assert low is not None and low.cluster == "greeter"
    assert high is not None and high.cluster == "greeter-canary"
    users = table.match("api:8080", "/users/42", "GET", {"x-canary": "yes"})
    assert users is not None and users.cluster == "quotes"
    assert table.match("api", "/users/42", "GET", {"x-canary": "yes", "x-debug": "1"}) is None


def test_translate_all_requires_referenced_resources() -> None:
    view = _view(ViewKey())
    with pytest.raises(ConfigError, match=r"cluster\[quotes\]: no endpoints 'quotes' received"):
        translate_all(view[LISTENER].values(), view[ROUTE].values(), view[CLUSTER].values(),
                      [v for k, v in view[ENDPOINT].items() if k != "quotes"])
    with pytest.raises(ConfigError, match=r"listener\[api\]: no route config 'api'"):
        translate_all(view[LISTENER].values(),
                      [v for k, v in view[ROUTE].items() if k != "api"], [], [])
