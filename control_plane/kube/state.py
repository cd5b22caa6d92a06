"""What the cluster looks like, from the Services and EndpointSlices the watch has seen.

Sans-IO: the watch hands in the JSON objects of a list (``replace``) or of a watch event
(``apply``); ``services()`` answers the endpoints of every Service. No sockets, no clock, no
client library: the tests feed it plain dictionaries.

An EndpointSlice names its Service in the label ``kubernetes.io/service-name``; a Service may
have several slices (more than 100 endpoints, or both address families), and an endpoint may
briefly appear in two while the controller moves it. Slice ports carry the resolved target
port, matched to the Service port by name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SERVICE = "Service"
ENDPOINT_SLICE = "EndpointSlice"


@dataclass(frozen=True, slots=True, order=True)
class PodEndpoint:
    """One pod address behind a Service port. ``draining``: terminating but still serving."""

    address: str
    port: int
    zone: str = ""
    node: str = ""
    draining: bool = False


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str
    port: int
    app_protocol: str = ""


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    name: str
    namespace: str
    cluster_ip: str | None
    ports: tuple[ServicePort, ...]

    @property
    def key(self) -> str:
        return f"{self.name}.{self.namespace}"


@dataclass(frozen=True, slots=True)
class SliceInfo:
    namespace: str
    service: str
    # port name -> target port number
    ports: tuple[tuple[str, int], ...]
    endpoints: tuple[tuple[str, str, str, bool], ...]  # address, zone, node, draining


@dataclass(frozen=True, slots=True)
class DiscoveredService:
    """A Service and, per Service port name, the pods behind it (sorted, deduplicated)."""

    info: ServiceInfo
    endpoints: Mapping[str, tuple[PodEndpoint, ...]]

    def endpoints_for(self, port: ServicePort) -> tuple[PodEndpoint, ...]:
        return self.endpoints.get(port.name, ())


class MalformedObject(ValueError):
    """An object from the API server lacks a field the mesh needs; the message names it."""


class ClusterState:
    """Services and EndpointSlices by (namespace, name); ``version`` moves on every change."""

    def __init__(self) -> None:
        self._services: dict[tuple[str, str], ServiceInfo] = {}
        self._slices: dict[tuple[str, str], SliceInfo] = {}
        self.version = 0
        # What the last ``replace`` skipped, one message per object, for the caller to log.
        self.rejected: list[str] = []

    def replace(
        self, kind: str, items: Iterable[Mapping[str, Any]], namespace: str | None = None
    ) -> bool:
        """A fresh list of ``kind`` (in ``namespace``, or in all): objects of that scope not in
        it are gone. Returns whether anything changed.

        Malformed objects are skipped, their errors kept in ``rejected`` (``apply`` raises
        instead); a list is the server's whole truth, so one bad object must not hide the
        others.
        """
        table: dict[tuple[str, str], Any] = {}
        self.rejected = []
        for item in items:
            try:
                key, value = self._parse(kind, item)
            except MalformedObject as exc:
                self.rejected.append(str(exc))
                continue
            if value is not None:
                table[key] = value
        current = self._table(kind)
        scoped = {k: v for k, v in current.items() if namespace in (None, k[0])}
        if table == scoped:
            return False
        for key in scoped:
            del current[key]
        current.update(table)
        self.version += 1
        return True

    def apply(self, kind: str, event_type: str, obj: Mapping[str, Any]) -> bool:
        """One watch event (ADDED, MODIFIED, DELETED). Returns whether anything changed.

        Raises ``MalformedObject`` for an object without the fields needed; state is unchanged.
        """
        key, value = self._parse(kind, obj)
        table = self._table(kind)
        if event_type == "DELETED" or value is None:
            changed = table.pop(key, None) is not None
        elif event_type in ("ADDED", "MODIFIED"):
            changed = table.get(key) != value
            table[key] = value
        else:
            return False
        if changed:
            self.version += 1
        return changed

    def _table(self, kind: str) -> dict[tuple[str, str], Any]:
        if kind == SERVICE:
            return self._services
        if kind == ENDPOINT_SLICE:
            return self._slices
        raise ValueError(f"unknown kind {kind!r}")

    def _parse(self, kind: str, obj: Mapping[str, Any]) -> tuple[tuple[str, str], Any]:
        meta = obj.get("metadata")
        if not isinstance(meta, Mapping):
            raise MalformedObject(f"{kind}: metadata: missing")
        name, namespace = meta.get("name"), meta.get("namespace")
        if not isinstance(name, str) or not isinstance(namespace, str):
            raise MalformedObject(f"{kind}: metadata.name and metadata.namespace are required")
        key = (namespace, name)
        if kind == SERVICE:
            return key, parse_service(obj, name, namespace)
        return key, parse_slice(obj, name, namespace)

    @property
    def service_count(self) -> int:
        return len(self._services)

    def services(self) -> dict[str, DiscoveredService]:
        """Every Service with its endpoints, by ``name.namespace``."""
        by_service: dict[tuple[str, str], list[SliceInfo]] = {}
        for s in self._slices.values():
            by_service.setdefault((s.namespace, s.service), []).append(s)
        found: dict[str, DiscoveredService] = {}
        for key, info in sorted(self._services.items()):
            found[info.key] = DiscoveredService(info, _endpoints(by_service.get(key, [])))
        return found


def _endpoints(slices: list[SliceInfo]) -> dict[str, tuple[PodEndpoint, ...]]:
    per_port: dict[str, dict[tuple[str, int], PodEndpoint]] = {}
    for s in slices:
        for port_name, port in s.ports:
            chosen = per_port.setdefault(port_name, {})
            for address, zone, node, draining in s.endpoints:
                endpoint = PodEndpoint(address, port, zone, node, draining)
                seen = chosen.get((address, port))
                # The same pod in two slices (mid-move): serving beats draining.
                if seen is None or (seen.draining and not draining):
                    chosen[(address, port)] = endpoint
    return {name: tuple(sorted(eps.values())) for name, eps in per_port.items()}


def parse_service(obj: Mapping[str, Any], name: str, namespace: str) -> ServiceInfo | None:
    """A Service's ports and ClusterIP; ``None`` for kinds the mesh does not route
    (ExternalName: DNS only, no endpoints)."""
    spec = obj.get("spec") or {}
    if not isinstance(spec, Mapping):
        raise MalformedObject(f"Service {namespace}/{name}: spec: expected an object")
    if spec.get("type") == "ExternalName":
        return None
    ports: list[ServicePort] = []
    for i, p in enumerate(spec.get("ports") or ()):
        if not isinstance(p, Mapping) or not isinstance(p.get("port"), int):
            raise MalformedObject(f"Service {namespace}/{name}: spec.ports[{i}].port: required")
        if p.get("protocol", "TCP") != "TCP":
            continue  # UDP and SCTP are not proxied
        ports.append(
            ServicePort(str(p.get("name") or ""), p["port"], str(p.get("appProtocol") or ""))
        )
    cluster_ip = spec.get("clusterIP")
    if not isinstance(cluster_ip, str) or cluster_ip in ("", "None"):
        cluster_ip = None  # headless
    return ServiceInfo(name, namespace, cluster_ip, tuple(ports))


def parse_slice(obj: Mapping[str, Any], name: str, namespace: str) -> SliceInfo | None:
    """An EndpointSlice's ready and draining endpoints; ``None`` for one the mesh ignores
    (no Service label, or FQDN addresses)."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    service = labels.get(SERVICE_NAME_LABEL) if isinstance(labels, Mapping) else None
    if not isinstance(service, str) or obj.get("addressType") not in ("IPv4", "IPv6"):
        return None
    where = f"EndpointSlice {namespace}/{name}"
    ports: list[tuple[str, int]] = []
    for i, p in enumerate(obj.get("ports") or ()):
        if not isinstance(p, Mapping):
            raise MalformedObject(f"{where}: ports[{i}]: expected an object")
        if p.get("protocol", "TCP") != "TCP":
            continue
        port = p.get("port")
        if port is None:
            continue  # "all ports": only for Services without a selector and no ports
        if not isinstance(port, int) or not 0 < port < 65536:
            raise MalformedObject(f"{where}: ports[{i}].port: expected 1..65535")
        ports.append((str(p.get("name") or ""), port))
    endpoints: list[tuple[str, str, str, bool]] = []
    for i, e in enumerate(obj.get("endpoints") or ()):
        if not isinstance(e, Mapping) or not isinstance(e.get("addresses"), list):
            raise MalformedObject(f"{where}: endpoints[{i}].addresses: required")
        conditions = e.get("conditions") or {}
        # Unset conditions mean ready/serving and not terminating (the API's own defaults).
        ready = conditions.get("ready") is not False
        serving = conditions.get("serving", ready) is not False
        terminating = conditions.get("terminating") is True
        if terminating and serving:
            draining = True
        elif ready and not terminating:
            draining = False
        else:
            continue
        zone, node = str(e.get("zone") or ""), str(e.get("nodeName") or "")
        # Every address of an endpoint is the same pod: the first one is enough.
        if e["addresses"]:
            endpoints.append((str(e["addresses"][0]), zone, node, draining))
    return SliceInfo(namespace, service, tuple(ports), tuple(endpoints))
