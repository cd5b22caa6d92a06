"""JWT and authorization in xDS, as Envoy reads them: HTTP filters on the inbound listener.

A service's ``jwt`` becomes ``envoy.filters.http.jwt_authn`` (``JwtAuthentication``): one
``JwtProvider`` per provider it names, and one rule for every path of the listener. Its
``authorization`` becomes ``envoy.filters.http.rbac``: a DENY filter holding the deny rules, then
an ALLOW filter holding the allow rules (left out when there are none), as Istio does, so a
matching deny rule refuses whatever the allow rules say.

Each rule is one ``Policy`` named ``deny[i]`` / ``allow[i]``. The rule's fields are ANDed and the
values within a field ORed, so a policy has one principal (``and_ids`` of one ``or_ids`` per
field) and one permission (``and_rules`` likewise). ``sidecar/xds/authn.py`` reads exactly these
shapes back; the mapping of each field is in ``docs/mesh-reference.md``.

A route of the service with its own ``jwt`` or ``authorization`` goes on the inbound route with
Envoy's per-route configs (``route_filter_configs``): a ``PerRouteConfig`` naming the route's
entry in the JWT filter's ``requirement_map`` (or ``disabled``), and an ``RBACPerRoute`` for
each RBAC filter, which is why the two filters have names of their own.

What Envoy has no field for rides in the listener's ``pilotfish`` metadata under
``jwt_providers``: the JWKS ``refresh`` of a file (Envoy reads ``local_jwks`` once),
``min_refetch`` and ``algorithms`` (Envoy takes a key's algorithm from the JWKS), each only when
not the default.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, http_uri_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from envoy.type.matcher.v3 import metadata_pb2, path_pb2, string_pb2, value_pb2
from google.protobuf import any_pb2, empty_pb2

from control_plane.xds.proto_util import duration, pack
from pilotfish.config.matchers import HeaderMatcher
from pilotfish.config.security import (
    DEFAULT_JWT_ALGORITHMS,
    AuthorizationPolicy,
    AuthzRule,
    JwtProvider,
    JwtRequirement,
    MeshRouteSecurity,
    PathPattern,
    PrincipalPattern,
    SecurityConfig,
    ServiceSecurity,
)
from pilotfish.envoy_matchers import header_matcher, regex_matcher

JWT_FILTER = "envoy.filters.http.jwt_authn"
RBAC_FILTER = "envoy.filters.http.rbac"
# Envoy finds a route's per-filter config by the filter's name: the two RBAC filters have their
# own, so that a route can replace each.
RBAC_DENY_FILTER = f"{RBAC_FILTER}.deny"
RBAC_ALLOW_FILTER = f"{RBAC_FILTER}.allow"
# Where the jwt_authn filter leaves a verified token's claims (dynamic metadata of JWT_FILTER),
# for the RBAC filter's claim matchers.
PAYLOAD_KEY = "jwt_payload"
JWKS_FETCH_TIMEOUT = 5.0
_DEFAULT_REFRESH = 300.0
_DEFAULT_MIN_REFETCH = 30.0


JWKS_CLUSTER_PREFIX = "jwks|"
# Where Debian and its derivatives keep the system's trusted roots, which an Envoy checks a
# JWKS server's certificate against.
SYSTEM_ROOTS = "/etc/ssl/certs/ca-certificates.crt"


def jwks_cluster(provider: str) -> str:
    """The cluster an Envoy fetches a provider's remote JWKS through."""
    return f"{JWKS_CLUSTER_PREFIX}{provider}"


def _provider_names(service: ServiceSecurity, routes: Sequence[MeshRouteSecurity]) -> list[str]:
    """The providers the service's ``jwt`` and its routes' name, in order, once each."""
    names: list[str] = list(service.jwt.providers) if service.jwt is not None else []
    for route in routes:
        if route.jwt is not None:
            names += [name for name in route.jwt.providers if name not in names]
    return names


def jwks_clusters(
    service: ServiceSecurity,
    security: SecurityConfig,
    routes: Sequence[MeshRouteSecurity] = (),
) -> dict[str, cluster_pb2.Cluster]:
    """For each ``uri`` JWKS the service's (or its routes') ``jwt`` names: a STRICT_DNS cluster
    to its host, with TLS for ``https`` (SNI and the certificate checked against the host name
    and the system's roots). A Pilotfish sidecar fetches the URL itself and skips these."""
    clusters: dict[str, cluster_pb2.Cluster] = {}
    for name in _provider_names(service, routes):
        uri = security.jwt_providers[name].jwks.uri
        if uri is None:
            continue
        url = urlsplit(uri)
        host = url.hostname or ""
        https = url.scheme == "https"
        port = url.port or (443 if https else 80)
        cluster = cluster_pb2.Cluster(
            name=jwks_cluster(name),
            type=cluster_pb2.Cluster.STRICT_DNS,
            connect_timeout=duration(JWKS_FETCH_TIMEOUT),
            load_assignment=endpoint_pb2.ClusterLoadAssignment(
                cluster_name=jwks_cluster(name),
                endpoints=[
                    endpoint_components_pb2.LocalityLbEndpoints(
                        lb_endpoints=[
                            endpoint_components_pb2.LbEndpoint(
                                endpoint=endpoint_components_pb2.Endpoint(
                                    address=address_pb2.Address(
                                        socket_address=address_pb2.SocketAddress(
                                            address=host, port_value=port
                                        )
                                    )
                                )
                            )
                        ]
                    )
                ],
            ),
        )
        if https:
            context = tls_pb2.UpstreamTlsContext(
                sni=host,
                common_tls_context=tls_pb2.CommonTlsContext(
                    validation_context=common_pb2.CertificateValidationContext(
                        trusted_ca=base_pb2.DataSource(filename=SYSTEM_ROOTS),
                        match_typed_subject_alt_names=[
                            common_pb2.SubjectAltNameMatcher(
                                san_type=common_pb2.SubjectAltNameMatcher.DNS,
                                matcher=string_pb2.StringMatcher(exact=host),
                            )
                        ],
                    )
                ),
            )
            cluster.transport_socket.name = "envoy.transport_sockets.tls"
            cluster.transport_socket.typed_config.CopyFrom(pack(context))
        clusters[cluster.name] = cluster
    return clusters


def namespace_regex(namespace: str) -> str:
    """An RE2 pattern matching every SPIFFE ID of ``namespace`` (any trust domain, any
    service account); ``sidecar.xds.authn`` reads the namespace back from exactly this shape."""
    return f"spiffe://[^/]+/ns/{re.escape(namespace)}/sa/[^/]+"


# ---------------------------------------------------------------- jwt_authn


def _provider(p: JwtProvider) -> jwt_pb2.JwtProvider:
    message = jwt_pb2.JwtProvider(
        issuer=p.issuer,
        audiences=list(p.audiences),
        # The app still receives the token: it may want more than the forwarded claims.
        forward=True,
        payload_in_metadata=PAYLOAD_KEY,
        clock_skew_seconds=math.ceil(p.clock_skew),
        claim_to_headers=[
            jwt_pb2.JwtClaimToHeader(claim_name=claim, header_name=header)
            for claim, header in p.forward_claims
        ],
    )
    if p.header == "authorization":
        message.from_headers.add(name="Authorization", value_prefix="Bearer ")
    else:
        message.from_headers.add(name=p.header)
    source = p.jwks
    if source.uri is not None:
        message.remote_jwks.http_uri.CopyFrom(
            http_uri_pb2.HttpUri(
                uri=source.uri,
                cluster=jwks_cluster(p.name),
                timeout=duration(JWKS_FETCH_TIMEOUT),
            )
        )
        message.remote_jwks.cache_duration.CopyFrom(duration(source.refresh))
    elif source.file is not None:
        message.local_jwks.filename = source.file
    else:
        assert source.inline is not None
        message.local_jwks.inline_string = source.inline
    return message


def _requires(providers: Sequence[str], required: bool) -> jwt_pb2.JwtRequirement:
    if len(providers) == 1 and required:
        return jwt_pb2.JwtRequirement(provider_name=providers[0])
    any_of = [jwt_pb2.JwtRequirement(provider_name=name) for name in providers]
    if not required:
        any_of.append(jwt_pb2.JwtRequirement(allow_missing=empty_pb2.Empty()))
    return jwt_pb2.JwtRequirement(requires_any=jwt_pb2.JwtRequirementOrList(requirements=any_of))


def jwt_authn(
    providers: Sequence[JwtProvider],
    required: bool,
    requirements: Mapping[str, JwtRequirement] | None = None,
    listener_wide: Sequence[str] | None = None,
) -> jwt_pb2.JwtAuthentication:
    """A token of any of ``listener_wide`` (default: all ``providers``) on every path; with
    ``listener_wide`` empty, only routes that name one of ``requirements`` check tokens. Without
    ``required`` a request with no token passes (``allow_missing``: a bad token is still
    refused)."""
    config = jwt_pb2.JwtAuthentication(providers={p.name: _provider(p) for p in providers})
    wide = [p.name for p in providers] if listener_wide is None else list(listener_wide)
    if wide:
        config.rules.append(
            jwt_pb2.RequirementRule(
                match=route_components_pb2.RouteMatch(prefix="/"),
                requires=_requires(wide, required),
            )
        )
    for name, requirement in (requirements or {}).items():
        config.requirement_map[name].CopyFrom(
            _requires(requirement.providers, requirement.required)
        )
    return config


def jwt_metadata(providers: Sequence[JwtProvider]) -> dict[str, Any]:
    """The ``jwt_providers`` block of the listener's metadata; empty when all are defaults."""
    block: dict[str, Any] = {}
    for p in providers:
        extra: dict[str, Any] = {}
        if p.jwks.file is not None and p.jwks.refresh != _DEFAULT_REFRESH:
            extra["refresh"] = f"{p.jwks.refresh}s"
        if p.jwks.min_refetch != _DEFAULT_MIN_REFETCH:
            extra["min_refetch"] = f"{p.jwks.min_refetch}s"
        if p.algorithms != DEFAULT_JWT_ALGORITHMS:
            extra["algorithms"] = list(p.algorithms)
        if p.clock_skew != math.ceil(p.clock_skew) or p.clock_skew == 0:
            # Envoy's clock_skew_seconds is whole seconds, and reads 0 as its default (60 s).
            extra["clock_skew"] = f"{p.clock_skew}s"
        if extra:
            block[p.name] = extra
    return block


# ---------------------------------------------------------------- rbac


def _string(pattern: PrincipalPattern | PathPattern) -> string_pb2.StringMatcher:
    if pattern.text.endswith("*"):
        return string_pb2.StringMatcher(prefix=pattern.text[:-1])
    return string_pb2.StringMatcher(exact=pattern.text)


def _authenticated(name: string_pb2.StringMatcher) -> rbac_pb2.Principal:
    return rbac_pb2.Principal(authenticated=rbac_pb2.Principal.Authenticated(principal_name=name))


def _or_ids(ids: list[rbac_pb2.Principal]) -> rbac_pb2.Principal:
    return rbac_pb2.Principal(or_ids=rbac_pb2.Principal.Set(ids=ids))


def _or_rules(rules: list[rbac_pb2.Permission]) -> rbac_pb2.Permission:
    return rbac_pb2.Permission(or_rules=rbac_pb2.Permission.Set(rules=rules))


def _claim(name: str, accepted: Sequence[str]) -> rbac_pb2.Principal:
    """A claim holding one of ``accepted``: as a string, or as an element of a list."""
    values: list[value_pb2.ValueMatcher] = []
    for text in accepted:
        exact = string_pb2.StringMatcher(exact=text)
        values.append(value_pb2.ValueMatcher(string_match=exact))
        values.append(
            value_pb2.ValueMatcher(
                list_match=value_pb2.ListMatcher(one_of=value_pb2.ValueMatcher(string_match=exact))
            )
        )
    segments = [PAYLOAD_KEY, *name.split(".")]
    return rbac_pb2.Principal(
        metadata=metadata_pb2.MetadataMatcher(
            filter=JWT_FILTER,
            path=[metadata_pb2.MetadataMatcher.PathSegment(key=s) for s in segments],
            value=value_pb2.ValueMatcher(
                or_match=value_pb2.OrMatcher(value_matchers=values)
            ),
        )
    )


def _principal(rule: AuthzRule) -> rbac_pb2.Principal:
    ids: list[rbac_pb2.Principal] = []
    if rule.principals:
        ids.append(_or_ids([_authenticated(_string(p)) for p in rule.principals]))
    if rule.not_principals:
        ids.append(
            rbac_pb2.Principal(
                not_id=_or_ids([_authenticated(_string(p)) for p in rule.not_principals])
            )
        )
    if rule.namespaces:
        ids.append(
            _or_ids(
                [
                    _authenticated(
                        string_pb2.StringMatcher(safe_regex=regex_matcher(namespace_regex(ns)))
                    )
                    for ns in rule.namespaces
                ]
            )
        )
    if rule.authenticated is not None:
        anyone = rbac_pb2.Principal(authenticated=rbac_pb2.Principal.Authenticated())
        ids.append(anyone if rule.authenticated else rbac_pb2.Principal(not_id=anyone))
    ids.extend(_claim(name, accepted) for name, accepted in rule.claims)
    if not ids:
        return rbac_pb2.Principal(any=True)
    return rbac_pb2.Principal(and_ids=rbac_pb2.Principal.Set(ids=ids))


def _header(h: HeaderMatcher) -> rbac_pb2.Permission:
    return rbac_pb2.Permission(header=header_matcher(h))


def _paths(paths: Sequence[PathPattern]) -> rbac_pb2.Permission:
    if any(p.text == "*" for p in paths):
        return rbac_pb2.Permission(any=True)
    return _or_rules(
        [rbac_pb2.Permission(url_path=path_pb2.PathMatcher(path=_string(p))) for p in paths]
    )


def _permission(rule: AuthzRule) -> rbac_pb2.Permission:
    rules: list[rbac_pb2.Permission] = []
    if rule.paths:
        rules.append(_paths(rule.paths))
    if rule.not_paths:
        rules.append(rbac_pb2.Permission(not_rule=_paths(rule.not_paths)))
    if rule.methods:
        rules.append(
            _or_rules(
                [
                    _header(HeaderMatcher(name=":method", exact=method))
                    for method in rule.methods
                ]
            )
        )
    rules.extend(_header(h) for h in rule.headers)
    if not rules:
        return rbac_pb2.Permission(any=True)
    return rbac_pb2.Permission(and_rules=rbac_pb2.Permission.Set(rules=rules))


def _rbac(kind: str, rules: Sequence[AuthzRule], action: int) -> rbac_filter_pb2.RBAC:
    return rbac_filter_pb2.RBAC(
        rules=rbac_pb2.RBAC(
            action=action,
            policies={
                f"{kind}[{i}]": rbac_pb2.Policy(
                    permissions=[_permission(rule)], principals=[_principal(rule)]
                )
                for i, rule in enumerate(rules)
            },
        )
    )


def rbac_filters(
    policy: AuthorizationPolicy, deny_filter: bool = False, allow_filter: bool = False
) -> list[hcm_pb2.HttpFilter]:
    """The DENY and ALLOW filters the policy needs, or that a route's policy needs to override
    (``deny_filter``, ``allow_filter``): a DENY filter without rules refuses nothing, an ALLOW
    filter without rules gets one that allows everything."""
    filters = []
    if policy.deny or deny_filter:
        deny = _rbac("deny", policy.deny, rbac_pb2.RBAC.DENY)
        filters.append(hcm_pb2.HttpFilter(name=RBAC_DENY_FILTER, typed_config=pack(deny)))
    if policy.allow or allow_filter:
        allow = _rbac("allow", policy.allow or (AuthzRule(),), rbac_pb2.RBAC.ALLOW)
        filters.append(hcm_pb2.HttpFilter(name=RBAC_ALLOW_FILTER, typed_config=pack(allow)))
    return filters


# ---------------------------------------------------------------- one inbound listener


def route_requirement(index: int) -> str:
    """The ``requirement_map`` key of the service's route ``index``."""
    return f"routes[{index}]"


def inbound_http_filters(
    service: ServiceSecurity,
    security: SecurityConfig,
    routes: Sequence[MeshRouteSecurity] = (),
) -> tuple[list[hcm_pb2.HttpFilter], dict[str, Any]]:
    """The filters that go before the router, and the ``jwt_providers`` metadata block.

    ``routes``: the service's routes' own security, by route index. A route can only override
    a filter the listener has, so their needs add filters: the JWT filter with every provider
    any of them names, and both RBAC filters when one overrides authorization."""
    filters: list[hcm_pb2.HttpFilter] = []
    metadata: dict[str, Any] = {}
    wide = service.jwt.providers if service.jwt is not None else ()
    names = _provider_names(service, routes)
    if names:
        providers = [security.jwt_providers[name] for name in names]
        requirements = {
            route_requirement(i): route.jwt for i, route in enumerate(routes) if route.jwt
        }
        required = service.jwt.required if service.jwt is not None else True
        authn = jwt_authn(providers, required, requirements, wide)
        filters.append(hcm_pb2.HttpFilter(name=JWT_FILTER, typed_config=pack(authn)))
        metadata = jwt_metadata(providers)
    overridden = any(route.authorization is not None for route in routes)
    if service.authorization is not None or overridden:
        policy = service.authorization or AuthorizationPolicy()
        filters.extend(rbac_filters(policy, overridden, overridden))
    return filters, metadata


def route_filter_configs(route: MeshRouteSecurity, index: int) -> dict[str, any_pb2.Any]:
    """A route's ``typed_per_filter_config`` entries for its own JWT and authorization."""
    configs: dict[str, any_pb2.Any] = {}
    if route.jwt_off:
        configs[JWT_FILTER] = pack(jwt_pb2.PerRouteConfig(disabled=True))
    elif route.jwt is not None:
        requirement = jwt_pb2.PerRouteConfig(requirement_name=route_requirement(index))
        configs[JWT_FILTER] = pack(requirement)
    policy = route.authorization
    if policy is not None:
        deny = _rbac("deny", policy.deny, rbac_pb2.RBAC.DENY)
        allow = _rbac("allow", policy.allow or (AuthzRule(),), rbac_pb2.RBAC.ALLOW)
        configs[RBAC_DENY_FILTER] = pack(rbac_filter_pb2.RBACPerRoute(rbac=deny))
        configs[RBAC_ALLOW_FILTER] = pack(rbac_filter_pb2.RBACPerRoute(rbac=allow))
    return configs
