"""Envoy's RBAC filter config read back into the model's authorization rules: the shapes
``control_plane/xds/authn_xds.py`` writes, one policy per rule. Anything else raises
``ConfigError`` naming the field.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.type.matcher.v3 import string_pb2, value_pb2

from pilotfish.config.errors import ConfigError
from pilotfish.config.matchers import HeaderMatcher
from pilotfish.config.security import AuthzRule, PathPattern, PrincipalPattern
from pilotfish.identity import InvalidSpiffeId, SpiffeId
from sidecar.xds.common import unsupported

JWT_FILTER = "envoy.filters.http.jwt_authn"
_NAMESPACE = re.compile(r"^spiffe://\[\^/\]\+/ns/(.+)/sa/\[\^/\]\+$")
_POLICY_INDEX = re.compile(r"\[(\d+)\]$")
HeaderReader = Callable[[route_components_pb2.HeaderMatcher, str], HeaderMatcher]
"""The route translator's header matcher reader (``sidecar.xds.translate``)."""


def _policy_order(name: str) -> tuple[int, str]:
    m = _POLICY_INDEX.search(name)
    return (int(m.group(1)) if m else 1 << 30, name)


def read_rbac(
    rules: rbac_pb2.RBAC, path: str, payload_key: str | None, header: HeaderReader
) -> tuple[int, tuple[AuthzRule, ...]]:
    """The action and one rule per policy, in index order. ``payload_key``: where the listener's
    jwt_authn filter puts the claims (empty without one, and then no claim may be matched;
    None on a route, which takes any)."""
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
    p: rbac_pb2.Principal, path: str, rule: _Rule, payload_key: str | None, top: bool
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


def _claim(
    p: rbac_pb2.Principal, path: str, payload_key: str | None
) -> tuple[str, tuple[str, ...]]:
    m = p.metadata
    m_path = f"{path}.metadata"
    if m.filter != JWT_FILTER:
        raise ConfigError(f"{m_path}.filter", f"only {JWT_FILTER} (JWT claims)")
    if payload_key == "":
        raise ConfigError(m_path, "matches JWT claims, but the listener has no jwt_authn filter")
    if m.invert:
        raise ConfigError(f"{m_path}.invert", "not supported")
    keys = [segment.key for segment in m.path]
    if len(keys) < 2 or keys[0] != (payload_key or keys[0]):
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

