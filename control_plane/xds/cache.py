"""The snapshot cache: the current mesh, and one consistent snapshot per proxy view.

It knows nothing about streams, nonces or ACKs; streams ask it for a snapshot and subscribe
to be told that the mesh changed. That call is the only seam between the two.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2

from control_plane.mesh import Mesh, service_view
from control_plane.registry.core import Instance, Registry
from control_plane.xds.resources import (
    DEFAULT_INBOUND_ADDRESS,
    Registered,
    ResourceMemo,
    ViewKey,
    build_view,
    listener_depends_on_proxy,
    service_load_assignment,
)
from control_plane.xds.snapshot import Snapshot
from control_plane.xds.types import ENDPOINT, Resource
from pilotfish.config.errors import ConfigError
from pilotfish.config.fields import parse_address

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ProxyIdentity:
    node_id: str
    service: str
    namespace: str
    view: ViewKey
    # Where the proxy's admin interface listens, if it said (``pilotfish proxy-config``).
    admin_address: str = ""


def identify(node: base_pb2.Node, mesh: Mesh) -> ProxyIdentity:
    """Who a proxy says it is (node id and metadata) and therefore which view it gets.

    Metadata fields: ``service``, ``namespace``, ``admin_address`` and, for a sidecar,
    ``app_address`` (where its app listens) and ``inbound_address`` (where the sidecar listens
    for inbound calls). A proxy whose service is not in the mesh, or in another namespace, sees
    every service (unless the server refuses such proxies: ``--unknown-nodes reject``).
    """
    fields = node.metadata.fields

    def text(key: str) -> str:
        value = fields.get(key)
        return value.string_value if value is not None else ""

    service, namespace = text("service"), text("namespace")
    known = mesh.services.get(service)
    if (known is None or known.namespace != namespace) and namespace:
        # A Kubernetes Service the mesh file does not name is keyed ``name.namespace``.
        discovered = mesh.services.get(f"{service}.{namespace}")
        if discovered is not None:
            known, service = discovered, discovered.name
    view_service = service if known and namespace in ("", known.namespace) else None
    if service and view_service is None:
        log.warning(
            "node %r: service %r/%r is not in the mesh",
            node.id,
            namespace,
            service,
        )
    app = _address(node.id, "app_address", text("app_address"))
    inbound = _address(node.id, "inbound_address", text("inbound_address"))
    return ProxyIdentity(
        node_id=node.id,
        service=service,
        namespace=namespace,
        admin_address=text("admin_address"),
        view=ViewKey(
            service=view_service,
            app_address=app if view_service else None,
            inbound_address=inbound or DEFAULT_INBOUND_ADDRESS,
        ),
    )


def _address(node_id: str, key: str, value: str) -> tuple[str, int] | None:
    if not value:
        return None
    try:
        return parse_address(f"node.metadata.{key}", value)
    except ConfigError as exc:
        log.warning("node %r: ignoring %s", node_id, exc)
        return None


class SnapshotCache:
    """``registry``: where services with ``discovery: registry`` or ``mixed`` find endpoints."""

    def __init__(self, mesh: Mesh, registry: Registry | None = None) -> None:
        self._registry = registry
        self._mesh = mesh
        self._views = self._build_known_views(mesh)
        self._listeners: list[Callable[[], None]] = []
        self.generation = 1
        # Increases with every change a proxy may see, mesh or registry: a proxy that acked a
        # response built at revision r holds everything that changed up to r.
        self.revision = 1
        self.changed_at = time.monotonic()
        if registry is not None:
            registry.on_change(self._registry_changed)

    @property
    def mesh(self) -> Mesh:
        return self._mesh

    def _registered(
        self, mesh: Mesh, only: frozenset[str] | None = None
    ) -> dict[str, list[Instance]]:
        """Registered instances by mesh service (of registry services in ``only``, if given)."""
        if self._registry is None:
            return {}
        result: dict[str, list[Instance]] = {}
        by_service: dict[str, list[Instance]] = {}
        for name, service in mesh.services.items():
            selector = service.registry
            if selector is None or (only is not None and selector.service not in only):
                continue
            instances = by_service.get(selector.service)
            if instances is None:
                instances = by_service[selector.service] = self._registry.instances(
                    selector.service
                )
            result[name] = [i for i in instances if selector.selects(i.service, i.labels)]
        return result

    def _registry_changed(self, services: frozenset[str]) -> None:
        """Swap the changed services' endpoints into every view that holds them."""
        mesh = self._mesh
        fresh = {
            name: Resource.of(name, service_load_assignment(mesh.services[name], instances))
            for name, instances in self._registered(mesh, services).items()
        }
        if not fresh:
            return
        for key, snapshot in list(self._views.items()):
            endpoints = snapshot.of_type(ENDPOINT)
            if not any(name in endpoints for name in fresh):
                continue
            resources = dict(snapshot.resources)
            resources[ENDPOINT] = {
                name: fresh.get(name, resource) for name, resource in endpoints.items()
            }
            # Same names as before, so the snapshot stays consistent without a new check.
            self._views[key] = Snapshot(resources)
        self._notify()

    def endpoint_names(self, registry_service: str) -> set[str]:
        """The EDS resources (mesh services) that registered instances of a service feed."""
        return {
            name
            for name, service in self._mesh.services.items()
            if service.registry is not None and service.registry.service == registry_service
        }

    def _notify(self) -> None:
        self.revision += 1
        self.changed_at = time.monotonic()
        for listener in list(self._listeners):
            listener()

    def _build_known_views(self, mesh: Mesh) -> dict[ViewKey, Snapshot]:
        # Building every service's view up front proves the new mesh yields consistent
        # snapshots before any proxy sees it; views with an inbound side are built on demand.
        keys = [ViewKey(), *(ViewKey(service=name) for name in mesh.services)]
        memo: ResourceMemo = {}
        registered: Registered = self._registered(mesh)
        per_proxy = listener_depends_on_proxy(mesh)
        distinct: dict[tuple[tuple[str, ...], str | None], Snapshot] = {}
        views = {}
        # A view is decided by the proxy's depends_on (None: every service); compute each once.
        names_by_roots: dict[tuple[str, ...] | None, tuple[str, ...]] = {}
        for key in keys:
            own = mesh.services.get(key.service) if key.service is not None else None
            roots = own.depends_on if own is not None else None
            names = names_by_roots.get(roots)
            if names is None:
                names = names_by_roots[roots] = tuple(service_view(mesh, key.service))
            # Views naming the same services hold the same resources: build and check once.
            shape = (names, key.service if per_proxy else None)
            snapshot = distinct.get(shape)
            if snapshot is None:
                snapshot = distinct[shape] = Snapshot.build(
                    build_view(mesh, key, memo, registered)
                )
            views[key] = snapshot
        return views

    def set_mesh(self, mesh: Mesh) -> None:
        """Serve ``mesh`` from now on; raises (keeping the old mesh) if a view is inconsistent."""
        views = self._build_known_views(mesh)
        self._mesh, self._views = mesh, views
        self.generation += 1
        self._notify()

    def snapshot(self, key: ViewKey) -> Snapshot:
        snapshot = self._views.get(key)
        if snapshot is None:
            registered = self._registered(self._mesh)
            snapshot = Snapshot.build(build_view(self._mesh, key, registered=registered))
            self._views[key] = snapshot
        return snapshot

    def on_change(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener`` after every mesh change; returns the function that stops it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)
