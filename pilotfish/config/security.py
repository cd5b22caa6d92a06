"""Security config in the mesh file: mTLS mode, JWT providers and authorization policies.

Shape (keys documented in ``docs/mesh-reference.md``)::

    security:
      trust_domain: cluster.local
      mtls: {mode: PERMISSIVE, namespaces: {payments: STRICT}}
      jwt_providers:
        auth0:
          issuer: https://example.auth0.com/
          audiences: [orders-api]
          jwks: {uri: https://example.auth0.com/.well-known/jwks.json, refresh: 5m}
          forward_claims: {sub: x-user-id}
    services:
      orders:
        mtls: STRICT
        jwt: {providers: [auth0], required: true}
        authorization:
          deny: [{from: {namespaces: [sandbox]}}]
          allow: [{from: {principals: [spiffe://cluster.local/ns/shop/sa/web]},
                   to: {methods: [GET], paths: [/orders/*]}}]
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from pilotfish.config.errors import ConfigError
from pilotfish.config.fields import Node
from pilotfish.config.matchers import HeaderMatcher, parse_header_matcher
from pilotfish.identity import InvalidSpiffeId, SpiffeId, check_trust_domain

SECURITY_KEYS = frozenset({"trust_domain", "mtls", "jwt_providers"})
SERVICE_SECURITY_KEYS = frozenset({"mtls", "jwt", "authorization"})
JWT_ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "EdDSA")
DEFAULT_JWT_ALGORITHMS = ("RS256", "ES256", "EdDSA")
_HEADER_NAME = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")
# Headers the mesh itself sets from verified facts; a rule may not forward a claim into them.
IDENTITY_HEADER = "x-pilotfish-peer-identity"


class MtlsMode(enum.Enum):
    PERMISSIVE = "PERMISSIVE"
    """Inbound accepts plaintext and mTLS, told apart by the first bytes."""
    STRICT = "STRICT"
    """Inbound accepts only mTLS with a certificate from the mesh's CA."""


@dataclass(frozen=True, slots=True)
class MtlsPolicy:
    mode: MtlsMode = MtlsMode.PERMISSIVE
    namespaces: Mapping[str, MtlsMode] = field(default_factory=dict)
    enabled: bool = False
    """The mesh file has ``security.mtls``: every sidecar has a certificate, callers originate
    mTLS, and ``mode`` says whether servers also take plaintext."""

    def mode_for(self, namespace: str, service_override: MtlsMode | None) -> MtlsMode:
        """The service's own setting wins, then its namespace's, then the mesh default."""
        if service_override is not None:
            return service_override
        return self.namespaces.get(namespace, self.mode)

    def effective(self, namespace: str, service_override: MtlsMode | None) -> MtlsMode | None:
        """None when mTLS is configured nowhere for this service (plaintext, as before)."""
        if not self.enabled and service_override is None:
            return None
        return self.mode_for(namespace, service_override)


@dataclass(frozen=True, slots=True)
class UpstreamMtls:
    """Outbound mTLS to a cluster's endpoints, with the identities they may have."""

    identities: frozenset[SpiffeId] = frozenset()
    """Empty: any identity in our trust domain."""


def parse_upstream_mtls(node: Node) -> UpstreamMtls | None:
    """``mtls: true``, ``mtls: false`` or ``mtls: {identities: [spiffe://…]}``."""
    if isinstance(node.value, bool):
        return UpstreamMtls() if node.value else None
    node.mapping({"identities"})
    identities = []
    for item in node.require("identities").elements():
        try:
            identities.append(SpiffeId.parse(item.as_str()))
        except InvalidSpiffeId as exc:
            raise item.error(str(exc)) from None
    if not identities:
        raise node.get("identities").error("expected a non-empty list")
    return UpstreamMtls(frozenset(identities))


@dataclass(frozen=True, slots=True)
class JwksSource:
    """Exactly one of inline, file, uri."""

    inline: str | None = None
    file: str | None = None
    uri: str | None = None
    refresh: float = 300.0
    """How often a file or URI is read again; an unknown key id also triggers a read, at most
    once per ``min_refetch``."""
    min_refetch: float = 30.0


@dataclass(frozen=True, slots=True)
class JwtProvider:
    name: str
    issuer: str
    audiences: tuple[str, ...]
    jwks: JwksSource
    algorithms: tuple[str, ...] = DEFAULT_JWT_ALGORITHMS
    clock_skew: float = 60.0
    header: str = "authorization"
    """Where the token is: ``authorization`` takes ``Bearer <token>``, other headers the bare
    token."""
    forward_claims: tuple[tuple[str, str], ...] = ()
    """(claim, header) pairs: verified claims passed on; client-sent copies always removed."""


@dataclass(frozen=True, slots=True)
class ListenerJwt:
    """JWT on a sidecar listener (bootstrap): the providers themselves, not names."""

    providers: tuple[JwtProvider, ...]
    required: bool = True


def parse_listener_jwt(node: Node) -> ListenerJwt:
    """``jwt: {providers: {<name>: <provider>}, required: true}``."""
    node.mapping({"providers", "required"})
    providers = tuple(
        parse_jwt_provider(name, p) for name, p in node.require("providers").items()
    )
    if not providers:
        raise node.get("providers").error("expected at least one provider")
    return ListenerJwt(providers, node.get("required").as_bool(True))


@dataclass(frozen=True, slots=True)
class JwtRequirement:
    providers: tuple[str, ...]
    required: bool = True
    """False: requests without a token pass (unauthenticated); a bad token is still refused."""


@dataclass(frozen=True, slots=True)
class PathPattern:
    """``/exact``, ``/prefix/*`` or ``*``."""

    text: str

    def matches(self, path: str) -> bool:
        if self.text == "*":
            return True
        if self.text.endswith("*"):
            return path.startswith(self.text[:-1])
        return path == self.text


@dataclass(frozen=True, slots=True)
class PrincipalPattern:
    """A SPIFFE ID, or one ending in ``*`` to match a prefix (``spiffe://td/ns/shop/*``)."""

    text: str

    def matches(self, principal: str) -> bool:
        if self.text.endswith("*"):
            return principal.startswith(self.text[:-1])
        return principal == self.text


@dataclass(frozen=True, slots=True)
class AuthzRule:
    """Every field that is set must match (AND); within a field, any value may match (OR).

    A rule with no fields matches every request.
    """

    principals: tuple[PrincipalPattern, ...] = ()
    not_principals: tuple[PrincipalPattern, ...] = ()
    namespaces: tuple[str, ...] = ()
    authenticated: bool | None = None
    """True: the peer presented a mesh certificate; False: it did not."""
    paths: tuple[PathPattern, ...] = ()
    not_paths: tuple[PathPattern, ...] = ()
    methods: tuple[str, ...] = ()
    headers: tuple[HeaderMatcher, ...] = ()
    claims: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """(claim, accepted values): a JWT claim (string or list of strings) holding any value."""


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    """DENY rules first, any match refuses; then, if there are ALLOW rules, one must match."""

    allow: tuple[AuthzRule, ...] = ()
    deny: tuple[AuthzRule, ...] = ()


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    trust_domain: str = "cluster.local"
    mtls: MtlsPolicy = field(default_factory=MtlsPolicy)
    jwt_providers: Mapping[str, JwtProvider] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ServiceSecurity:
    mtls: MtlsMode | None = None
    jwt: JwtRequirement | None = None
    authorization: AuthorizationPolicy | None = None


def _mode(node: Node) -> MtlsMode:
    return MtlsMode(node.as_choice(tuple(m.value for m in MtlsMode)))


def _header_name(node: Node) -> str:
    name = node.as_str().lower()
    if not _HEADER_NAME.match(name):
        raise node.error("expected an HTTP header name")
    if name.startswith(":"):
        raise node.error("pseudo-headers cannot be set")
    return name


def _jwks(node: Node) -> JwksSource:
    node.mapping({"inline", "file", "uri", "refresh", "min_refetch"})
    given = [k for k in ("inline", "file", "uri") if node.has(k)]
    if len(given) != 1:
        raise node.error("give exactly one of inline, file, uri")
    uri = node.get("uri").as_str() if node.has("uri") else None
    if uri is not None and not uri.startswith(("https://", "http://")):
        raise node.get("uri").error("expected an http:// or https:// URL")
    inline = node.get("inline")
    return JwksSource(
        inline=inline.as_str() if inline.value is not None else None,
        file=node.get("file").as_str() if node.has("file") else None,
        uri=uri,
        refresh=node.get("refresh").as_duration(300.0),
        min_refetch=node.get("min_refetch").as_duration(30.0),
    )


def parse_jwt_provider(name: str, node: Node) -> JwtProvider:
    node.mapping(
        {"issuer", "audiences", "jwks", "algorithms", "clock_skew", "header", "forward_claims"}
    )
    audiences = tuple(a.as_str() for a in node.require("audiences").elements())
    if not audiences:
        raise node.get("audiences").error("name at least one audience")
    algorithms: tuple[str, ...] = DEFAULT_JWT_ALGORITHMS
    if node.has("algorithms"):
        algorithms = tuple(a.as_choice(JWT_ALGORITHMS) for a in node.get("algorithms").elements())
        if not algorithms:
            raise node.get("algorithms").error("name at least one algorithm")
    forward: list[tuple[str, str]] = []
    if node.has("forward_claims"):
        for claim, header_node in node.get("forward_claims").items():
            header = _header_name(header_node)
            if header in (IDENTITY_HEADER, "authorization", "host"):
                raise header_node.error(f"{header} cannot carry a claim")
            forward.append((claim, header))
    return JwtProvider(
        name=name,
        issuer=node.require("issuer").as_str(),
        audiences=audiences,
        jwks=_jwks(node.require("jwks")),
        algorithms=algorithms,
        clock_skew=node.get("clock_skew").as_duration(60.0),
        header=_header_name(node.get("header")) if node.has("header") else "authorization",
        forward_claims=tuple(forward),
    )


def parse_security(node: Node) -> SecurityConfig:
    if node.value is None:
        return SecurityConfig()
    node.mapping(set(SECURITY_KEYS))
    trust_domain = "cluster.local"
    if node.has("trust_domain"):
        td = node.get("trust_domain")
        try:
            trust_domain = check_trust_domain(td.as_str())
        except InvalidSpiffeId as exc:
            raise td.error(str(exc)) from None
    mtls = MtlsPolicy()
    if node.has("mtls"):
        m = node.get("mtls").mapping({"mode", "namespaces"})
        default = _mode(m.get("mode")) if m.has("mode") else MtlsMode.PERMISSIVE
        namespaces = {}
        if m.has("namespaces"):
            namespaces = {ns: _mode(v) for ns, v in m.get("namespaces").items()}
        mtls = MtlsPolicy(default, namespaces, enabled=True)
    providers = {}
    if node.has("jwt_providers"):
        providers = {
            name: parse_jwt_provider(name, p) for name, p in node.get("jwt_providers").items()
        }
    return SecurityConfig(trust_domain, mtls, providers)


def _strings(node: Node) -> tuple[str, ...]:
    values = tuple(v.as_str() for v in node.elements())
    if not values:
        raise node.error("expected a non-empty list")
    return values


def _principal(node: Node) -> PrincipalPattern:
    text = node.as_str()
    if text.endswith("*"):
        if not text.startswith("spiffe://"):
            raise node.error("expected a SPIFFE ID, or a spiffe:// prefix ending in *")
        return PrincipalPattern(text)
    try:
        SpiffeId.parse(text)
    except InvalidSpiffeId as exc:
        raise node.error(str(exc)) from None
    return PrincipalPattern(text)


def _path(node: Node) -> PathPattern:
    text = node.as_str()
    if text != "*" and not text.startswith("/"):
        raise node.error("expected a path starting with / (ending in * for a prefix), or *")
    if "*" in text[:-1]:
        raise node.error("* is only allowed at the end")
    return PathPattern(text)


def parse_rule(node: Node) -> AuthzRule:
    node.mapping({"from", "to", "when"})
    src = node.get("from")
    dst = node.get("to")
    when = node.get("when")
    if src.value is not None:
        src.mapping({"principals", "not_principals", "namespaces", "authenticated"})
    if dst.value is not None:
        dst.mapping({"paths", "not_paths", "methods", "headers"})
    claims: list[tuple[str, tuple[str, ...]]] = []
    if when.value is not None:
        when.mapping({"claims"})
        for claim, values in when.require("claims").items():
            claims.append((claim, _strings(values)))

    def listed(parent: Node, key: str) -> Node | None:
        return parent.get(key) if parent.has(key) else None

    def each(parent: Node, key: str) -> list[Node]:
        child = listed(parent, key)
        if child is None:
            return []
        items = list(child.elements())
        if not items:
            raise child.error("expected a non-empty list")
        return items

    authenticated = listed(src, "authenticated")
    paths = tuple(_path(p) for p in each(dst, "paths"))
    if any(p.text == "*" for p in paths):
        paths = ()  # any path: no constraint, the same rule as without `paths`
    return AuthzRule(
        principals=tuple(_principal(p) for p in each(src, "principals")),
        not_principals=tuple(_principal(p) for p in each(src, "not_principals")),
        namespaces=tuple(n.as_str() for n in each(src, "namespaces")),
        authenticated=authenticated.as_bool() if authenticated is not None else None,
        paths=paths,
        not_paths=tuple(_path(p) for p in each(dst, "not_paths")),
        methods=tuple(m.as_str().upper() for m in each(dst, "methods")),
        headers=tuple(parse_header_matcher(h) for h in each(dst, "headers")),
        claims=tuple(claims),
    )


def parse_authorization(node: Node) -> AuthorizationPolicy:
    node.mapping({"allow", "deny"})
    allow = tuple(parse_rule(r) for r in node.get("allow").elements()) if node.has("allow") else ()
    deny = tuple(parse_rule(r) for r in node.get("deny").elements()) if node.has("deny") else ()
    return AuthorizationPolicy(allow=allow, deny=deny)


def parse_service_security(node: Node, security: SecurityConfig) -> ServiceSecurity:
    """The per-service keys (``SERVICE_SECURITY_KEYS``) of a service node with other keys too."""
    mtls = _mode(node.get("mtls")) if node.has("mtls") else None
    jwt = _jwt_requirement(node.get("jwt"), security) if node.has("jwt") else None
    authz = parse_authorization(node.get("authorization")) if node.has("authorization") else None
    if authz is not None and jwt is None:
        _check_claims(node, authz, "matches JWT claims, but the service has no jwt requirement")
    return ServiceSecurity(mtls=mtls, jwt=jwt, authorization=authz)


# ---------------------------------------------------------------- per route

ROUTE_SECURITY_KEYS = frozenset({"jwt", "authorization"})


@dataclass(frozen=True, slots=True)
class MeshRouteSecurity:
    """A mesh route's own ``jwt`` and ``authorization``, replacing its service's for the
    requests the route matches (on the service's inbound side)."""

    jwt: JwtRequirement | None = None
    """None: the service's requirement, unless ``jwt_off``."""
    jwt_off: bool = False
    authorization: AuthorizationPolicy | None = None
    """None: the service's policy."""

    @property
    def overrides(self) -> bool:
        return self.jwt is not None or self.jwt_off or self.authorization is not None


def _jwt_requirement(node: Node, security: SecurityConfig) -> JwtRequirement:
    j = node.mapping({"providers", "required"})
    providers = []
    for p in j.require("providers").elements():
        name = p.as_str()
        if name not in security.jwt_providers:
            known = ", ".join(sorted(security.jwt_providers)) or "none defined"
            raise p.error(f"unknown JWT provider {name!r} (security.jwt_providers: {known})")
        providers.append(name)
    if not providers:
        raise j.get("providers").error("expected a non-empty list")
    return JwtRequirement(tuple(providers), j.get("required").as_bool(True))


def _check_claims(node: Node, authz: AuthorizationPolicy, problem: str) -> None:
    for kind, rules in (("allow", authz.allow), ("deny", authz.deny)):
        for i, rule in enumerate(rules):
            if rule.claims:
                raise ConfigError(f"{node.get('authorization').path}.{kind}[{i}].when", problem)


def parse_route_security(
    node: Node, security: SecurityConfig, service_jwt: JwtRequirement | None
) -> MeshRouteSecurity:
    """A route node's ``jwt`` (a requirement, or ``off``) and ``authorization``."""
    jwt = None
    jwt_off = False
    if node.has("jwt"):
        j = node.get("jwt")
        # YAML 1.1 reads a bare `off` as false.
        if j.value is False or j.value == "off":
            jwt_off = True
        elif isinstance(j.value, dict):
            jwt = _jwt_requirement(j, security)
        else:
            raise j.error("expected {providers: [...], required: ...} or off")
    authz = parse_authorization(node.get("authorization")) if node.has("authorization") else None
    if authz is not None and (jwt_off or (jwt is None and service_jwt is None)):
        _check_claims(node, authz, "matches JWT claims, but the route has no jwt requirement")
    return MeshRouteSecurity(jwt=jwt, jwt_off=jwt_off, authorization=authz)


@dataclass(frozen=True, slots=True)
class RouteSecurity:
    """A sidecar route's JWT and authorization, replacing its listener's (Envoy's per-route
    configs of the ``jwt_authn`` and ``rbac`` filters)."""

    jwt_requirement: str | None = None
    """Names one of the listener's ``jwt_requirements``."""
    jwt_disabled: bool = False
    deny: tuple[AuthzRule, ...] | None = None
    """None: the listener's deny rules."""
    allow: tuple[AuthzRule, ...] | None = None
    """None: the listener's allow rules."""

    def policy(self, listener: AuthorizationPolicy | None) -> AuthorizationPolicy | None:
        if self.deny is None and self.allow is None:
            return listener
        base = listener or AuthorizationPolicy()
        return AuthorizationPolicy(
            allow=self.allow if self.allow is not None else base.allow,
            deny=self.deny if self.deny is not None else base.deny,
        )
