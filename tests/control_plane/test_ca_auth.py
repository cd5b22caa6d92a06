"""Who may ask the CA for a certificate: bootstrap tokens, service-account token reviews, flags."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
from collections.abc import Sequence

import pytest

from control_plane.ca.auth import (
    BootstrapTokens,
    FirstMatch,
    KubernetesTokens,
    TokenReview,
    Unauthenticated,
    parse_bootstrap_tokens,
    service_account_identity,
)
from control_plane.ca.service import bearer_token
from control_plane.ca.settings import ca_settings_from_args
from pilotfish.config.errors import ConfigError
from pilotfish.identity import SpiffeId

DOMAIN = "cluster.local"


def _auth(authenticator: BootstrapTokens | KubernetesTokens | FirstMatch, token: str) -> SpiffeId:
    return asyncio.run(authenticator.authenticate(token))


def test_bootstrap_tokens_map_to_their_service() -> None:
    tokens = parse_bootstrap_tokens(
        {
            "tokens": [
                {"token": "s3cret", "service": "checkout"},
                {
                    "sha256": hashlib.sha256(b"other").hexdigest(),
                    "service": "cart",
                    "namespace": "shop",
                },
            ]
        },
        DOMAIN,
    )
    assert len(tokens) == 2
    assert _auth(tokens, "s3cret") == SpiffeId(DOMAIN, "default", "checkout")
    assert _auth(tokens, "other") == SpiffeId(DOMAIN, "shop", "cart")
    with pytest.raises(Unauthenticated):
        _auth(tokens, "s3cret ")


@pytest.mark.parametrize(
    ("document", "path"),
    [
        ({"tokens": [{"service": "a"}]}, "tokens[0]"),
        ({"tokens": [{"token": "t", "sha256": "00" * 32, "service": "a"}]}, "tokens[0]"),
        ({"tokens": [{"sha256": "abc", "service": "a"}]}, "tokens[0].sha256"),
        ({"tokens": [{"token": "t"}]}, "tokens[0].service"),
        ({"tokens": [{"token": "t", "service": "a/b"}]}, "tokens[0].service"),
        ({"tokens": [{"token": "t", "service": "a", "role": "admin"}]}, "tokens[0].role"),
        ({"tokens": [{"token": "t", "service": "a"}, {"token": "t", "service": "b"}]}, "tokens[1]"),
    ],
)
def test_bootstrap_token_errors_name_the_field(document: object, path: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_bootstrap_tokens(document, DOMAIN)
    assert info.value.path == path


class Reviewer:
    """Stands in for the API server's TokenReview (no Kubernetes runs in the test)."""

    def __init__(self, review: TokenReview) -> None:
        self.review_result = review
        self.asked: list[tuple[str, tuple[str, ...]]] = []

    async def review(self, token: str, audiences: Sequence[str]) -> TokenReview:
        self.asked.append((token, tuple(audiences)))
        return self.review_result


def test_service_account_tokens_become_spiffe_ids() -> None:
    reviewer = Reviewer(
        TokenReview(True, "system:serviceaccount:shop:cart", audiences=("pilotfish-ca",))
    )
    tokens = KubernetesTokens(reviewer, DOMAIN, ["pilotfish-ca"])
    assert _auth(tokens, "jwt") == SpiffeId(DOMAIN, "shop", "cart")
    assert reviewer.asked == [("jwt", ("pilotfish-ca",))]


@pytest.mark.parametrize(
    ("review", "reason"),
    [
        (TokenReview(False, error="token expired"), "token expired"),
        (TokenReview(True, "system:serviceaccount:shop:cart", ("other",)), "audience"),
        (TokenReview(True, "alice@example.com", ("pilotfish-ca",)), "not a service account"),
        (TokenReview(True, "system:serviceaccount:shop", ("pilotfish-ca",)), "no service account"),
    ],
)
def test_token_reviews_that_do_not_prove_a_service_account(
    review: TokenReview, reason: str
) -> None:
    tokens = KubernetesTokens(Reviewer(review), DOMAIN, ["pilotfish-ca"])
    with pytest.raises(Unauthenticated, match=reason):
        _auth(tokens, "jwt")


def test_first_match_tries_each_and_reports_all_reasons() -> None:
    bootstrap = parse_bootstrap_tokens({"tokens": [{"token": "t", "service": "a"}]}, DOMAIN)
    kube = KubernetesTokens(Reviewer(TokenReview(False, error="bad")), DOMAIN, [])
    both = FirstMatch(bootstrap, kube)
    assert _auth(both, "t") == SpiffeId(DOMAIN, "default", "a")
    with pytest.raises(Unauthenticated, match=r"unknown bootstrap token; .*bad"):
        _auth(both, "x")
    with pytest.raises(Unauthenticated, match="no authenticator"):
        _auth(FirstMatch(), "t")


def test_service_account_username_parsing() -> None:
    assert service_account_identity("system:serviceaccount:a:b", DOMAIN) == SpiffeId(
        DOMAIN, "a", "b"
    )
    with pytest.raises(Unauthenticated):
        service_account_identity("system:serviceaccount:a:b/c", DOMAIN)


def test_bearer_token_from_call_metadata() -> None:
    assert bearer_token((("authorization", "Bearer abc"),)) == "abc"
    assert bearer_token((("authorization", "bearer  abc "),)) == "abc"
    assert bearer_token((("authorization", "Basic abc"),)) is None
    assert bearer_token((("x-token", "Bearer abc"),)) is None
    assert bearer_token(None) is None


def _args(**overrides: str | None) -> argparse.Namespace:
    values: dict[str, str | bool | None] = dict(
        ca_dir=None,
        ca_cert=None,
        ca_key=None,
        ca_roots=None,
        ca_chain=None,
        trust_domain="cluster.local",
        cert_ttl="24h",
        bootstrap_tokens=None,
        kubernetes=False,
        ca_token_audience="pilotfish-ca",
    )
    values.update(overrides)
    return argparse.Namespace(**values)


def test_ca_flags() -> None:
    assert ca_settings_from_args(_args()) is None
    settings = ca_settings_from_args(_args(ca_dir="/x", cert_ttl="1h"))
    assert settings is not None and settings.leaf_ttl == 3600
    for overrides, flag in [
        ({"bootstrap_tokens": "t.yaml"}, "--bootstrap-tokens"),
        ({"ca_dir": "/x", "ca_cert": "c"}, "--ca-dir"),
        ({"ca_cert": "c"}, "--ca-cert"),
        ({"ca_dir": "/x", "trust_domain": "Bad Domain"}, "--trust-domain"),
        ({"ca_dir": "/x", "cert_ttl": "soon"}, "--cert-ttl"),
        ({"ca_dir": "/x", "cert_ttl": "100ms"}, "--cert-ttl"),
    ]:
        with pytest.raises(ConfigError) as info:
            ca_settings_from_args(_args(**overrides))
        assert info.value.path == flag
