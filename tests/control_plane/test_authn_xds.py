"""The mesh file's JWT and authorization as Envoy's jwt_authn and RBAC filters, and back.

What the control plane writes for a service's inbound listener, the sidecar reads into the very
``ListenerJwt`` and ``AuthorizationPolicy`` the mesh file parsed; filters our model cannot
express are NACKed naming the field, and the last good listener stays.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from control_plane.mesh import Mesh, parse_mesh_text
from control_plane.xds.resources import ViewKey, build_view
from control_plane.xds.types import CLUSTER, LISTENER
from pilotfish.config.errors import ConfigError
from pilotfish.config.model import ListenerConfig
from pilotfish.config.security import ListenerJwt
from sidecar.xds.state import AdsClientState
from sidecar.xds.translate import translate_listener

# Every JWT and authorization feature of the mesh file, on one service.
EVERY = """
security:
  trust_domain: example.org
  jwt_providers:
    idp:
      issuer: https://idp.example.org/
      audiences: [orders, admin]
      jwks: {uri: https://idp.example.org/jwks.json, refresh: 10m, min_refetch: 1s}
      algorithms: [ES256, PS256]
      clock_skew: 5s
      forward_claims: {sub: x-user-id, email: x-email}
    files:
      issuer: https://files.example.org/
      audiences: [orders]
      jwks: {file: /etc/pilotfish/jwks.json, refresh: 2s}
      header: x-token
      clock_skew: 0s
    inline:
      issuer: https://inline.example.org/
      audiences: [orders]
      jwks: {inline: '{"keys": []}'}
      clock_skew: 1500ms
services:
  orders:
    namespace: shop
    endpoints: [127.0.0.1:50061]
    jwt: {providers: [files, idp, inline], required: false}
    authorization:
      deny:
        - from: {namespaces: [sandbox, dev-1]}
        - from: {not_principals: ['spiffe://example.org/ns/shop/*', 'spiffe://example.org/ns/ops/sa/a']}
          to: {not_paths: [/health, /debug/*]}
        - to: {headers: [{name: x-debug, present: true}]}
      allow:
        - from: {principals: ['spiffe://example.org/ns/shop/sa/web', 'spiffe://example.org/ns/ops/*']}
          to: {methods: [GET, post], paths: [/orders/*, /status]}
        - from: {authenticated: false}
          to:
            paths: ['*']
            headers:
              - {name: x-tenant, exact: acme}
              - {name: x-env, prefix: prod}
              - {name: x-id, regex: '[0-9]+'}
              - {name: x-canary, present: true, invert: true}
        - from: {authenticated: true, namespaces: [shop]}
          when: {claims: {realm.roles: [admin, ops], sub: [u-1]}}
        - {}
  single:
    endpoints: [127.0.0.1:50062]
    jwt: {providers: [idp]}
    authorization:
      deny: [{to: {methods: [DELETE]}}]
"""


def _inbound(mesh: Mesh, service: str) -> listener_pb2.Listener:
    view = build_view(mesh, ViewKey(service, ("127.0.0.1", 9000)))
    message = listener_pb2.Listener()
    assert view[LISTENER][f"inbound|{service}"].packed.Unpack(message)
    return message


def _hcm(listener: listener_pb2.Listener) -> hcm_pb2.HttpConnectionManager:
    hcm = hcm_pb2.HttpConnectionManager()
    assert listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    return hcm


def _translated(listener: listener_pb2.Listener) -> ListenerConfig:
    config = translate_listener(listener)
    assert isinstance(config, ListenerConfig)
    return config


def test_the_sidecar_reads_back_what_the_mesh_file_says() -> None:
    mesh = parse_mesh_text(EVERY)
    for name in ("orders", "single"):
        service = mesh.services[name].security
        assert service.jwt is not None
        config = _translated(_inbound(mesh, name))
        providers = tuple(mesh.security.jwt_providers[p] for p in service.jwt.providers)
        assert config.jwt == ListenerJwt(providers, service.jwt.required)
        assert config.authorization == service.authorization


def test_filters_in_envoys_shape_before_the_router() -> None:
    mesh = parse_mesh_text(EVERY)
    hcm = _hcm(_inbound(mesh, "orders"))
    assert [f.name for f in hcm.http_filters] == [
        "envoy.filters.http.jwt_authn",
        "envoy.filters.http.rbac.deny",
        "envoy.filters.http.rbac.allow",
        "envoy.filters.http.router",
    ]
    authn = jwt_pb2.JwtAuthentication()
    assert hcm.http_filters[0].typed_config.Unpack(authn)
    idp = authn.providers["idp"]
    assert idp.remote_jwks.http_uri.uri == "https://idp.example.org/jwks.json"
    assert idp.remote_jwks.cache_duration.seconds == 600
    assert [(c.claim_name, c.header_name) for c in idp.claim_to_headers] == [
        ("sub", "x-user-id"),
        ("email", "x-email"),
    ]
    assert authn.providers["files"].local_jwks.filename == "/etc/pilotfish/jwks.json"
    assert [h.name for h in authn.providers["files"].from_headers] == ["x-token"]
    requires = authn.rules[0].requires.requires_any.requirements
    assert [r.WhichOneof("requires_type") for r in requires] == [
        "provider_name", "provider_name", "provider_name", "allow_missing",
    ]  # fmt: skip
    deny, allow = (rbac_filter_pb2.RBAC(), rbac_filter_pb2.RBAC())
    assert hcm.http_filters[1].typed_config.Unpack(deny)
    assert hcm.http_filters[2].typed_config.Unpack(allow)
    assert deny.rules.action == rbac_pb2.RBAC.DENY and len(deny.rules.policies) == 3
    assert allow.rules.action == rbac_pb2.RBAC.ALLOW and len(allow.rules.policies) == 4
    namespace = deny.rules.policies["deny[0]"].principals[0].and_ids.ids[0].or_ids.ids[0]
    regex = namespace.authenticated.principal_name.safe_regex.regex
    assert regex == "spiffe://[^/]+/ns/sandbox/sa/[^/]+"

    # An Envoy fetches the uri JWKS through a cluster of its own, over TLS to the host.
    jwks = cluster_pb2.Cluster()
    view = build_view(mesh, ViewKey("orders", ("127.0.0.1", 9000)))
    assert view[CLUSTER][idp.remote_jwks.http_uri.cluster].packed.Unpack(jwks)
    assert jwks.type == cluster_pb2.Cluster.STRICT_DNS
    address = jwks.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (address.address, address.port_value) == ("idp.example.org", 443)
    tls = tls_pb2.UpstreamTlsContext()
    assert jwks.transport_socket.typed_config.Unpack(tls) and tls.sni == "idp.example.org"
    assert sorted(n for n in view[CLUSTER] if n.startswith("jwks|")) == ["jwks|idp"]

    single = _hcm(_inbound(mesh, "single"))
    assert [f.name for f in single.http_filters][1:] == [
        "envoy.filters.http.rbac.deny",  # deny rules only: no ALLOW filter, which would refuse all
        "envoy.filters.http.router",
    ]
    authn = jwt_pb2.JwtAuthentication()
    assert single.http_filters[0].typed_config.Unpack(authn)
    assert authn.rules[0].requires.provider_name == "idp"


# --- what the sidecar refuses ---------------------------------------------------------------


def _edit_filter(index: int, message: object, change: Callable[[object], None]) -> object:
    def edit(listener: listener_pb2.Listener) -> None:
        hcm = _hcm(listener)
        assert hcm.http_filters[index].typed_config.Unpack(message)
        change(message)
        hcm.http_filters[index].typed_config.Pack(message)
        listener.filter_chains[0].filters[0].typed_config.Pack(hcm)

    return edit


def _jwt(change: Callable[[jwt_pb2.JwtAuthentication], None]) -> object:
    return _edit_filter(0, jwt_pb2.JwtAuthentication(), change)


def _rbac(index: int, change: Callable[[rbac_filter_pb2.RBAC], None]) -> object:
    return _edit_filter(index, rbac_filter_pb2.RBAC(), change)


def _jwt_after_rbac(listener: listener_pb2.Listener) -> None:
    hcm = _hcm(listener)
    filters = list(hcm.http_filters)
    del hcm.http_filters[:]
    hcm.http_filters.extend([filters[1], filters[0], filters[2], filters[3]])
    listener.filter_chains[0].filters[0].typed_config.Pack(hcm)


F = "listener[inbound|orders].filter_chains[0].filters[0].typed_config.http_filters"
REFUSED = [
    (
        _rbac(1, lambda r: setattr(r.rules, "action", rbac_pb2.RBAC.LOG)),
        f"{F}[1].typed_config.rules.action: only ALLOW and DENY",
    ),
    (
        _rbac(2, lambda r: r.rules.policies["allow[0]"].principals[0].and_ids.ids.add(
            source_ip={"address_prefix": "10.0.0.0", "prefix_len": {"value": 8}})),
        f"{F}[2].typed_config.rules.policies[allow[0]].principals[0].and_ids.ids[1].source_ip: "
        "not supported",
    ),
    (
        _rbac(2, lambda r: r.rules.policies["allow[3]"].condition.const_expr.SetInParent()),
        f"{F}[2].typed_config.rules.policies[allow[3]].condition: not supported",
    ),
    (
        _jwt(lambda j: setattr(j.rules[0].match, "prefix", "/admin")),
        f"{F}[0].typed_config.rules[0].match: only prefix / (the whole listener) is supported",
    ),
    (
        _jwt(lambda j: j.providers["idp"].from_params.append("token")),
        f"{F}[0].typed_config.providers[idp].from_params: not supported",
    ),
    (
        _jwt(lambda j: j.providers["idp"].claim_to_headers.add(
            claim_name="sub", header_name="x-pilotfish-peer-identity")),
        f"{F}[0].typed_config.providers[idp].claim_to_headers[2].header_name: "
        "cannot carry a claim",
    ),
    (_jwt_after_rbac, f"{F}[1]: one jwt_authn filter, before the RBAC filters"),
]


@pytest.mark.parametrize(("edit", "message"), REFUSED)
def test_unsupported_filter_config_is_refused_naming_the_field(
    edit: Callable[[listener_pb2.Listener], None], message: str
) -> None:
    listener = _inbound(parse_mesh_text(EVERY), "orders")
    edit(listener)
    with pytest.raises(ConfigError) as info:
        translate_listener(listener)
    assert str(info.value) == message


def test_a_refused_policy_is_nacked_and_the_last_good_one_stays() -> None:
    mesh = parse_mesh_text(EVERY)
    view = build_view(mesh, ViewKey("orders", ("127.0.0.1", 9000)))
    state = AdsClientState(base_pb2.Node(id="orders-1"))
    assert "jwks|idp" in view[CLUSTER]  # for an Envoy; the sidecar fetches the URL itself
    for i, (type_url, by_name) in enumerate(view.items()):
        packed = [r.packed for r in by_name.values()]
        actions = state.on_response(
            discovery_pb2.DiscoveryResponse(
                type_url=type_url, version_info="v1", resources=packed, nonce=f"n{i}"
            )
        )
        assert actions.rejected is None
    assert state.applied is not None
    assert "jwks|idp" not in state.applied.clusters
    good = {listener.name: listener for listener in state.applied.listeners}
    assert good["inbound|orders"].authorization == mesh.services["orders"].security.authorization

    listener = _inbound(mesh, "orders")
    REFUSED[0][0](listener)  # type: ignore[operator]
    packed = any_pb2.Any()
    packed.Pack(listener)
    others = [r.packed for n, r in view[LISTENER].items() if n != "inbound|orders"]
    actions = state.on_response(
        discovery_pb2.DiscoveryResponse(
            type_url=LISTENER, version_info="v2", resources=[*others, packed], nonce="n9"
        )
    )
    (nack,) = actions.requests
    assert nack.version_info == "v1" and "rules.action: only ALLOW and DENY" in (
        nack.error_detail.message
    )
    assert actions.snapshot is None
    kept = {listener.name: listener for listener in state.applied.listeners}
    assert kept["inbound|orders"].authorization == good["inbound|orders"].authorization



def test_jwt_and_rbac_are_refused_where_they_would_be_ignored() -> None:
    mesh = parse_mesh_text(EVERY)
    view = build_view(mesh, ViewKey("single", ("127.0.0.1", 9000)))
    # An api_listener (outbound) enforces nothing: a filter there would be a silent no-op.
    api = listener_pb2.Listener()
    assert view[LISTENER]["orders"].packed.Unpack(api)
    hcm = hcm_pb2.HttpConnectionManager()
    assert api.api_listener.api_listener.Unpack(hcm)
    hcm.http_filters.insert(0, _hcm(_inbound(mesh, "single")).http_filters[1])
    api.api_listener.api_listener.Pack(hcm)
    with pytest.raises(ConfigError, match=r"http_filters\[0\]: not supported on an api_listener"):
        translate_listener(api)
    # Provider settings without the filter they belong to.
    inbound = _inbound(mesh, "orders")
    single = _hcm(inbound)
    del single.http_filters[0:3]
    inbound.filter_chains[0].filters[0].typed_config.Pack(single)
    with pytest.raises(ConfigError, match="jwt_providers metadata, but no jwt_authn filter"):
        translate_listener(inbound)
