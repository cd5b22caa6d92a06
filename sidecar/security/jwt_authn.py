"""JWT authentication: verify a bearer token against a provider's keys; sans-IO.

PyJWT checks the signature, issuer and audience; expiry and not-before are checked here against
the injected clock (with the provider's clock skew), so tests need no real time. Keys come from a
``JwksCache``, which says when it wants to be refreshed; the fetching (file or URL) is the
caller's (``sidecar.security.jwks_fetch``).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from jwt import PyJWK, PyJWKSet
from jwt.exceptions import PyJWKError, PyJWKSetError

from pilotfish.config.security import JwtProvider

MAX_TOKEN_BYTES = 8 * 1024
_BEARER = "bearer "


class JwtFailure(enum.Enum):
    """Why a token was refused; every one of them is a 401 / UNAUTHENTICATED."""

    MISSING = "missing token"
    MALFORMED = "malformed token"
    ALGORITHM = "algorithm not allowed"
    UNKNOWN_KEY = "unknown signing key"
    BAD_SIGNATURE = "bad signature"
    ISSUER = "wrong issuer"
    AUDIENCE = "wrong audience"
    EXPIRED = "token expired"
    NOT_YET_VALID = "token not yet valid"


class JwtError(Exception):
    def __init__(self, failure: JwtFailure, detail: str = "") -> None:
        super().__init__(f"{failure.value}: {detail}" if detail else failure.value)
        self.failure = failure


class JwksError(ValueError):
    """A JWKS document that cannot be used; the last good key set stays in force."""


@dataclass(frozen=True, slots=True)
class Jwk:
    key: PyJWK
    algorithm: str | None
    """The JWK's own ``alg``, when it names one: then only that algorithm may use the key."""


def parse_jwks(text: str | bytes) -> dict[str, Jwk]:
    """Key id → key. Keys without a ``kid`` are filed under ""; unusable keys are skipped (a
    set may hold keys for algorithms we do not use), but a set with no usable key is an error."""
    try:
        document = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise JwksError(f"not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise JwksError("not a JWK set: expected an object with keys")
    try:
        key_set = PyJWKSet.from_dict(document)
    except (PyJWKSetError, PyJWKError, KeyError, TypeError, AttributeError) as exc:
        raise JwksError(f"not a JWK set: {exc}") from None
    declared = {
        entry.get("kid"): entry.get("alg")
        for entry in document.get("keys", ())
        if isinstance(entry, dict)
    }
    keys: dict[str, Jwk] = {}
    for key in key_set.keys:
        alg = declared.get(key.key_id)
        keys[key.key_id or ""] = Jwk(key, alg if isinstance(alg, str) else None)
    return keys


class JwksCache:
    """A provider's current keys, and when to read the JWKS again."""

    def __init__(self, refresh: float, min_refetch: float, clock: Callable[[], float]) -> None:
        self.refresh = refresh
        self.min_refetch = min_refetch
        self._clock = clock
        self.keys: dict[str, Jwk] = {}
        self.fetched_at: float | None = None
        self.attempted_at: float | None = None
        self.errors = 0
        self.last_error = ""

    def due(self) -> bool:
        """Time for a periodic refresh (or the first fetch)."""
        if self.attempted_at is None:
            return True
        last = self.fetched_at if self.fetched_at is not None else self.attempted_at
        now = self._clock()
        if self.fetched_at is None:
            return now - self.attempted_at >= self.min_refetch
        return now - last >= self.refresh

    def may_refetch(self) -> bool:
        """An unknown key id arrived: worth reading the JWKS again? Rate-limited, so a stream
        of tokens with made-up key ids cannot turn into a stream of fetches."""
        return self.attempted_at is None or self._clock() - self.attempted_at >= self.min_refetch

    def attempt(self) -> None:
        self.attempted_at = self._clock()

    def update(self, text: str | bytes) -> None:
        """New JWKS content; on ``JwksError`` the previous keys stay."""
        self.attempted_at = self._clock()
        try:
            keys = parse_jwks(text)
        except JwksError as exc:
            self.failed(str(exc))
            raise
        self.keys = keys
        self.fetched_at = self.attempted_at

    def failed(self, reason: str) -> None:
        self.errors += 1
        self.last_error = reason


def token_from_headers(provider: JwtProvider, headers: Mapping[str, str]) -> str | None:
    value = headers.get(provider.header)
    if value is None:
        return None
    if provider.header == "authorization":
        if value[: len(_BEARER)].lower() != _BEARER:
            return None
        value = value[len(_BEARER) :]
    return value.strip() or None


@dataclass(frozen=True, slots=True)
class Verified:
    provider: str
    claims: Mapping[str, Any]


class JwtValidator:
    def __init__(self, provider: JwtProvider, keys: JwksCache, clock: Callable[[], float]) -> None:
        self.provider = provider
        self.keys = keys
        self._clock = clock

    def _key(self, kid: str | None) -> Jwk:
        keys = self.keys.keys
        if kid is not None:
            key = keys.get(kid)
        elif len(keys) == 1:
            key = next(iter(keys.values()))
        else:
            key = keys.get("")
        if key is None:
            raise JwtError(JwtFailure.UNKNOWN_KEY, f"kid {kid!r}")
        return key

    def validate(self, token: str) -> Verified:
        """The verified claims of ``token``, or ``JwtError`` saying why not."""
        if len(token) > MAX_TOKEN_BYTES:
            raise JwtError(JwtFailure.MALFORMED, "too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError as exc:
            raise JwtError(JwtFailure.MALFORMED, str(exc)) from None
        algorithm = header.get("alg")
        # The algorithm is never taken from the token on trust: "none" and HMAC (with a public
        # key as the secret) are the classic forgeries.
        if algorithm not in self.provider.algorithms:
            raise JwtError(JwtFailure.ALGORITHM, repr(algorithm))
        kid = header.get("kid")
        jwk = self._key(kid if isinstance(kid, str) else None)
        if jwk.algorithm is not None and jwk.algorithm != algorithm:
            raise JwtError(JwtFailure.ALGORITHM, f"{algorithm} with a key for {jwk.algorithm}")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=jwk.key.key,
                algorithms=[algorithm],
                audience=list(self.provider.audiences),
                issuer=self.provider.issuer,
                options={
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "require": ["exp", "iss", "aud"],
                },
            )
        except jwt.InvalidSignatureError:
            raise JwtError(JwtFailure.BAD_SIGNATURE) from None
        except jwt.InvalidAudienceError:
            raise JwtError(JwtFailure.AUDIENCE) from None
        except jwt.InvalidIssuerError:
            raise JwtError(JwtFailure.ISSUER) from None
        except jwt.InvalidKeyError as exc:
            raise JwtError(JwtFailure.ALGORITHM, f"{algorithm} with this key: {exc}") from None
        except jwt.PyJWTError as exc:
            raise JwtError(JwtFailure.MALFORMED, str(exc)) from None
        self._check_times(claims)
        return Verified(self.provider.name, claims)

    def _check_times(self, claims: Mapping[str, Any]) -> None:
        now = self._clock()
        skew = self.provider.clock_skew
        exp = claims.get("exp")
        if isinstance(exp, bool) or not isinstance(exp, int | float):
            raise JwtError(JwtFailure.MALFORMED, "exp is not a number")
        if now - skew >= exp:
            raise JwtError(JwtFailure.EXPIRED)
        nbf = claims.get("nbf")
        if nbf is not None:
            if isinstance(nbf, bool) or not isinstance(nbf, int | float):
                raise JwtError(JwtFailure.MALFORMED, "nbf is not a number")
            if now + skew < nbf:
                raise JwtError(JwtFailure.NOT_YET_VALID)


def _header_value(value: Any) -> str | None:
    if isinstance(value, str):
        text = value
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int | float):
        text = str(value)
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        text = ",".join(value)
    else:
        text = json.dumps(value, separators=(",", ":"), sort_keys=True)
    # A claim is attacker-influenced text (a user picks their own display name): never let it
    # split a header.
    if any(c in text for c in "\r\n\0"):
        return None
    return text


def forwarded_headers(provider: JwtProvider, claims: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The (header, value) pairs to add for the claims the provider forwards."""
    out = []
    for claim, header in provider.forward_claims:
        if claim in claims:
            value = _header_value(claims[claim])
            if value is not None:
                out.append((header, value))
    return out


def stripped_headers(providers: Iterable[JwtProvider]) -> frozenset[str]:
    """Headers removed from every request before forwarding: a client must not be able to
    pose as the verified claims by sending the headers itself."""
    return frozenset(header for p in providers for _, header in p.forward_claims)
