"""Which view a proxy on the mTLS port gets: the one of its verified SPIFFE ID, never a claim.

A workload identity ``spiffe://<td>/ns/<ns>/sa/<sa>`` runs the mesh services of namespace
``ns`` whose service account is ``sa`` (a service without one uses its own name). Node
metadata may still pick one of those services (a service account shared by several), but
a proxy that names a service its identity does not run is refused with PERMISSION_DENIED:
serving it its own view instead would hide the misconfiguration (or the attempt) behind a
stream that looks healthy. Pure functions: no sockets, no grpc.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography import x509
from envoy.config.core.v3 import base_pb2

from control_plane.mesh import Mesh, MeshService
from control_plane.xds.stream_state import ProtocolError
from pilotfish.identity import InvalidSpiffeId, SpiffeId


class IdentityMismatch(ProtocolError):
    """Node metadata contradicts the verified identity; the stream ends with PERMISSION_DENIED."""


class PeerRefused(Exception):
    """The caller on the mTLS port has no certificate naming an identity of the trust domain."""


@dataclass(frozen=True, slots=True)
class AuthenticatedPeer:
    """The identity a proxy proved with its client certificate, and when that certificate ends."""

    spiffe_id: SpiffeId
    not_after: float


# The services of each (namespace, service account), for the latest mesh only: every stream
# binds again on every mesh change, and a scan of the mesh per stream would make a change cost
# services x streams.
_by_account: tuple[Mesh, dict[tuple[str, str], list[MeshService]]] | None = None


def services_of(identity: SpiffeId, mesh: Mesh) -> list[MeshService]:
    """The mesh services whose workload identity is ``identity``, sorted by name."""
    global _by_account
    if _by_account is None or _by_account[0] is not mesh:
        index: dict[tuple[str, str], list[MeshService]] = {}
        for service in sorted(mesh.services.values(), key=lambda s: s.name):
            # As ``workload_identity`` names it, without building (and validating) the ID.
            account = service.service_account or service.name
            index.setdefault((service.namespace, account), []).append(service)
        _by_account = (mesh, index)
    return list(_by_account[1].get((identity.namespace, identity.service_account), ()))


def registrable_services(identity: SpiffeId, mesh: Mesh) -> list[str]:
    """The registry names an instance of ``identity`` may register under: each service it runs,
    and the registry service each of those takes its endpoints from (``registry.service``)."""
    names: list[str] = []
    for service in services_of(identity, mesh):
        for name in (service.name, service.registry.service if service.registry else None):
            if name is not None and name not in names:
                names.append(name)
    return names


def bind_node(node: base_pb2.Node, mesh: Mesh, identity: SpiffeId) -> base_pb2.Node:
    """A copy of ``node`` whose ``service`` and ``namespace`` are those of ``identity``.

    Raises ``IdentityMismatch`` when the metadata names another namespace or a service the
    identity does not run, or names none while the identity runs several. An identity that
    runs no service of the mesh keeps its claimed service name in its own namespace: the
    server's unknown-node policy then decides (``reject`` refuses it).
    """
    fields = node.metadata.fields
    claimed = fields["service"].string_value if "service" in fields else ""
    claimed_ns = fields["namespace"].string_value if "namespace" in fields else ""
    if claimed_ns and claimed_ns != identity.namespace:
        raise IdentityMismatch(
            f"node {node.id!r} claims namespace {claimed_ns!r}, but its certificate is "
            f"{identity} (namespace {identity.namespace!r})"
        )
    own = services_of(identity, mesh)
    names = [s.name for s in own]
    if own and claimed and claimed not in names:
        raise IdentityMismatch(
            f"node {node.id!r} claims service {claimed!r}, but its certificate {identity} "
            f"runs {', '.join(names)}"
        )
    if own and not claimed and len(own) > 1:
        raise IdentityMismatch(
            f"node {node.id!r}: its certificate {identity} runs {', '.join(names)}; "
            "name one in node metadata 'service'"
        )
    if not own and claimed and _in_mesh(claimed, mesh):
        raise IdentityMismatch(
            f"node {node.id!r} claims service {claimed!r}, but its certificate {identity} "
            "runs no service of the mesh"
        )
    # Without a service of its own, the claimed name (known to be no service of the mesh)
    # stays, so that the unknown-node policy and its message name what the proxy said.
    service = claimed or (names[0] if own else "")
    bound = base_pb2.Node()
    bound.CopyFrom(node)
    bound.metadata.update({"service": service, "namespace": identity.namespace})
    return bound


def _in_mesh(name: str, mesh: Mesh) -> bool:
    return name in mesh.services or any(s.name == name for s in mesh.services.values())


def authenticate_peer(context: Any, trust_domain: str) -> AuthenticatedPeer:
    """The identity in a call's verified client certificate (grpc's auth context).

    grpc has already checked the chain against the trust bundle (the port requires a client
    certificate); this reads the SPIFFE ID out of the leaf and checks its trust domain.
    """
    auth = context.auth_context() or {}
    pems = auth.get("x509_pem_cert")
    if not pems:
        raise PeerRefused("no client certificate (this port requires one from the mesh CA)")
    try:
        cert = x509.load_pem_x509_certificate(pems[0])
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        raise PeerRefused("the client certificate has no subjectAltName") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise PeerRefused(f"the client certificate has {len(uris)} URI SANs, not one SPIFFE ID")
    try:
        identity = SpiffeId.parse(uris[0])
    except InvalidSpiffeId as exc:
        raise PeerRefused(f"the client certificate: {exc}") from None
    if identity.trust_domain != trust_domain:
        raise PeerRefused(f"{identity} is outside trust domain {trust_domain!r}")
    return AuthenticatedPeer(identity, cert.not_valid_after_utc.timestamp())
