"""JWT and authorization out of xDS: Envoy's ``jwt_authn`` and ``rbac`` HTTP filters read back
into the ``ListenerJwt`` and ``AuthorizationPolicy`` a static bootstrap gives a listener.

The shapes are the ones ``control_plane/xds/authn_xds.py`` writes (and Envoy reads). Whatever
our model cannot express raises ``ConfigError`` naming the field, so the update is NACKed and
the listener keeps its last good policy: a filter half understood would let requests through
that the control plane meant to refuse. A route's per-filter configs of the two filters become
its ``RouteSecurity`` (``translate_route_security``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from envoy.config.listener.v3 import listener_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2

from pilotfish.config.errors import ConfigError
from pilotfish.config.security import (
    DEFAULT_JWT_ALGORITHMS,
    IDENTITY_HEADER,
    JWT_ALGORITHMS,
    AuthorizationPolicy,
    AuthzRule,
    JwksSource,
    JwtProvider,
    ListenerJwt,
    RouteSecurity,
)
from sidecar.xds.common import OurMetadata, seconds, type_name, unpack, unsupported
from sidecar.xds.rbac import HeaderReader, read_rbac

JWT_TYPE = jwt_pb2.JwtAuthentication.DESCRIPTOR.full_name
RBAC_TYPE = rbac_filter_pb2.RBAC.DESCRIPTOR.full_name


@dataclass(frozen=True, slots=True)
class ListenerSecurity:
    jwt: ListenerJwt | None = None
    authorization: AuthorizationPolicy | None = None
    jwt_requirements: tuple[tuple[str, ListenerJwt], ...] = ()


def reject_http_security(hcm: hcm_pb2.HttpConnectionManager, path: str) -> None:
    """An api_listener (a proxyless client's, or our outbound side) enforces no JWT or RBAC."""
    for i, http_filter in enumerate(hcm.http_filters):
        if type_name(http_filter.typed_config) in (JWT_TYPE, RBAC_TYPE):
            raise ConfigError(f"{path}.http_filters[{i}]", "not supported on an api_listener")


def translate_http_security(
    hcm: hcm_pb2.HttpConnectionManager,
    listener: listener_pb2.Listener,
    path: str,
    metadata_keys: set[str],
    header: HeaderReader,
) -> ListenerSecurity:
    """The listener's JWT and RBAC filters, which must come before any other filter."""
    jwt: ListenerJwt | None = None
    requirements: tuple[tuple[str, ListenerJwt], ...] = ()
    has_jwt = False
    payload_key = ""
    deny: tuple[AuthzRule, ...] | None = None
    allow: tuple[AuthzRule, ...] | None = None
    seen_other = False
    for i, http_filter in enumerate(hcm.http_filters):
        kind = type_name(http_filter.typed_config)
        f_path = f"{path}.http_filters[{i}]"
        if kind not in (JWT_TYPE, RBAC_TYPE):
            seen_other = True
            continue
        if seen_other:
            raise ConfigError(f_path, "JWT and RBAC filters must come first")
        if kind == JWT_TYPE:
            if has_jwt or deny is not None or allow is not None:
                raise ConfigError(f_path, "one jwt_authn filter, before the RBAC filters")
            config = jwt_pb2.JwtAuthentication()
            unpack(f"{f_path}.typed_config", http_filter.typed_config, config)
            ours = OurMetadata(listener.metadata, path, metadata_keys)
            jwt, requirements, payload_key = _jwt(config, f"{f_path}.typed_config", ours)
            has_jwt = True
            continue
        rbac = rbac_filter_pb2.RBAC()
        unpack(f"{f_path}.typed_config", http_filter.typed_config, rbac)
        r_path = f"{f_path}.typed_config"
        unsupported(rbac, r_path, {"rules", "rules_stat_prefix"})
        action, rules = read_rbac(rbac.rules, f"{r_path}.rules", payload_key, header)
        if action == rbac_pb2.RBAC.DENY:
            if deny is not None or allow is not None:
                raise ConfigError(f_path, "one DENY filter, before the ALLOW filter")
            deny = rules
        else:
            if allow is not None:
                raise ConfigError(f_path, "one ALLOW filter")
            # ALLOW without policies refuses everything: a deny rule that matches everything.
            allow = rules
            if not rules:
                deny = (*(deny or ()), AuthzRule())
    if not has_jwt and OurMetadata(listener.metadata, path, metadata_keys).has("jwt_providers"):
        raise ConfigError(f"{path}.http_filters", "jwt_providers metadata, but no jwt_authn filter")
    policy = None
    if deny is not None or allow is not None:
        policy = AuthorizationPolicy(allow=allow or (), deny=deny or ())
    return ListenerSecurity(jwt, policy, requirements)


# ---------------------------------------------------------------- jwt_authn


@dataclass(slots=True)
class _Extra:
    """A provider's fields from the listener's ``jwt_providers`` metadata."""

    refresh: float | None = None
    min_refetch: float = 30.0
    algorithms: tuple[str, ...] = DEFAULT_JWT_ALGORITHMS
    clock_skew: float | None = None
    names: set[str] = field(default_factory=set)


def _extras(ours: OurMetadata) -> dict[str, _Extra]:
    if not ours.has("jwt_providers"):
        return {}
    extras = {}
    for name, node in ours.node("jwt_providers").items():
        node.mapping({"refresh", "min_refetch", "algorithms", "clock_skew"})
        extra = _Extra(min_refetch=node.get("min_refetch").as_duration(30.0))
        if node.has("refresh"):
            extra.refresh = node.get("refresh").as_duration()
        if node.has("clock_skew"):
            extra.clock_skew = node.get("clock_skew").as_duration()
        if node.has("algorithms"):
            extra.algorithms = tuple(
                a.as_choice(JWT_ALGORITHMS) for a in node.get("algorithms").elements()
            )
        extras[name] = extra
    return extras


def _jwt(
    config: jwt_pb2.JwtAuthentication, path: str, ours: OurMetadata
) -> tuple[ListenerJwt | None, tuple[tuple[str, ListenerJwt], ...], str]:
    """The listener-wide requirement (None without a rule: only routes naming one of the
    ``requirement_map`` check tokens), the named ones, and the claims' metadata key."""
    unsupported(config, path, {"providers", "rules", "requirement_map"})
    extras = _extras(ours)
    for name in extras:
        if name not in config.providers:
            raise ConfigError(f"{ours.path}.jwt_providers.{name}", "no such provider")
    providers: dict[str, JwtProvider] = {}
    payload_keys = set()
    for name in sorted(config.providers):
        p_path = f"{path}.providers[{name}]"
        provider, payload_key = _provider(name, config.providers[name], p_path, extras)
        providers[name] = provider
        payload_keys.add(payload_key)
    if not providers:
        raise ConfigError(f"{path}.providers", "at least one provider is required")
    if len(payload_keys) > 1:
        raise ConfigError(f"{path}.providers", "all providers must share payload_in_metadata")
    if len(config.rules) > 1:
        raise ConfigError(f"{path}.rules", "at most one rule (for every path) is supported")
    wide = None
    if config.rules:
        rule = config.rules[0]
        r_path = f"{path}.rules[0]"
        unsupported(rule, r_path, {"match", "requires"})
        if rule.match.WhichOneof("path_specifier") != "prefix" or rule.match.prefix != "/":
            raise ConfigError(f"{r_path}.match", "only prefix / (the whole listener) is supported")
        unsupported(rule.match, f"{r_path}.match", {"prefix"})
        wide = _chosen(rule.requires, f"{r_path}.requires", providers)
    elif not config.requirement_map:
        raise ConfigError(f"{path}.rules", "a rule for every path, or a requirement_map")
    named = tuple(
        (name, _chosen(config.requirement_map[name], f"{path}.requirement_map[{name}]", providers))
        for name in sorted(config.requirement_map)
    )
    return wide, named, payload_keys.pop()


def _chosen(
    requires: jwt_pb2.JwtRequirement, path: str, providers: dict[str, JwtProvider]
) -> ListenerJwt:
    names, required = _requirement(requires, path)
    for i, name in enumerate(names):
        if name not in providers:
            raise ConfigError(path, f"unknown provider {name!r} (entry {i})")
    # Only the providers the requirement names are ever consulted.
    return ListenerJwt(tuple(providers[name] for name in names), required)


def _requirement(req: jwt_pb2.JwtRequirement, path: str) -> tuple[list[str], bool]:
    """(provider names, required): ``provider_name``, or ``requires_any`` of provider names and
    at most one ``allow_missing``."""
    kind = req.WhichOneof("requires_type")
    if kind == "provider_name":
        return [req.provider_name], True
    if kind != "requires_any":
        raise ConfigError(f"{path}.{kind or 'requires_type'}", "only provider_name or requires_any")
    names: list[str] = []
    required = True
    for i, item in enumerate(req.requires_any.requirements):
        item_kind = item.WhichOneof("requires_type")
        if item_kind == "provider_name":
            names.append(item.provider_name)
        elif item_kind == "allow_missing" and required:
            required = False
        else:
            raise ConfigError(
                f"{path}.requires_any.requirements[{i}]",
                "only provider_name entries and one allow_missing",
            )
    if not names:
        raise ConfigError(f"{path}.requires_any", "name at least one provider")
    return names, required


def _provider(
    name: str, p: jwt_pb2.JwtProvider, path: str, extras: dict[str, _Extra]
) -> tuple[JwtProvider, str]:
    unsupported(p, path, {
        "issuer", "audiences", "remote_jwks", "local_jwks", "forward", "from_headers",
        "payload_in_metadata", "clock_skew_seconds", "claim_to_headers",
    })  # fmt: skip
    if not p.issuer:
        raise ConfigError(f"{path}.issuer", "required")
    if not p.audiences:
        raise ConfigError(f"{path}.audiences", "name at least one audience")
    if not p.forward:
        raise ConfigError(f"{path}.forward", "must be true: the token is passed on to the app")
    if not p.payload_in_metadata:
        raise ConfigError(f"{path}.payload_in_metadata", "required")
    extra = extras.get(name, _Extra())
    kind = p.WhichOneof("jwks_source_specifier")
    if kind == "remote_jwks":
        unsupported(p.remote_jwks, f"{path}.remote_jwks", {"http_uri", "cache_duration"})
        uri = p.remote_jwks.http_uri.uri
        if not uri.startswith(("https://", "http://")):
            raise ConfigError(f"{path}.remote_jwks.http_uri.uri", "expected an http(s):// URL")
        refresh = 300.0
        if p.remote_jwks.HasField("cache_duration"):
            refresh = seconds(p.remote_jwks.cache_duration)
        jwks = JwksSource(uri=uri, refresh=refresh, min_refetch=extra.min_refetch)
    elif kind == "local_jwks":
        source = p.local_jwks
        s_kind = source.WhichOneof("specifier")
        refresh = extra.refresh if extra.refresh is not None else 300.0
        if s_kind == "filename":
            jwks = JwksSource(file=source.filename, refresh=refresh, min_refetch=extra.min_refetch)
        elif s_kind == "inline_string":
            jwks = JwksSource(inline=source.inline_string, min_refetch=extra.min_refetch)
        else:
            raise ConfigError(f"{path}.local_jwks", "only filename or inline_string")
    else:
        raise ConfigError(f"{path}.jwks_source_specifier", "remote_jwks or local_jwks required")
    header = "authorization"
    if len(p.from_headers) > 1:
        raise ConfigError(f"{path}.from_headers", "at most one header")
    if p.from_headers:
        h = p.from_headers[0]
        header = h.name.lower()
        bearer = h.value_prefix.lower() == "bearer "
        if header == "authorization" and not bearer:
            raise ConfigError(f"{path}.from_headers[0].value_prefix", "Bearer on authorization")
        if header != "authorization" and h.value_prefix:
            raise ConfigError(f"{path}.from_headers[0].value_prefix", "only on authorization")
    forward: list[tuple[str, str]] = []
    for i, c in enumerate(p.claim_to_headers):
        target = c.header_name.lower()
        if target in (IDENTITY_HEADER, "authorization", "host") or target.startswith(":"):
            raise ConfigError(f"{path}.claim_to_headers[{i}].header_name", "cannot carry a claim")
        forward.append((c.claim_name, target))
    # Envoy reads 0 as its default, 60 s; a skew of 0 or a fraction comes in our metadata.
    skew = extra.clock_skew
    if skew is None:
        skew = float(p.clock_skew_seconds) if p.clock_skew_seconds else 60.0
    return (
        JwtProvider(
            name=name,
            issuer=p.issuer,
            audiences=tuple(p.audiences),
            jwks=jwks,
            algorithms=extra.algorithms,
            clock_skew=skew,
            header=header,
            forward_claims=tuple(forward),
        ),
        p.payload_in_metadata,
    )


# ---------------------------------------------------------------- per route

JWT_PER_ROUTE_TYPE = jwt_pb2.PerRouteConfig.DESCRIPTOR.full_name
RBAC_PER_ROUTE_TYPE = rbac_filter_pb2.RBACPerRoute.DESCRIPTOR.full_name
ROUTE_SECURITY_TYPES = frozenset({JWT_PER_ROUTE_TYPE, RBAC_PER_ROUTE_TYPE})


def translate_route_security(
    configs: Mapping[str, any_pb2.Any], path: str, header: HeaderReader
) -> RouteSecurity | None:
    """A route's ``jwt_authn`` ``PerRouteConfig`` and ``RBACPerRoute`` entries: which named
    requirement of its listener's JWT filter applies (or none), and rules replacing the
    listener's DENY and ALLOW rules, told apart by their action."""
    requirement: str | None = None
    disabled = False
    deny: tuple[AuthzRule, ...] | None = None
    allow: tuple[AuthzRule, ...] | None = None
    found = False
    for name in sorted(configs):
        packed, f_path = configs[name], f"{path}[{name}]"
        kind = type_name(packed)
        if kind == JWT_PER_ROUTE_TYPE:
            per_route = jwt_pb2.PerRouteConfig()
            unpack(f_path, packed, per_route)
            which = per_route.WhichOneof("requirement_specifier")
            if which == "disabled" and per_route.disabled:
                disabled = True
            elif which == "requirement_name" and per_route.requirement_name:
                requirement = per_route.requirement_name
            else:
                raise ConfigError(f_path, "disabled: true or a requirement_name")
            found = True
        elif kind == RBAC_PER_ROUTE_TYPE:
            rbac = rbac_filter_pb2.RBACPerRoute()
            unpack(f_path, packed, rbac)
            r_path = f"{f_path}.rbac"
            if not rbac.HasField("rbac") or not rbac.rbac.HasField("rules"):
                raise ConfigError(f"{r_path}.rules", "required (rules replacing the listener's)")
            unsupported(rbac.rbac, r_path, {"rules"})
            # The route cannot know its listener's payload key; the claims' names are the same.
            action, rules = read_rbac(rbac.rbac.rules, f"{r_path}.rules", None, header)
            if action == rbac_pb2.RBAC.DENY:
                if deny is not None:
                    raise ConfigError(f_path, "a second DENY policy for one route")
                deny = rules
            else:
                if allow is not None:
                    raise ConfigError(f_path, "a second ALLOW policy for one route")
                if not rules:
                    raise ConfigError(f"{r_path}.rules.policies", "an ALLOW with no policies")
                allow = rules
            found = True
    if not found:
        return None
    return RouteSecurity(
        jwt_requirement=requirement, jwt_disabled=disabled, deny=deny, allow=allow
    )
