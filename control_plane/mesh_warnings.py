"""Mesh file warnings: things that parse but cannot do what they seem to say.

``pilotfish validate`` prints them; the control plane serves such a file all the same.
"""

from __future__ import annotations

from control_plane.mesh import Mesh, MeshService
from pilotfish.config.route_policy import RetryOn, RetryPolicy

# Conditions that only ever fire for a request that may have reached the app: for a request
# that is not idempotent they never fire (gRPC calls, unless retry_non_idempotent is set).
_ALWAYS_RETRIED = frozenset({RetryOn.CONNECT_FAILURE, RetryOn.REFUSED_STREAM})
_SAFE_FOR_GRPC = frozenset({RetryOn.UNAVAILABLE})


def mesh_warnings(mesh: Mesh) -> list[str]:
    warnings: list[str] = []
    for name, service in mesh.services.items():
        for index, route in enumerate(service.routes):
            path = f"services.{name}.routes[{index}].retry"
            problem = _retry_problem(route.policy.retry, service)
            if problem is not None:
                warnings.append(f"{path}: {problem}")
    return warnings


def _retry_problem(policy: RetryPolicy, service: MeshService) -> str | None:
    if policy == RetryPolicy() or policy.attempts == 0:
        return None  # the default, or retries turned off on purpose
    if not policy.retry_on:
        return f"attempts: {policy.attempts} with an empty retry_on never retries"
    useful = policy.retry_on - _ALWAYS_RETRIED
    if not useful:
        return (
            "never fires: connect failures and refused streams are retried on another host "
            "without a retry policy; name a failure of the app (e.g. unavailable)"
        )
    if service.protocol == "grpc" and not policy.retry_non_idempotent and not (
        useful & _SAFE_FOR_GRPC
    ):
        names = ", ".join(sorted(c.value for c in useful))
        return (
            f"never fires for gRPC calls: {names} may follow a call the app already ran, and "
            "gRPC calls are not idempotent; add retry_non_idempotent: true if these calls are "
            "safe to repeat, or retry on unavailable"
        )
    return None
