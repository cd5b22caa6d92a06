"""JWT validation on a fake clock, with keys made here and tokens signed by PyJWT."""

from __future__ import annotations

import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from pilotfish.config.errors import ConfigError
from pilotfish.config.fields import Node
from pilotfish.config.security import JwksSource, JwtProvider, parse_jwt_provider
from sidecar.security.jwt_authn import (
    JwksCache,
    JwksError,
    JwtError,
    JwtFailure,
    JwtValidator,
    forwarded_headers,
    stripped_headers,
    token_from_headers,
)

T0 = 1_800_000_000.0
ISSUER = "https://issuer.example"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
OTHER_EC_KEY = ec.generate_private_key(ec.SECP256R1())


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def jwk(key: Any, kid: str, alg: str) -> dict[str, Any]:
    public = key.public_key()
    algorithm = {"RS256": RSAAlgorithm, "ES256": ECAlgorithm, "EdDSA": OKPAlgorithm}[alg]
    entry: dict[str, Any] = algorithm.to_jwk(public, as_dict=True)  # type: ignore[attr-defined]
    entry.update(kid=kid, alg=alg, use="sig")
    return entry


def jwks(*entries: dict[str, Any]) -> str:
    return json.dumps({"keys": list(entries)})


PROVIDER = JwtProvider(
    name="idp",
    issuer=ISSUER,
    audiences=("orders",),
    jwks=JwksSource(inline="{}"),
    forward_claims=(("sub", "x-user"), ("groups", "x-groups"), ("email", "x-email")),
)


def sign(key: Any, kid: str, alg: str, **claims: Any) -> str:
    payload: dict[str, Any] = {"iss": ISSUER, "aud": "orders", "sub": "u-1", "exp": T0 + 300}
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid})


def validator(clock: Clock, document: str | None = None) -> JwtValidator:
    cache = JwksCache(refresh=300, min_refetch=30, clock=clock)
    cache.update(
        document
        or jwks(jwk(RSA_KEY, "r1", "RS256"), jwk(EC_KEY, "e1", "ES256"), jwk(ED_KEY, "d1", "EdDSA"))
    )
    return JwtValidator(PROVIDER, cache, clock)


@pytest.mark.parametrize(
    ("key", "kid", "alg"),
    [(RSA_KEY, "r1", "RS256"), (EC_KEY, "e1", "ES256"), (ED_KEY, "d1", "EdDSA")],
)
def test_valid_tokens_for_each_algorithm(key: Any, kid: str, alg: str) -> None:
    verified = validator(Clock()).validate(sign(key, kid, alg))
    assert verified.claims["sub"] == "u-1"
    assert verified.provider == "idp"


def _failure(v: JwtValidator, token: str) -> JwtFailure:
    with pytest.raises(JwtError) as info:
        v.validate(token)
    return info.value.failure


def test_bad_signature() -> None:
    v = validator(Clock())
    assert _failure(v, sign(OTHER_EC_KEY, "e1", "ES256")) == JwtFailure.BAD_SIGNATURE
    head, _body, sig = sign(EC_KEY, "e1", "ES256").split(".")
    forged_body = jwt.utils.base64url_encode(
        json.dumps({"iss": ISSUER, "aud": "orders", "sub": "admin", "exp": T0 + 300}).encode()
    ).decode()
    assert _failure(v, f"{head}.{forged_body}.{sig}") == JwtFailure.BAD_SIGNATURE


def test_expiry_and_not_before_with_clock_skew() -> None:
    clock = Clock()
    v = validator(clock)
    token = sign(EC_KEY, "e1", "ES256", exp=T0 + 100, nbf=T0 + 10)
    clock.now = T0 - 49  # within the 60 s of skew before nbf
    v.validate(token)
    clock.now = T0 - 51
    assert _failure(v, token) == JwtFailure.NOT_YET_VALID
    clock.now = T0 + 159  # within the skew after exp
    v.validate(token)
    clock.now = T0 + 160
    assert _failure(v, token) == JwtFailure.EXPIRED
    assert _failure(v, sign(EC_KEY, "e1", "ES256", exp=None)) == JwtFailure.MALFORMED


def test_wrong_audience_and_issuer() -> None:
    v = validator(Clock())
    assert _failure(v, sign(EC_KEY, "e1", "ES256", aud="billing")) == JwtFailure.AUDIENCE
    v.validate(sign(EC_KEY, "e1", "ES256", aud=["billing", "orders"]))
    assert _failure(v, sign(EC_KEY, "e1", "ES256", iss="https://evil")) == JwtFailure.ISSUER


def test_algorithm_is_never_taken_on_trust() -> None:
    v = validator(Clock())
    unsigned = jwt.encode(
        {"iss": ISSUER, "aud": "orders", "exp": T0 + 300},
        None,  # type: ignore[arg-type]  # "none" takes no key
        algorithm="none",
    )
    assert _failure(v, unsigned) == JwtFailure.ALGORITHM
    hmac = jwt.encode({"iss": ISSUER, "aud": "orders", "exp": T0 + 300}, "k" * 32, "HS256")
    assert _failure(v, hmac) == JwtFailure.ALGORITHM
    # An RS256 key may not verify an ES256 token, whatever the token says.
    mixed = sign(EC_KEY, "r1", "ES256")
    assert _failure(v, mixed) == JwtFailure.ALGORITHM
    assert _failure(v, "not.a.token") == JwtFailure.MALFORMED


def test_key_rotated_in_the_jwks() -> None:
    clock = Clock()
    v = validator(clock, jwks(jwk(EC_KEY, "old", "ES256")))
    new_token = sign(OTHER_EC_KEY, "new", "ES256")
    assert _failure(v, new_token) == JwtFailure.UNKNOWN_KEY
    assert not v.keys.may_refetch()  # just fetched: an unknown kid does not refetch at once
    clock.now += 30
    assert v.keys.may_refetch()
    v.keys.update(jwks(jwk(EC_KEY, "old", "ES256"), jwk(OTHER_EC_KEY, "new", "ES256")))
    assert v.validate(new_token).claims["sub"] == "u-1"
    v.keys.update(jwks(jwk(OTHER_EC_KEY, "new", "ES256")))  # the old key retired
    assert _failure(v, sign(EC_KEY, "old", "ES256")) == JwtFailure.UNKNOWN_KEY


def test_a_bad_jwks_keeps_the_last_good_keys() -> None:
    clock = Clock()
    v = validator(clock, jwks(jwk(EC_KEY, "e1", "ES256")))
    for bad in ("not json", "[]", '{"keys": "x"}', '{"keys": [{"kty": "nope"}]}'):
        with pytest.raises(JwksError):
            v.keys.update(bad)
    assert v.keys.errors == 4
    v.validate(sign(EC_KEY, "e1", "ES256"))


def test_refresh_schedule() -> None:
    clock = Clock()
    cache = JwksCache(refresh=300, min_refetch=30, clock=clock)
    assert cache.due()
    cache.update(jwks(jwk(EC_KEY, "e1", "ES256")))
    assert not cache.due()
    clock.now += 300
    assert cache.due()


def test_claims_forwarded_and_client_copies_named_for_stripping() -> None:
    claims = {"sub": "u-1", "groups": ["a", "b"], "email": "evil\r\nx-admin: 1"}
    assert forwarded_headers(PROVIDER, claims) == [("x-user", "u-1"), ("x-groups", "a,b")]
    assert stripped_headers([PROVIDER]) == {"x-user", "x-groups", "x-email"}


def test_token_from_headers() -> None:
    assert token_from_headers(PROVIDER, {"authorization": "Bearer abc"}) == "abc"
    assert token_from_headers(PROVIDER, {"authorization": "Basic abc"}) is None
    assert token_from_headers(PROVIDER, {}) is None


def test_provider_config_errors_name_the_field() -> None:
    good: dict[str, Any] = {"issuer": ISSUER, "audiences": ["orders"], "jwks": {"inline": "{}"}}
    assert parse_jwt_provider("idp", Node("p", good)).algorithms == ("RS256", "ES256", "EdDSA")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"jwks": {"inline": "{}", "file": "/x"}}, "p.jwks"),
        ({"jwks": {"uri": "ftp://x"}}, "p.jwks.uri"),
        ({"algorithms": ["HS256"]}, "p.algorithms[0]"),
        ({"audiences": []}, "p.audiences"),
        ({"forward_claims": {"sub": "x-pilotfish-peer-identity"}}, "p.forward_claims.sub"),
        ({"forward_claims": {"sub": "bad header"}}, "p.forward_claims.sub"),
    ]
    for patch, path in cases:
        with pytest.raises(ConfigError) as info:
            parse_jwt_provider("idp", Node("p", {**good, **patch}))
        assert info.value.path == path, info.value
