"""Local replies: the proxy answering a request itself, and the route's fallback first.

In: why no upstream answer will come (a ``ResponseFlag``) or a reply a policy made (a fault
abort, a rate limit, a static fallback). Out: the reply written to the downstream stream, in the
form the request needs (a gRPC trailers-only response, a gRPC message, or an HTTP status and
body), or the fallback's choice of another cluster. Nothing here runs for a request that an
upstream answers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sidecar.flags import ResponseFlag
from sidecar.http.streams import StreamSink
from sidecar.route.policy.fallback import FallbackCluster, trigger_for
from sidecar.route.policy.reply import LocalReply

if TYPE_CHECKING:
    from sidecar.route.policy.runtime import RoutePolicyRuntime


def flag_reply(flag: ResponseFlag, message: str | None = None) -> LocalReply:
    return LocalReply(
        http_status=flag.http_status,
        grpc_status=int(flag.grpc_status),
        message=message or flag.message,
        flag_code=flag.code,
    )


def write_reply(downstream: StreamSink, reply: LocalReply, *, grpc: bool, method: str) -> int:
    """Send ``reply`` on a stream whose response has not started; returns the body bytes sent."""
    if grpc and reply.grpc_response is not None:
        headers, message, trailers = reply.grpc_message_parts()
        downstream.send_headers(headers, False)
        downstream.send_data(message, False, None)
        downstream.send_trailers(trailers)
        return len(message)
    body = reply.http_body(grpc, method)
    downstream.send_headers(reply.headers(grpc), not body)
    if body:
        downstream.send_data(body, True, None)
    return len(body)


def fallback_for(
    policy: RoutePolicyRuntime | None,
    flag: ResponseFlag,
    *,
    grpc: bool,
    response_started: bool,
    in_fallback: bool,
) -> LocalReply | FallbackCluster | None:
    """What the route's fallback does for a request that failed with ``flag``; None: nothing
    (the request gets the local reply of ``flag``)."""
    fallback = policy.fallback if policy is not None else None
    if fallback is None:
        return None
    return fallback.decide(
        trigger_for(flag), grpc=grpc, response_started=response_started, in_fallback=in_fallback
    )
