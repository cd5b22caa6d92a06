"""Fallbacks: what a route answers when its primary cluster cannot.

When the primary fails for a reason the route's fallback lists (no healthy host, its circuit
breaker open, or still failing once retries are spent), the route either answers a static
response or sends the request to a fallback cluster, once: a failing fallback cluster gets the
ordinary local reply, never a fallback of its own. Nothing is done once part of a response has
gone downstream. Fallback answers carry the response flag ``FB``.
"""

from __future__ import annotations

from dataclasses import dataclass

from pilotfish.config.route_policy import FallbackConfig, FallbackTrigger, StaticResponse
from sidecar.flags import ResponseFlag
from sidecar.route.policy.reply import LocalReply

FLAG_CODE = "FB"
"""Not an Envoy flag (status comes from the config)."""
_TRIGGER_OF_FLAG = {
    ResponseFlag.NO_HEALTHY_UPSTREAM: FallbackTrigger.NO_HEALTHY_UPSTREAM,
    ResponseFlag.UPSTREAM_OVERFLOW: FallbackTrigger.CIRCUIT_OPEN,
    ResponseFlag.UPSTREAM_CONNECT_FAILURE: FallbackTrigger.RETRIES_EXHAUSTED,
    ResponseFlag.UPSTREAM_CONNECTION_TERMINATION: FallbackTrigger.RETRIES_EXHAUSTED,
    ResponseFlag.UPSTREAM_RESET: FallbackTrigger.RETRIES_EXHAUSTED,
    ResponseFlag.UPSTREAM_PROTOCOL_ERROR: FallbackTrigger.RETRIES_EXHAUSTED,
}


def trigger_for(flag: ResponseFlag) -> FallbackTrigger | None:
    """Which trigger the local reply ``flag`` of the primary amounts to, if any.

    A request timeout (UT) is not one: the deadline is spent, there is no time for a fallback.
    A retriable upstream response (e.g. a held-back 503) that is still failing after the last
    retry is ``FallbackTrigger.RETRIES_EXHAUSTED`` too; the router knows that case by itself."""
    return _TRIGGER_OF_FLAG.get(flag)


@dataclass(frozen=True, slots=True)
class FallbackCluster:
    """Send the request (headers and replayable body) to this cluster instead."""

    name: str


def static_reply(response: StaticResponse) -> LocalReply:
    content_type = b"text/plain"
    extra: list[tuple[bytes, bytes]] = []
    for name, value in response.headers:
        if name.lower() == "content-type":
            content_type = value.encode("latin-1")
        else:
            extra.append((name.lower().encode("latin-1"), value.encode("latin-1")))
    return LocalReply(
        http_status=response.status,
        grpc_status=response.grpc_status if response.grpc_status is not None else 2,
        message=response.grpc_message,
        flag_code=FLAG_CODE,
        extra_headers=tuple(extra),
        body=response.body.encode(),
        content_type=content_type,
        grpc_response=response.grpc_response,
    )


class Fallback:
    """The fallback of one route."""

    __slots__ = ("_reply", "config")

    def __init__(self, config: FallbackConfig) -> None:
        self.config = config
        self._reply = static_reply(config.response) if config.response is not None else None

    def decide(
        self,
        trigger: FallbackTrigger | None,
        *,
        grpc: bool,
        response_started: bool = False,
        in_fallback: bool = False,
    ) -> LocalReply | FallbackCluster | None:
        """The fallback for a primary that failed by ``trigger``; None: the usual local reply.

        ``in_fallback``: the request is already on the fallback cluster."""
        if trigger is None or trigger not in self.config.when or response_started or in_fallback:
            return None
        if self.config.cluster is not None:
            return FallbackCluster(self.config.cluster)
        response = self.config.response
        if self._reply is None or response is None or (grpc and response.grpc_status is None):
            return None
        return self._reply
