"""Why the proxy answered a request itself: response flags, as Envoy names them.

Each flag knows the HTTP status and the gRPC status of its local reply, so the request path
never decides those twice.
"""

from __future__ import annotations

import enum


class GrpcStatus(enum.IntEnum):
    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class ResponseFlag(enum.Enum):
    """``(code, http status, grpc status, message)`` for each reason of a local reply."""

    NO_ROUTE = ("NR", 404, GrpcStatus.UNIMPLEMENTED, "no route matched the request")
    # Before an xDS-driven sidecar's first config (Envoy keeps its listeners closed until then;
    # ours are open for the app from the start, so the reply says why nothing routes).
    NO_CONFIG_YET = (
        "NCY", 503, GrpcStatus.UNAVAILABLE, "no config received yet from the control plane",
    )
    NO_CLUSTER = ("NC", 503, GrpcStatus.UNAVAILABLE, "the route's cluster does not exist")
    NO_HEALTHY_UPSTREAM = ("UH", 503, GrpcStatus.UNAVAILABLE, "no healthy upstream")
    UPSTREAM_CONNECT_FAILURE = ("UF", 503, GrpcStatus.UNAVAILABLE, "upstream connect failure")
    UPSTREAM_CONNECTION_TERMINATION = (
        "UC",
        503,
        GrpcStatus.UNAVAILABLE,
        "upstream connection terminated",
    )
    UPSTREAM_RESET = ("UR", 503, GrpcStatus.UNAVAILABLE, "upstream reset the stream")
    UPSTREAM_TIMEOUT = ("UT", 504, GrpcStatus.DEADLINE_EXCEEDED, "upstream request timeout")
    UPSTREAM_OVERFLOW = ("UO", 503, GrpcStatus.UNAVAILABLE, "upstream overflow")
    UPSTREAM_PROTOCOL_ERROR = ("UPE", 502, GrpcStatus.INTERNAL, "upstream protocol error")
    DOWNSTREAM_PROTOCOL_ERROR = ("DPE", 400, GrpcStatus.INTERNAL, "downstream protocol error")
    DRAINING = ("DR", 503, GrpcStatus.UNAVAILABLE, "the proxy is shutting down")
    OVERLOAD_SHED = (
        "OM", 503, GrpcStatus.RESOURCE_EXHAUSTED, "overloaded: request shed, not processed",
    )
    ROUTE_OVERFLOW = (
        "RO", 503, GrpcStatus.UNAVAILABLE, "the route's concurrency limit (bulkhead) is reached",
    )
    ADAPTIVE_THROTTLE = (
        "AT", 503, GrpcStatus.UNAVAILABLE, "upstream struggling: request throttled locally",
    )
    RBAC_DENIED = ("RBAC", 403, GrpcStatus.PERMISSION_DENIED, "RBAC: access denied")
    JWT_DENIED = ("JWT", 401, GrpcStatus.UNAUTHENTICATED, "JWT: missing or invalid token")

    def __init__(self, code: str, http_status: int, grpc_status: GrpcStatus, message: str) -> None:
        self.code = code
        self.http_status = http_status
        self.grpc_status = grpc_status
        self.message = message


RESPONSE_FLAGS_HEADER = b"x-pilotfish-response-flags"
"""Set on every local reply, so that the caller's sidecar knows whether the app saw the request
(UF, UH, NR and DR say it did not: retried on another host at no cost)."""
RETRY_LIMIT_EXCEEDED = "URX"
"""An access log and span flag: the request failed with retries left to want but none allowed."""
