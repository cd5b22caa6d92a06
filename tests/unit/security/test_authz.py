"""Authorization rules, parsed from mesh-file YAML, one allowed and one denied caller per type."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from pilotfish.config.errors import ConfigError
from pilotfish.config.fields import Node
from pilotfish.config.security import (
    MtlsMode,
    SecurityConfig,
    parse_authorization,
    parse_security,
    parse_service_security,
)
from pilotfish.identity import SpiffeId
from sidecar.security.authz import RequestAttributes, authorize, claim_values

WEB = SpiffeId("cluster.local", "shop", "web")
BATCH = SpiffeId("cluster.local", "jobs", "batch")


def policy(text: str) -> Any:
    return parse_authorization(Node("authorization", yaml.safe_load(text)))


def request(
    principal: SpiffeId | None = WEB,
    method: str = "GET",
    path: str = "/orders/1",
    headers: dict[str, str] | None = None,
    claims: dict[str, Any] | None = None,
) -> RequestAttributes:
    return RequestAttributes(principal, method, path, headers or {}, claims)


def allowed(p: Any, r: RequestAttributes) -> bool:
    return authorize(p, r).allowed


def test_no_policy_allows() -> None:
    assert authorize(None, request()).reason == "no policy"


def test_principal() -> None:
    p = policy("allow: [{from: {principals: [spiffe://cluster.local/ns/shop/sa/web]}}]")
    assert allowed(p, request(WEB))
    assert not allowed(p, request(BATCH))
    assert not allowed(p, request(None))  # a plaintext peer has no principal


def test_principal_prefix_and_exclusion() -> None:
    p = policy(
        "allow: [{from: {principals: ['spiffe://cluster.local/ns/shop/*'],"
        " not_principals: [spiffe://cluster.local/ns/shop/sa/admin]}}]"
    )
    assert allowed(p, request(WEB))
    assert not allowed(p, request(SpiffeId("cluster.local", "shop", "admin")))
    assert not allowed(p, request(BATCH))


def test_namespace() -> None:
    p = policy("allow: [{from: {namespaces: [shop]}}]")
    assert allowed(p, request(WEB))
    assert not allowed(p, request(BATCH))


def test_authenticated() -> None:
    p = policy("deny: [{from: {authenticated: false}}]")
    assert allowed(p, request(WEB))
    assert authorize(p, request(None)).reason == "deny[0]"


def test_path() -> None:
    p = policy("allow: [{to: {paths: [/orders/*, /health]}}]")
    assert allowed(p, request(path="/orders/7?x=1"))
    assert allowed(p, request(path="/health"))
    assert not allowed(p, request(path="/healthz"))
    assert not allowed(p, request(path="/admin"))


def test_method() -> None:
    p = policy("allow: [{to: {methods: [get, HEAD]}}]")
    assert allowed(p, request(method="GET"))
    assert not allowed(p, request(method="DELETE"))


def test_header() -> None:
    p = policy("allow: [{to: {headers: [{name: X-Tenant, exact: acme}]}}]")
    assert allowed(p, request(headers={"x-tenant": "acme"}))
    assert not allowed(p, request(headers={"x-tenant": "other"}))
    assert not allowed(p, request())


def test_claims() -> None:
    p = policy("allow: [{when: {claims: {groups: [admins], realm.role: [ops]}}}]")
    assert allowed(p, request(claims={"groups": ["users", "admins"], "realm": {"role": "ops"}}))
    assert not allowed(p, request(claims={"groups": ["users"], "realm": {"role": "ops"}}))
    assert not allowed(p, request(claims=None))
    assert claim_values({"n": 3, "b": True, "o": {}}, "n") == ("3",)
    assert claim_values({"b": True}, "b") == ("true",)
    assert claim_values({"o": {}}, "o") == ()


def test_deny_wins_over_allow() -> None:
    p = policy(
        """
        allow: [{from: {namespaces: [shop]}}]
        deny: [{to: {methods: [DELETE]}}]
        """
    )
    assert authorize(p, request(WEB, method="GET")).reason == "allow[0]"
    assert authorize(p, request(WEB, method="DELETE")).reason == "deny[0]"


def test_fields_of_one_rule_must_all_match() -> None:
    p = policy("allow: [{from: {namespaces: [shop]}, to: {methods: [GET]}}]")
    assert allowed(p, request(WEB, method="GET"))
    assert not allowed(p, request(WEB, method="POST"))
    assert not allowed(p, request(BATCH, method="GET"))
    assert authorize(p, request(BATCH)).reason == "no allow rule matched"


def test_only_deny_rules_allow_the_rest() -> None:
    p = policy("deny: [{from: {namespaces: [jobs]}}]")
    assert allowed(p, request(WEB))
    assert not allowed(p, request(BATCH))


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("allow: [{from: {principals: [web]}}]", "authorization.allow[0].from.principals[0]"),
        ("allow: [{from: {principals: ['web*']}}]", "authorization.allow[0].from.principals[0]"),
        ("allow: [{to: {paths: [orders]}}]", "authorization.allow[0].to.paths[0]"),
        ("allow: [{to: {paths: ['/a*/b']}}]", "authorization.allow[0].to.paths[0]"),
        ("allow: [{to: {verbs: [GET]}}]", "authorization.allow[0].to.verbs"),
        ("allow: [{to: {methods: []}}]", "authorization.allow[0].to.methods"),
        ("allow: [{from: {authenticated: maybe}}]", "authorization.allow[0].from.authenticated"),
        ("permit: []", "authorization.permit"),
    ],
)
def test_errors_name_the_field(text: str, path: str) -> None:
    with pytest.raises(ConfigError) as info:
        policy(text)
    assert info.value.path == path


def test_service_security_and_mtls_modes() -> None:
    security = parse_security(
        Node(
            "security",
            yaml.safe_load(
                """
                trust_domain: example.org
                mtls: {mode: PERMISSIVE, namespaces: {payments: STRICT}}
                jwt_providers:
                  idp: {issuer: https://idp, audiences: [api], jwks: {file: /etc/jwks.json}}
                """
            ),
        )
    )
    assert security.trust_domain == "example.org"
    assert security.mtls.mode_for("payments", None) == MtlsMode.STRICT
    assert security.mtls.mode_for("shop", None) == MtlsMode.PERMISSIVE
    assert security.mtls.mode_for("payments", MtlsMode.PERMISSIVE) == MtlsMode.PERMISSIVE
    assert parse_security(Node("security", None)) == SecurityConfig()

    service = parse_service_security(
        Node("services.orders", {"mtls": "STRICT", "jwt": {"providers": ["idp"]}}), security
    )
    assert service.mtls == MtlsMode.STRICT
    assert service.jwt is not None and service.jwt.required

    for value, path in [
        ({"jwt": {"providers": ["nope"]}}, "services.orders.jwt.providers[0]"),
        ({"mtls": "strict"}, "services.orders.mtls"),
        (
            {"authorization": {"allow": [{"when": {"claims": {"sub": ["a"]}}}]}},
            "services.orders.authorization.allow[0].when",
        ),
    ]:
        with pytest.raises(ConfigError) as info:
            parse_service_security(Node("services.orders", value), security)
        assert info.value.path == path


def test_trust_domain_error_names_the_field() -> None:
    with pytest.raises(ConfigError) as info:
        parse_security(Node("security", {"trust_domain": "Not Valid"}))
    assert info.value.path == "security.trust_domain"

