"""What gRPC's proxyless clients will not do of a mesh: said in ``validate`` and ``status``.

A gRPC client dialling ``xds:///<service>`` reads the same resources as a sidecar, but it
implements only part of them: it falls back to ``round_robin`` for load balancing policies it
lacks, never looks at our metadata, skips optional HTTP filters it does not know, and ejects
outliers only by success rate and failure percentage. None of that is an error (the sidecars
do enforce these policies), but whoever runs proxyless clients should know. One line per
policy, naming the mesh field.
"""

from __future__ import annotations

from control_plane.mesh import Mesh, MeshService
from pilotfish.config.cluster_policy import LbKind

ROUTE_TIMEOUT_FLOOR = 2.0
"""Seconds. grpcio (1.85 measured) ends a call 1.1-1.9 s before the route's
``max_stream_duration``, so below this a route timeout may fail proxyless calls at once."""
_FALLS_BACK = {
    LbKind.LEAST_REQUEST: "least_request",
    LbKind.LEAST_CONNECTIONS: "least_connections",
    LbKind.PEAK_EWMA: "peak_ewma",
    LbKind.MAGLEV: "maglev",
    LbKind.RANDOM: "random",
    LbKind.WEIGHTED_RANDOM: "weighted_random",
}


def ignored_by_proxyless(mesh: Mesh) -> list[str]:
    lines: list[str] = []
    for name in sorted(mesh.services):
        service = mesh.services[name]
        if service.protocol != "tcp":
            lines.extend(_service(f"services.{name}", service))
    return lines


def _service(path: str, service: MeshService) -> list[str]:
    lines = []
    kind = service.lb_policy.kind
    if kind in _FALLS_BACK:
        lines.append(
            f"{path}.load_balancing.policy: {_FALLS_BACK[kind]} is not in gRPC: proxyless"
            " clients use round_robin"
        )
    elif kind is LbKind.WEIGHTED_ROUND_ROBIN and len({e.weight for e in service.endpoints}) > 1:
        lines.append(
            f"{path}.endpoints: weights are ignored by gRPC's round_robin: proxyless clients"
            " spread calls evenly"
        )
    od = service.outlier_detection
    if od is not None and od.enforcing_consecutive_5xx > 0:
        lines.append(
            f"{path}.outlier_detection.consecutive_5xx: gRPC ejects only by success rate and"
            " failure percentage"
        )
    if service.health_check is not None:
        lines.append(f"{path}.health_check: gRPC clients do not health check endpoints")
    resilience = service.resilience
    if resilience.adaptive_throttling.enabled:
        lines.append(f"{path}.adaptive_throttling: sidecars only")
    for i, route in enumerate(service.routes):
        at = f"{path}.routes[{i}]"
        policy = route.policy
        if policy.rate_limit is not None:
            lines.append(f"{at}.rate_limit: gRPC clients skip the local rate limit filter")
        if policy.fallback is not None:
            lines.append(f"{at}.fallback: sidecars only")
        if policy.max_concurrent_requests is not None:
            lines.append(f"{at}.max_concurrent_requests: sidecars only")
        if route.timeout is not None and route.timeout < ROUTE_TIMEOUT_FLOOR:
            lines.append(
                f"{at}.timeout: {route.timeout:g}s is under {ROUTE_TIMEOUT_FLOOR:g}s: grpcio"
                " ends calls up to 2 s before max_stream_duration, so proxyless calls may fail"
                " at once; give them a client deadline instead"
            )
    return lines
