"""A mesh route's own ``jwt`` and ``authorization``: parsed, served as Envoy's per-route configs
of the ``jwt_authn`` and ``rbac`` filters on the inbound route, and read back by the sidecar
into the same requirement and policy; shapes our model cannot hold are refused naming the field.
"""

from __future__ import annotations

import pytest
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter_pb2

from control_plane.mesh import Mesh, parse_mesh_text
from control_plane.xds import pgv
from control_plane.xds.resources import ViewKey, build_view
from control_plane.xds.types import ROUTE
from pilotfish.config.errors import ConfigError
from pilotfish.config.security import AuthorizationPolicy, AuthzRule, ListenerJwt
from sidecar.xds.translate import translate_route_config
from tests.control_plane.test_authn_xds import _hcm, _inbound, _translated

MESH = """
security:
  jwt_providers:
    idp:
      issuer: https://idp.example.org/
      audiences: [orders]
      jwks: {file: /etc/pilotfish/jwks.json}
    admin:
      issuer: https://admin.example.org/
      audiences: [orders-admin]
      jwks: {inline: '{"keys": []}'}
services:
  orders:
    endpoints: [127.0.0.1:50061]
    jwt: {providers: [idp]}
    authorization:
      deny: [{to: {headers: [{name: x-block}]}}]
      allow: [{to: {methods: [GET, POST]}}]
    routes:
      - name: health
        match: {path: /healthz}
        jwt: off
      - name: admin
        match: {prefix: /admin/, headers: [{name: x-tier, exact: gold}]}
        jwt: {providers: [admin, idp], required: false}
        authorization:
          allow: [{when: {claims: {role: [admin]}}, to: {methods: [POST]}}]
      - name: open
        match: {prefix: /public/}
        authorization: {deny: [{to: {methods: [DELETE]}}]}
      - name: rest
        match: {prefix: /}
  plain:
    endpoints: [127.0.0.1:50062]
    routes:
      - match: {prefix: /audit/}
        jwt: {providers: [admin]}
        authorization: {allow: [{when: {claims: {role: [auditor]}}}]}
      - match: {prefix: /}
"""


def _inbound_routes(mesh: Mesh, service: str) -> route_pb2.RouteConfiguration:
    view = build_view(mesh, ViewKey(service, ("127.0.0.1", 9000)))
    message = route_pb2.RouteConfiguration()
    assert view[ROUTE][f"inbound|{service}"].packed.Unpack(message)
    return message


def test_the_sidecar_reads_back_each_routes_own_security() -> None:
    mesh = parse_mesh_text(MESH)
    providers = mesh.security.jwt_providers
    service = mesh.services["orders"].security
    listener = _translated(_inbound(mesh, "orders"))
    assert listener.jwt == ListenerJwt((providers["idp"],), True)
    assert listener.authorization == service.authorization
    assert listener.jwt_requirements == (
        ("routes[1]", ListenerJwt((providers["admin"], providers["idp"]), False)),
    )

    config = translate_route_config(_inbound_routes(mesh, "orders"))
    routes = {r.name: r for r in config.virtual_hosts[0].routes}
    # Routes without their own security are not repeated: the catch-all takes them.
    assert list(routes) == ["health", "admin", "open", "to-app"]
    assert {r.action.clusters[0].name for r in routes.values()} == {"inbound|orders"}
    health, admin, open_, to_app = (routes[n].security for n in routes)
    assert to_app is None
    assert health is not None and health.jwt_disabled
    assert health.policy(listener.authorization) == service.authorization
    assert admin is not None and admin.jwt_requirement == "routes[1]"
    # A route's authorization replaces the service's whole policy.
    mesh_routes = {r.name: r for r in mesh.services["orders"].routes}
    assert admin.policy(listener.authorization) == AuthorizationPolicy(
        allow=mesh_routes["admin"].security.authorization.allow  # type: ignore[union-attr]
    )
    assert open_ is not None and open_.jwt_requirement is None and not open_.jwt_disabled
    assert open_.policy(listener.authorization) == AuthorizationPolicy(
        allow=(AuthzRule(),),  # allows what no deny rule refuses, as a policy without allow
        deny=(AuthzRule(methods=("DELETE",)),),
    )
    assert routes["admin"].match == mesh_routes["admin"].match

    # A service with no JWT or authorization of its own: only its route checks tokens.
    plain = _translated(_inbound(mesh, "plain"))
    assert plain.jwt is None
    assert plain.jwt_requirements == (("routes[0]", ListenerJwt((providers["admin"],))),)
    assert plain.authorization == AuthorizationPolicy(allow=(AuthzRule(),))


def test_per_route_configs_in_envoys_shape() -> None:
    mesh = parse_mesh_text(MESH)
    hcm = _hcm(_inbound(mesh, "orders"))
    assert [f.name for f in hcm.http_filters] == [
        "envoy.filters.http.jwt_authn",
        "envoy.filters.http.rbac.deny",
        "envoy.filters.http.rbac.allow",
        "envoy.filters.http.router",
    ]
    authn = jwt_pb2.JwtAuthentication()
    assert hcm.http_filters[0].typed_config.Unpack(authn)
    assert sorted(authn.providers) == ["admin", "idp"]
    assert authn.rules[0].requires.provider_name == "idp"  # the listener-wide rule: idp only
    names = [r.provider_name for r in authn.requirement_map["routes[1]"].requires_any.requirements]
    assert names == ["admin", "idp", ""]  # and allow_missing

    routes = _inbound_routes(mesh, "orders")
    pgv.check(routes, "RouteConfiguration[inbound|orders]")
    health, admin, _, _ = routes.virtual_hosts[0].routes
    per_route = jwt_pb2.PerRouteConfig()
    assert health.typed_per_filter_config["envoy.filters.http.jwt_authn"].Unpack(per_route)
    assert per_route.disabled
    assert admin.typed_per_filter_config["envoy.filters.http.jwt_authn"].Unpack(per_route)
    assert per_route.requirement_name == "routes[1]"
    deny, allow = rbac_filter_pb2.RBACPerRoute(), rbac_filter_pb2.RBACPerRoute()
    assert admin.typed_per_filter_config["envoy.filters.http.rbac.deny"].Unpack(deny)
    assert admin.typed_per_filter_config["envoy.filters.http.rbac.allow"].Unpack(allow)
    assert deny.rbac.rules.action == rbac_pb2.RBAC.DENY and not deny.rbac.rules.policies
    assert allow.rbac.rules.action == rbac_pb2.RBAC.ALLOW and list(allow.rbac.rules.policies) == [
        "allow[0]"
    ]


PARSE_ERRORS = [
    ("jwt: maybe", "services.orders.routes[0].jwt: expected {providers: [...], required: ...} "
     "or off"),
    ("jwt: {providers: [nobody]}", "services.orders.routes[0].jwt.providers[0]: unknown JWT "
     "provider 'nobody' (security.jwt_providers: idp)"),
    ("{jwt: off, authorization: {allow: [{when: {claims: {sub: [a]}}}]}}",
     "services.orders.routes[0].authorization.allow[0].when: matches JWT claims, but the route "
     "has no jwt requirement"),
]


@pytest.mark.parametrize(("route", "message"), PARSE_ERRORS)
def test_bad_route_security_names_the_field(route: str, message: str) -> None:
    keys = route if route.startswith("{") else "{" + route + "}"
    text = f"""
security:
  jwt_providers:
    idp: {{issuer: https://idp.example.org/, audiences: [a], jwks: {{inline: '{{"keys": []}}'}}}}
services:
  orders:
    endpoints: [127.0.0.1:50061]
    jwt: {{providers: [idp]}}
    routes:
      - {{match: {{prefix: /}}, {keys[1:-1]}}}
"""
    with pytest.raises(ConfigError) as info:
        parse_mesh_text(text)
    assert str(info.value) == message


def test_per_route_configs_our_model_cannot_hold_are_refused() -> None:
    mesh = parse_mesh_text(MESH)
    routes = _inbound_routes(mesh, "orders")
    admin = routes.virtual_hosts[0].routes[1]
    # Envoy reads an RBACPerRoute without rbac as "no policy here"; ours must say which.
    admin.typed_per_filter_config["envoy.filters.http.rbac.deny"].Pack(
        rbac_filter_pb2.RBACPerRoute()
    )
    with pytest.raises(ConfigError) as info:
        translate_route_config(routes)
    assert str(info.value) == (
        "route_config[inbound|orders].virtual_hosts[0].routes[1].typed_per_filter_config"
        "[envoy.filters.http.rbac.deny].rbac.rules: required (rules replacing the listener's)"
    )
    admin.typed_per_filter_config["envoy.filters.http.rbac.deny"].Pack(
        rbac_filter_pb2.RBACPerRoute(rbac=rbac_filter_pb2.RBAC(rules=rbac_pb2.RBAC()))
    )
    with pytest.raises(ConfigError, match=r"a second ALLOW policy for one route"):
        translate_route_config(routes)
    admin.typed_per_filter_config["envoy.filters.http.jwt_authn"].Pack(jwt_pb2.PerRouteConfig())
    with pytest.raises(ConfigError, match=r"jwt_authn\]: disabled: true or a requirement_name"):
        translate_route_config(routes)
