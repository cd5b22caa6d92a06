"""Who is asking for a certificate: a bearer token in, an authenticated SPIFFE ID out.

Two kinds of token:

- Outside Kubernetes, a bootstrap token the operator hands to one workload; the control plane
  holds a file that maps (the SHA-256 of) each token to a namespace and service.
- In Kubernetes, the pod's projected service-account token, which only the API server can check
  (TokenReview). ``TokenReviewer`` is the seam; ``control_plane.ca.token_review`` makes the
  call.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import yaml

from pilotfish.config.errors import ConfigError
from pilotfish.config.fields import Node
from pilotfish.identity import InvalidSpiffeId, SpiffeId

_SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"


class Unauthenticated(Exception):
    """The token is missing, unknown, expired or not for us."""


class ReviewUnavailable(Exception):
    """The token could not be checked now (the API server did not answer); try again later."""


class Authenticator(Protocol):
    async def authenticate(self, token: str) -> SpiffeId:
        """The identity ``token`` proves; raises ``Unauthenticated``."""
        ...


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class BootstrapTokens:
    """Tokens, kept only as SHA-256 digests, each naming one workload identity."""

    def __init__(self, identities: Mapping[bytes, SpiffeId]) -> None:
        self._identities = dict(identities)

    def __len__(self) -> int:
        return len(self._identities)

    async def authenticate(self, token: str) -> SpiffeId:
        digest = _digest(token)
        # Every entry is compared, so the time taken does not tell which digest came close.
        found: SpiffeId | None = None
        for known, identity in self._identities.items():
            if hmac.compare_digest(known, digest):
                found = identity
        if found is None:
            raise Unauthenticated("unknown bootstrap token")
        return found


def parse_bootstrap_tokens(document: object, trust_domain: str) -> BootstrapTokens:
    """``tokens: [{sha256: <hex> | token: <text>, service: <name>, namespace: <ns>}]``."""
    root = Node("", document).mapping({"tokens"})
    identities: dict[bytes, SpiffeId] = {}
    for entry in root.require("tokens").elements():
        entry.mapping({"sha256", "token", "service", "namespace"})
        if entry.has("sha256") == entry.has("token"):
            raise entry.error("give exactly one of sha256 or token")
        if entry.has("token"):
            digest = _digest(entry.get("token").as_str())
        else:
            hex_node = entry.get("sha256")
            try:
                digest = bytes.fromhex(hex_node.as_str())
            except ValueError:
                raise hex_node.error("expected 64 hexadecimal digits") from None
            if len(digest) != 32:
                raise hex_node.error("expected 64 hexadecimal digits")
        service = entry.require("service")
        try:
            identity = SpiffeId(
                trust_domain, entry.get("namespace").as_str("default"), service.as_str()
            )
        except InvalidSpiffeId as exc:
            raise service.error(str(exc)) from None
        if digest in identities:
            raise entry.error("the same token is listed twice")
        identities[digest] = identity
    return BootstrapTokens(identities)


def load_bootstrap_tokens(path: str | Path, trust_domain: str) -> BootstrapTokens:
    try:
        document = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{path}: not YAML: {exc}") from None
    try:
        return parse_bootstrap_tokens(document, trust_domain)
    except ConfigError as exc:
        raise ConfigError(exc.path, f"{path}: {exc.message}") from None


@dataclass(frozen=True)
class TokenReview:
    """What the API server said about a token (``TokenReview.status``)."""

    authenticated: bool
    username: str = ""
    audiences: tuple[str, ...] = ()
    error: str = ""


class TokenReviewer(Protocol):
    async def review(self, token: str, audiences: Sequence[str]) -> TokenReview: ...


class KubernetesTokens:
    """Projected service-account tokens, checked by the API server."""

    def __init__(
        self, reviewer: TokenReviewer, trust_domain: str, audiences: Sequence[str]
    ) -> None:
        self._reviewer = reviewer
        self._trust_domain = trust_domain
        self._audiences = tuple(audiences)

    async def authenticate(self, token: str) -> SpiffeId:
        review = await self._reviewer.review(token, self._audiences)
        if not review.authenticated:
            raise Unauthenticated(f"token review refused the token: {review.error or 'no reason'}")
        # A token for another audience (say, one the pod was given for some other service) must
        # not buy a certificate here.
        if self._audiences and not set(self._audiences) & set(review.audiences):
            raise Unauthenticated("the token is not for this audience")
        return service_account_identity(review.username, self._trust_domain)


def service_account_identity(username: str, trust_domain: str) -> SpiffeId:
    """``system:serviceaccount:<ns>:<sa>`` → ``spiffe://<domain>/ns/<ns>/sa/<sa>``."""
    if not username.startswith(_SERVICE_ACCOUNT_PREFIX):
        raise Unauthenticated(f"{username!r} is not a service account")
    namespace, sep, account = username[len(_SERVICE_ACCOUNT_PREFIX) :].partition(":")
    try:
        return SpiffeId(trust_domain, namespace, account) if sep else _no_account(username)
    except InvalidSpiffeId as exc:
        raise Unauthenticated(str(exc)) from None


def _no_account(username: str) -> SpiffeId:
    raise Unauthenticated(f"{username!r} names no service account")


class FirstMatch:
    """Bootstrap tokens first (a local lookup), then the API server."""

    def __init__(self, *authenticators: Authenticator) -> None:
        self._authenticators = authenticators

    async def authenticate(self, token: str) -> SpiffeId:
        reasons = []
        unavailable: ReviewUnavailable | None = None
        for authenticator in self._authenticators:
            try:
                return await authenticator.authenticate(token)
            except Unauthenticated as exc:
                reasons.append(str(exc))
            except ReviewUnavailable as exc:
                unavailable = exc
        if unavailable is not None:  # the token may be good: say "try again", not "no"
            raise unavailable
        raise Unauthenticated("; ".join(reasons) or "no authenticator configured")
