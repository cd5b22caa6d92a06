"""What an inbound listener with mTLS, JWT or authorization does to each request before routing.

- The caller's verified SPIFFE ID goes to the app in ``x-pilotfish-peer-identity``; a copy the
  client sent is removed from every request first, so a plaintext (PERMISSIVE) caller cannot
  pose as a verified one.
- With ``jwt``, the token is checked (the JWKS may have to be fetched, so the request's events
  wait meanwhile); a missing or bad one is answered with 401 / ``UNAUTHENTICATED`` (flag
  ``JWT``). The chosen claims are forwarded as headers; client-sent copies are always removed.
- The listener's authorization policy decides, with the verified claims; a denied request is
  answered with 403 / ``PERMISSION_DENIED`` (flag ``RBAC``).

Both refusals are the exchange's own local reply, so they are logged, counted and flagged like
any other. Listeners without any of this hand requests straight to the exchange.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from pilotfish.config.security import IDENTITY_HEADER, AuthorizationPolicy, RouteSecurity
from pilotfish.identity import SpiffeId
from sidecar.flags import ResponseFlag
from sidecar.http.streams import Headers, ResetReason
from sidecar.security.authz import RequestAttributes, authorize
from sidecar.stats import Scope

if TYPE_CHECKING:
    from sidecar.route.exchange import Exchange
    from sidecar.route.table import RouteTable
    from sidecar.security.jwt_filter import JwtAuthenticator


class SecuredRoutes(Protocol):
    """The listener whose routes may carry their own JWT and authorization."""

    claim_headers: frozenset[bytes]

    def route_table(self) -> RouteTable | None: ...

    def jwt_requirement(self, name: str) -> JwtAuthenticator | None: ...

log = logging.getLogger(__name__)

_IDENTITY_HEADER = IDENTITY_HEADER.encode()
_tasks: set[asyncio.Task[None]] = set()


def _fields(headers: Headers) -> dict[str, str]:
    fields: dict[str, str] = {}
    for name, value in headers:
        if name[:1] != b":":
            key = name.decode("latin-1")
            text = value.decode("latin-1")
            fields[key] = f"{fields[key]},{text}" if key in fields else text
    return fields


def _pseudo(headers: Headers, name: bytes) -> str:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return ""


class InboundSecurity:
    """A ``StreamHandler`` in front of one ``Exchange``."""

    __slots__ = (
        "_exchange", "_jwt", "_peer", "_pending", "_policy", "_routes", "_scope", "_strip",
    )

    def __init__(
        self,
        exchange: Exchange,
        peer: SpiffeId | None,
        policy: AuthorizationPolicy | None,
        scope: Scope,
        strip_identity: bool,
        jwt: JwtAuthenticator | None = None,
        routes: SecuredRoutes | None = None,
    ) -> None:
        self._exchange = exchange
        self._routes = routes
        self._peer = peer
        self._policy = policy
        self._scope = scope
        self._strip = strip_identity
        self._jwt = jwt
        # Events that arrive while a token is being checked, replayed in order afterwards.
        self._pending: list[Callable[[], None]] | None = None

    def on_headers(self, headers: Headers, end_stream: bool) -> None:
        if self._strip:
            headers = [(n, v) for n, v in headers if n != _IDENTITY_HEADER]
            if self._peer is not None:
                headers.append((_IDENTITY_HEADER, self._peer.uri.encode()))
        jwt = self._jwt
        routes = self._routes
        if routes is not None:
            security = self._route_security(routes, headers)
            if security is not None:
                jwt = self._override(routes, security)
            stripped = routes.claim_headers
            if stripped:
                headers = [(n, v) for n, v in headers if n not in stripped]
        if jwt is None:
            self._authorize(headers, end_stream, None)
            return
        headers = [(n, v) for n, v in headers if n not in jwt.stripped]
        self._pending = []
        task = asyncio.get_event_loop().create_task(self._authenticate(jwt, headers, end_stream))
        _tasks.add(task)
        task.add_done_callback(_tasks.discard)

    async def _authenticate(
        self, jwt: JwtAuthenticator, headers: Headers, end_stream: bool
    ) -> None:
        from sidecar.security.jwt_authn import JwtError, forwarded_headers

        claims: Mapping[str, Any] | None = None
        try:
            verified = await jwt.authenticate(_fields(headers))
        except JwtError as exc:
            log.info("JWT refused on %s: %s", _pseudo(headers, b":path"), exc)
            self._scope.inc("downstream_rq_jwt_denied")
            self._exchange.refused = ResponseFlag.JWT_DENIED
        else:
            if verified is not None:
                claims = verified.claims
                provider = jwt.provider(verified.provider)
                headers = headers + [
                    (h.encode(), v.encode()) for h, v in forwarded_headers(provider, claims)
                ]
        self._authorize(headers, end_stream, claims)
        pending, self._pending = self._pending or [], None
        for event in pending:
            event()

    @staticmethod
    def _route_security(routes: SecuredRoutes, headers: Headers) -> RouteSecurity | None:
        table = routes.route_table()
        if table is None:
            return None
        fields = _fields(headers)
        decision = table.match(
            _pseudo(headers, b":authority") or fields.get("host", ""),
            _pseudo(headers, b":path"),
            _pseudo(headers, b":method"),
            fields,
        )
        return decision.route.security if decision is not None else None

    def _override(
        self, routes: SecuredRoutes, security: RouteSecurity
    ) -> JwtAuthenticator | None:
        """Take the route's policy; return the JWT check it chooses."""
        self._policy = security.policy(self._policy)
        if security.jwt_disabled:
            return None
        name = security.jwt_requirement
        if name is None:
            return self._jwt
        chosen = routes.jwt_requirement(name)
        if chosen is None:
            # The route names a requirement its listener lacks: refuse rather than skip it.
            log.warning("route requires JWT requirement %r, which the listener lacks", name)
            self._scope.inc("downstream_rq_jwt_denied")
            self._exchange.refused = ResponseFlag.JWT_DENIED
        return chosen

    def _authorize(
        self, headers: Headers, end_stream: bool, claims: Mapping[str, Any] | None
    ) -> None:
        policy = self._policy
        exchange = self._exchange
        if policy is not None and exchange.refused is None:
            request = RequestAttributes(
                self._peer,
                _pseudo(headers, b":method"),
                _pseudo(headers, b":path"),
                _fields(headers),
                claims,
            )
            if not authorize(policy, request).allowed:
                self._scope.inc("downstream_rq_rbac_denied")
                exchange.refused = ResponseFlag.RBAC_DENIED
        exchange.on_headers(headers, end_stream)

    def on_data(self, data: bytes, flow_len: int, end_stream: bool) -> None:
        if self._pending is not None:
            self._pending.append(lambda: self._exchange.on_data(data, flow_len, end_stream))
            return
        self._exchange.on_data(data, flow_len, end_stream)

    def on_trailers(self, trailers: Headers) -> None:
        if self._pending is not None:
            self._pending.append(lambda: self._exchange.on_trailers(trailers))
            return
        self._exchange.on_trailers(trailers)

    def on_reset(self, reason: ResetReason, code: int) -> None:
        if self._pending is not None:
            self._pending.append(lambda: self._exchange.on_reset(reason, code))
            return
        self._exchange.on_reset(reason, code)
