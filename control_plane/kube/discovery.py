"""The mesh the control plane serves: the mesh file, with what Kubernetes says added.

``merge`` is pure: the mesh file (policy, routes, static endpoints) and the discovered
Services (pods, names, ClusterIP) give one ``Mesh``. A Service ``name`` in namespace ``ns``
takes the mesh file's entry keyed ``name.ns``, or else the entry keyed ``name`` whose
``namespace`` is ``ns``; a Service the file does not name gets the defaults under the key
``name.ns``. ``MeshSources`` holds the two inputs and rebuilds the served mesh when either
changes, coalescing a burst of watch events into one rebuild.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Mapping

from control_plane.kube.options import DEFAULT_CLUSTER_DOMAIN
from control_plane.kube.state import DiscoveredService, ServiceInfo, ServicePort
from control_plane.mesh import Mesh, MeshService, _default_route
from control_plane.xds.snapshot import InconsistentSnapshot
from pilotfish.config.errors import ConfigError

log = logging.getLogger(__name__)

# Events arriving within this long of each other make one new snapshot.
COALESCE_SECONDS = 0.05


def protocol_of(port: ServicePort) -> str:
    """The mesh protocol of a Service port: its ``appProtocol``, else its name's prefix
    (``grpc``, ``http2``/``h2c``, ``http``), else ``tcp`` (bytes are relayed untouched)."""
    app = port.app_protocol.lower()
    if app in ("grpc", "http2", "h2c", "kubernetes.io/h2c"):
        return "grpc" if app == "grpc" else "http2"
    if app in ("http", "kubernetes.io/http"):
        return "http1"
    name = port.name.lower()
    for prefix, protocol in (("grpc", "grpc"), ("http2", "http2"), ("h2c", "http2")):
        if name == prefix or name.startswith(prefix + "-"):
            return protocol
    if name == "http" or name.startswith("http-"):
        return "http1"
    return "tcp"


def kubernetes_names(info: ServiceInfo, port: int, cluster_domain: str) -> list[str]:
    """The names a pod resolves for the Service, each alone and with the port, and
    ``ClusterIP:port``. The bare ``name`` is left to the caller (it may be ambiguous)."""
    names = [
        f"{info.name}.{info.namespace}",
        f"{info.name}.{info.namespace}.svc",
        f"{info.name}.{info.namespace}.svc.{cluster_domain}",
    ]
    found = [n for name in names for n in (name, f"{name}:{port}")]
    if info.cluster_ip is not None:
        ip = f"[{info.cluster_ip}]" if ":" in info.cluster_ip else info.cluster_ip
        found.append(f"{ip}:{port}")
    return found


def _mesh_entry(mesh: Mesh, info: ServiceInfo) -> MeshService | None:
    found = mesh.services.get(info.key)
    if found is not None:
        return found
    plain = mesh.services.get(info.name)
    if plain is not None and plain.namespace == info.namespace:
        return plain
    return None


def _pick_port(info: ServiceInfo, wanted: int | None) -> ServicePort | None:
    for port in info.ports:
        if port.port == wanted:
            return port
    return info.ports[0] if info.ports else None


def merge(
    mesh: Mesh,
    discovered: Mapping[str, DiscoveredService],
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN,
) -> Mesh:
    """The mesh file with every discovered Service's pods and names added."""
    if not discovered:
        return dataclasses.replace(mesh, cluster_domain=cluster_domain)
    services = dict(mesh.services)
    # A bare name is a caller's own namespace's Service: only unambiguous ones get it.
    short = Counter(d.info.name for d in discovered.values())
    for d in discovered.values():
        info = d.info
        entry = _mesh_entry(mesh, info)
        port = _pick_port(info, entry.port if entry is not None else None)
        if port is None:
            continue  # no TCP port: nothing to route
        aliases = kubernetes_names(info, port.port, cluster_domain)
        key = entry.name if entry is not None else info.key
        if short[info.name] == 1 and (info.name == key or info.name not in services):
            aliases[:0] = [info.name, f"{info.name}:{port.port}"]
        pods = d.endpoints_for(port)
        cluster_ips = (info.cluster_ip,) if info.cluster_ip is not None else ()
        if entry is not None:
            services[key] = dataclasses.replace(
                entry, port=entry.port or port.port, pods=pods, aliases=tuple(aliases),
                cluster_ips=cluster_ips,
            )
        else:
            protocol = protocol_of(port)
            services[key] = MeshService(
                name=key,
                namespace=info.namespace,
                protocol=protocol,
                port=port.port,
                endpoints=(),
                depends_on=None,
                routes=() if protocol == "tcp" else (_default_route(key),),
                connect_timeout=5.0,
                pods=pods,
                aliases=tuple(aliases),
                cluster_ips=cluster_ips,
            )
    return dataclasses.replace(mesh, services=services, cluster_domain=cluster_domain)


class MeshSources:
    """The mesh file and the discovered Services; ``apply`` serves their merge.

    A mesh file edit is applied at once (and raises if it is rejected, keeping the last good
    mesh, as before). Discovery changes are coalesced: ``discovery_changed`` schedules one
    rebuild ``COALESCE_SECONDS`` later, reading whatever the state is by then.
    """

    def __init__(
        self,
        mesh: Mesh,
        apply: Callable[[Mesh], None],
        discovered: Callable[[], Mapping[str, DiscoveredService]] = dict,
        cluster_domain: str = DEFAULT_CLUSTER_DOMAIN,
        coalesce: float = COALESCE_SECONDS,
    ) -> None:
        self.file_mesh = mesh
        self._apply = apply
        self._discovered = discovered
        self._cluster_domain = cluster_domain
        self._coalesce = coalesce
        self._pending: asyncio.TimerHandle | None = None
        self.rebuilds = 0
        self.last_error: str | None = None

    def merged(self) -> Mesh:
        return merge(self.file_mesh, self._discovered(), self._cluster_domain)

    def set_file_mesh(self, mesh: Mesh) -> None:
        merged = merge(mesh, self._discovered(), self._cluster_domain)
        self._apply(merged)  # raises on an inconsistent mesh: the old one stays
        self.file_mesh = mesh

    def discovery_changed(self) -> None:
        if self._pending is None:
            loop = asyncio.get_running_loop()
            self._pending = loop.call_later(self._coalesce, self._rebuild)

    def _rebuild(self) -> None:
        self._pending = None
        self.rebuilds += 1
        try:
            self._apply(self.merged())
        except (ConfigError, InconsistentSnapshot) as exc:
            # Only a mesh file route naming a Service can make this fail; keep serving.
            self.last_error = f"discovered services rejected: {exc}"
            log.error("kubernetes: %s", self.last_error)
        else:
            self.last_error = None

    def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
