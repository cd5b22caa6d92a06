"""JWT and authorization out of xDS: Envoy's ``jwt_authn`` and ``rbac`` HTTP filters read back
into the ``ListenerJwt`` and ``AuthorizationPolicy`` a static bootstrap gives a listener.

The shapes are the ones ``control_plane/xds/authn_xds.py`` writes (and Envoy reads). Whatever
our model cannot express raises ``ConfigError`` naming the field, so the update is NACKed and
the listener keeps its last good policy: a filter half understood would let requests through
that the control plane meant to refuse.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from envoy.config.listener.v3 import listener_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.matcher.v3 import string_pb2, value_pb2

from pilotfish.config.errors import ConfigError
from pilotfish.config.matchers import HeaderMatcher
from pilotfish.config.security import (
    DEFAULT_JWT_ALGORITHMS,
    IDENTITY_HEADER,
    JWT_ALGORITHMS,
    AuthorizationPolicy,
    AuthzRule,
    JwksSource,
    JwtProvider,
    ListenerJwt,
    PathPattern,
    PrincipalPattern,
)
from pilotfish.identity import InvalidSpiffeId, SpiffeId
from sidecar.xds.common import OurMetadata, seconds, type_name, unpack, unsupported

JWT_TYPE = jwt_pb2.JwtAuthentication.DESCRIPTOR.full_name
RBAC_TYPE = rbac_filter_pb2.RBAC.DESCRIPTOR.full_name
JWT_FILTER = "envoy.filters.http.jwt_authn"
_NAMESPACE = re.compile(r"^spiffe://\[\^/\]\+/ns/(.+)/sa/\[\^/\]\+$")
_POLICY_INDEX = re.compile(r"\[(\d+)\]$")
HeaderReader = Callable[[route_components_pb2.HeaderMatcher, str], HeaderMatcher]
"""The route translator's header matcher reader (``sidecar.xds.translate``)."""


@dataclass(frozen=True, slots=True)
class ListenerSecurity:
    jwt: ListenerJwt | None = None
    authorization: AuthorizationPolicy | None = None


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
            if jwt is not None or deny is not None or allow is not None:
                raise ConfigError(f_path, "one jwt_authn filter, before the RBAC filters")
            config = jwt_pb2.JwtAuthentication()
            unpack(f"{f_path}.typed_config", http_filter.typed_config, config)
            ours = OurMetadata(listener.metadata, path, metadata_keys)
            jwt, payload_key = _jwt(config, f"{f_path}.typed_config", ours)
            continue
        rbac = rbac_filter_pb2.RBAC()
        unpack(f"{f_path}.typed_config", http_filter.typed_config, rbac)
        r_path = f"{f_path}.typed_config"
        unsupported(rbac, r_path, {"rules", "rules_stat_prefix"})
        action, rules = _rbac(rbac.rules, f"{r_path}.rules", payload_key, header)
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
    if jwt is None and OurMetadata(listener.metadata, path, metadata_keys).has("jwt_providers"):
        raise ConfigError(f"{path}.http_filters", "jwt_providers metadata, but no jwt_authn filter")
    policy = None
    if deny is not None or allow is not None:
        policy = AuthorizationPolicy(allow=allow or (), deny=deny or ())
    return ListenerSecurity(jwt, policy)


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
) -> tuple[ListenerJwt, str]:
    unsupported(config, path, {"providers", "rules"})
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
    if len(config.rules) != 1:
        raise ConfigError(f"{path}.rules", "exactly one rule (for every path) is supported")
    rule = config.rules[0]
    r_path = f"{path}.rules[0]"
    unsupported(rule, r_path, {"match", "requires"})
    if rule.match.WhichOneof("path_specifier") != "prefix" or rule.match.prefix != "/":
        raise ConfigError(f"{r_path}.match", "only prefix / (the whole listener) is supported")
    unsupported(rule.match, f"{r_path}.match", {"prefix"})
    names, required = _requirement(rule.requires, f"{r_path}.requires")
    for i, name in enumerate(names):
        if name not in providers:
            raise ConfigError(f"{r_path}.requires", f"unknown provider {name!r} (entry {i})")
    # Only the providers the rule names are ever consulted.
    chosen = tuple(providers[name] for name in names)
    return ListenerJwt(chosen, required), payload_keys.pop()


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


# ---------------------------------------------------------------- rbac


def _policy_order(name: str) -> tuple[int, str]:
    m = _POLICY_INDEX.search(name)
    return (int(m.group(1)) if m else 1 << 30, name)


def _rbac(
    rules: rbac_pb2.RBAC, path: str, payload_key: str, header: HeaderReader
) -> tuple[int, tuple[AuthzRule, ...]]:
    unsupported(rules, path, {"action", "policies"})
    if rules.action not in (rbac_pb2.RBAC.ALLOW, rbac_pb2.RBAC.DENY):
        raise ConfigError(f"{path}.action", "only ALLOW and DENY")
    read = []
    for name in sorted(rules.policies, key=_policy_order):
        policy = rules.policies[name]
        p_path = f"{path}.policies[{name}]"
        unsupported(policy, p_path, {"permissions", "principals"})
        if len(policy.permissions) != 1 or len(policy.principals) != 1:
            raise ConfigError(p_path, "exactly one permission and one principal")
        rule = _Rule()
        _principal(policy.principals[0], f"{p_path}.principals[0]", rule, payload_key, True)
        _permission(policy.permissions[0], f"{p_path}.permissions[0]", rule, header, True)
        read.append(rule.build())
    return rules.action, tuple(read)


@dataclass(slots=True)
class _Rule:
    fields: dict[str, object] = field(default_factory=dict)
    claims: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    headers: list[HeaderMatcher] = field(default_factory=list)

    def set(self, name: str, value: object, path: str) -> None:
        if name in self.fields:
            raise ConfigError(path, f"a second {name} matcher in one policy is not supported")
        self.fields[name] = value

    def build(self) -> AuthzRule:
        return AuthzRule(
            claims=tuple(self.claims), headers=tuple(self.headers), **self.fields  # type: ignore[arg-type]
        )


def _pattern(sm: string_pb2.StringMatcher, path: str) -> str:
    if sm.ignore_case:
        raise ConfigError(f"{path}.ignore_case", "not supported")
    kind = sm.WhichOneof("match_pattern")
    if kind == "exact":
        return str(sm.exact)
    if kind == "prefix":
        return f"{sm.prefix}*"
    raise ConfigError(f"{path}.{kind or 'match_pattern'}", "only exact or prefix")


def _spiffe(sm: string_pb2.StringMatcher, path: str) -> PrincipalPattern:
    text = _pattern(sm, path)
    if not text.startswith("spiffe://"):
        raise ConfigError(path, "expected a SPIFFE ID or a spiffe:// prefix")
    if not text.endswith("*"):
        try:
            SpiffeId.parse(text)
        except InvalidSpiffeId as exc:
            raise ConfigError(path, str(exc)) from None
    return PrincipalPattern(text)


def _namespace(sm: string_pb2.StringMatcher, path: str) -> str | None:
    if sm.WhichOneof("match_pattern") != "safe_regex":
        return None
    m = _NAMESPACE.match(sm.safe_regex.regex)
    if m is None:
        raise ConfigError(
            f"{path}.safe_regex.regex", "only spiffe://[^/]+/ns/<namespace>/sa/[^/]+"
        )
    return re.sub(r"\\(.)", r"\1", m.group(1))


def _members(p: rbac_pb2.Principal) -> list[tuple[rbac_pb2.Principal, str]]:
    if p.WhichOneof("identifier") == "or_ids":
        return [(m, f".or_ids.ids[{i}]") for i, m in enumerate(p.or_ids.ids)]
    return [(p, "")]


def _principal(
    p: rbac_pb2.Principal, path: str, rule: _Rule, payload_key: str, top: bool
) -> None:
    kind = p.WhichOneof("identifier")
    if kind == "any":
        return
    if kind == "and_ids" and top:
        for i, item in enumerate(p.and_ids.ids):
            _principal(item, f"{path}.and_ids.ids[{i}]", rule, payload_key, False)
        return
    if kind == "metadata":
        rule.claims.append(_claim(p, path, payload_key))
        return
    if kind == "not_id":
        inner = p.not_id
        if inner.WhichOneof("identifier") == "authenticated" and not inner.authenticated.HasField(
            "principal_name"
        ):
            rule.set("authenticated", False, path)
            return
        patterns = [
            _spiffe(_name(m, f"{path}.not_id{suffix}"), f"{path}.not_id{suffix}.authenticated")
            for m, suffix in _members(inner)
        ]
        rule.set("not_principals", tuple(patterns), path)
        return
    if kind == "authenticated" and not p.authenticated.HasField("principal_name"):
        rule.set("authenticated", True, path)
        return
    if kind not in ("authenticated", "or_ids"):
        raise ConfigError(f"{path}.{kind or 'identifier'}", "not supported")
    principals: list[PrincipalPattern] = []
    namespaces: list[str] = []
    for member, suffix in _members(p):
        where = f"{path}{suffix}.authenticated.principal_name"
        name = _name(member, f"{path}{suffix}")
        namespace = _namespace(name, where)
        if namespace is not None:
            namespaces.append(namespace)
        else:
            principals.append(_spiffe(name, where))
    if principals and namespaces:
        raise ConfigError(path, "principals and namespaces in one or_ids are not supported")
    if namespaces:
        rule.set("namespaces", tuple(namespaces), path)
    else:
        rule.set("principals", tuple(principals), path)


def _name(p: rbac_pb2.Principal, path: str) -> string_pb2.StringMatcher:
    if p.WhichOneof("identifier") != "authenticated" or not p.authenticated.HasField(
        "principal_name"
    ):
        raise ConfigError(path, "expected authenticated.principal_name")
    return p.authenticated.principal_name


def _claim(p: rbac_pb2.Principal, path: str, payload_key: str) -> tuple[str, tuple[str, ...]]:
    m = p.metadata
    m_path = f"{path}.metadata"
    if m.filter != JWT_FILTER:
        raise ConfigError(f"{m_path}.filter", f"only {JWT_FILTER} (JWT claims)")
    if not payload_key:
        raise ConfigError(m_path, "matches JWT claims, but the listener has no jwt_authn filter")
    if m.invert:
        raise ConfigError(f"{m_path}.invert", "not supported")
    keys = [segment.key for segment in m.path]
    if len(keys) < 2 or keys[0] != payload_key:
        raise ConfigError(f"{m_path}.path", f"expected [{payload_key}, <claim>, ...]")
    values: list[str] = []

    def read(v: value_pb2.ValueMatcher, where: str) -> None:
        kind = v.WhichOneof("match_pattern")
        if kind == "or_match":
            for i, item in enumerate(v.or_match.value_matchers):
                read(item, f"{where}.or_match.value_matchers[{i}]")
            return
        if kind == "list_match":
            read(v.list_match.one_of, f"{where}.list_match.one_of")
            return
        if kind != "string_match" or v.string_match.WhichOneof("match_pattern") != "exact":
            raise ConfigError(where, "only exact strings (or lists holding one)")
        if v.string_match.exact not in values:
            values.append(v.string_match.exact)

    read(m.value, f"{m_path}.value")
    return ".".join(keys[1:]), tuple(values)


def _permission(
    p: rbac_pb2.Permission, path: str, rule: _Rule, header: HeaderReader, top: bool
) -> None:
    kind = p.WhichOneof("rule")
    if kind == "any":
        return
    if kind == "and_rules" and top:
        for i, item in enumerate(p.and_rules.rules):
            _permission(item, f"{path}.and_rules.rules[{i}]", rule, header, False)
        return
    if kind == "not_rule":
        inner = p.not_rule
        rule.set("not_paths", tuple(_paths(inner, f"{path}.not_rule")), path)
        return
    members = (
        [(m, f"{path}.or_rules.rules[{i}]") for i, m in enumerate(p.or_rules.rules)]
        if kind == "or_rules"
        else [(p, path)]
    )
    if not members:
        raise ConfigError(f"{path}.or_rules.rules", "empty")
    first = members[0][0]
    if first.WhichOneof("rule") == "header" and first.header.name == ":method":
        methods = []
        for m, where in members:
            if m.WhichOneof("rule") != "header" or m.header.name != ":method":
                raise ConfigError(where, "expected a :method header matcher")
            matcher = header(m.header, f"{where}.header")
            if matcher.exact is None or matcher.invert:
                raise ConfigError(f"{where}.header", ":method matches an exact method")
            methods.append(matcher.exact.upper())
        rule.set("methods", tuple(methods), path)
        return
    if kind == "header":
        if p.header.name.startswith(":"):
            raise ConfigError(f"{path}.header.name", "only :method among pseudo-headers")
        rule.headers.append(header(p.header, f"{path}.header"))
        return
    rule.set("paths", tuple(_paths(p, path)), path)


def _paths(p: rbac_pb2.Permission, path: str) -> list[PathPattern]:
    kind = p.WhichOneof("rule")
    if kind == "any":
        return [PathPattern("*")]
    members = (
        [(m, f"{path}.or_rules.rules[{i}]") for i, m in enumerate(p.or_rules.rules)]
        if kind == "or_rules"
        else [(p, path)]
    )
    patterns = []
    for m, where in members:
        if m.WhichOneof("rule") != "url_path":
            raise ConfigError(f"{where}.{m.WhichOneof('rule') or 'rule'}", "not supported here")
        url = m.url_path
        if url.WhichOneof("rule") != "path":
            raise ConfigError(f"{where}.url_path", "only path")
        text = _pattern(url.path, f"{where}.url_path.path")
        if not text.startswith("/"):
            raise ConfigError(f"{where}.url_path.path", "expected a path starting with /")
        patterns.append(PathPattern(text))
    if not patterns:
        raise ConfigError(path, "no paths")
    return patterns

