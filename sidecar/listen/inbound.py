"""What an inbound listener with mTLS or authorization does to each request before routing.

- The caller's verified SPIFFE ID goes to the app in ``x-pilotfish-peer-identity``; a copy the
  client sent is removed from every request first, so a plaintext (PERMISSIVE) caller cannot
  pose as a verified one.
- The listener's authorization policy decides; a denied request is answered by the exchange
  with 403 / ``PERMISSION_DENIED`` and the ``RBAC`` response flag, and counted in
  ``http.<listener>.downstream_rq_rbac_denied``.

Listeners without either keep handing requests straight to the exchange.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pilotfish.config.security import IDENTITY_HEADER, AuthorizationPolicy
from pilotfish.identity import SpiffeId
from sidecar.flags import ResponseFlag
from sidecar.http.streams import Headers, ResetReason
from sidecar.security.authz import RequestAttributes, authorize
from sidecar.stats import Scope

if TYPE_CHECKING:
    from sidecar.route.exchange import Exchange

_IDENTITY_HEADER = IDENTITY_HEADER.encode()


def _request_attributes(headers: Headers, peer: SpiffeId | None) -> RequestAttributes:
    method = path = ""
    fields: dict[str, str] = {}
    for name, value in headers:
        if name == b":method":
            method = value.decode("latin-1")
        elif name == b":path":
            path = value.decode("latin-1")
        elif name[:1] != b":":
            key = name.decode("latin-1")
            text = value.decode("latin-1")
            fields[key] = f"{fields[key]},{text}" if key in fields else text
    return RequestAttributes(peer, method, path, fields)


class InboundSecurity:
    """A ``StreamHandler`` in front of one ``Exchange``."""

    __slots__ = ("_exchange", "_peer", "_policy", "_scope", "_strip")

    def __init__(
        self,
        exchange: Exchange,
        peer: SpiffeId | None,
        policy: AuthorizationPolicy | None,
        scope: Scope,
        strip_identity: bool,
    ) -> None:
        self._exchange = exchange
        self._peer = peer
        self._policy = policy
        self._scope = scope
        self._strip = strip_identity

    def on_headers(self, headers: Headers, end_stream: bool) -> None:
        if self._strip:
            headers = [(n, v) for n, v in headers if n != _IDENTITY_HEADER]
            if self._peer is not None:
                headers.append((_IDENTITY_HEADER, self._peer.uri.encode()))
        if self._policy is not None:
            decision = authorize(self._policy, _request_attributes(headers, self._peer))
            if not decision.allowed:
                self._scope.inc("downstream_rq_rbac_denied")
                self._exchange.refused = ResponseFlag.RBAC_DENIED
        self._exchange.on_headers(headers, end_stream)

    def on_data(self, data: bytes, flow_len: int, end_stream: bool) -> None:
        self._exchange.on_data(data, flow_len, end_stream)

    def on_trailers(self, trailers: Headers) -> None:
        self._exchange.on_trailers(trailers)

    def on_reset(self, reason: ResetReason, code: int) -> None:
        self._exchange.on_reset(reason, code)
