"""What the demo reads from the running mesh, through the interfaces a user has: the mesh file
it writes, the control plane's status service (``pilotfish status``) and the sidecars' admin
endpoints (``/clusters``, ``/stats``, ``/stats/prometheus``)."""

from __future__ import annotations

import os
import re
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml

from pilotfish.gen.pilotfish.status.v1 import status_pb2, status_pb2_grpc

STATUS_TIMEOUT = 2.0
POLL = 0.1
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# The type URLs' last part, as `pilotfish status` names them.
SHORT_TYPES = {
    "envoy.config.listener.v3.Listener": "LDS",
    "envoy.config.route.v3.RouteConfiguration": "RDS",
    "envoy.config.cluster.v3.Cluster": "CDS",
    "envoy.config.endpoint.v3.ClusterLoadAssignment": "EDS",
}


class MeshNotSettled(Exception):
    """The sidecars did not all take a change in time; the message says which did not."""


def write_mesh(path: Path, document: dict[str, Any]) -> None:
    """Replace the file in one step, so the control plane's watcher never reads half of it."""
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=".mesh-", suffix=".tmp", delete=False, encoding="utf-8"
    ) as tmp:
        yaml.safe_dump(document, tmp, sort_keys=False)
    os.replace(tmp.name, path)


@dataclass(frozen=True, slots=True)
class ProxyState:
    node_id: str
    in_sync: bool
    acked: dict[str, str]  # LDS/RDS/CDS/EDS -> acked version


@dataclass(frozen=True, slots=True)
class MeshState:
    generation: int
    error: str
    proxies: dict[str, ProxyState]

    def in_sync(self) -> list[str]:
        return sorted(n for n, p in self.proxies.items() if p.in_sync)


class ControlPlaneStatus:
    """The control plane's ``pilotfish.status.v1.ControlPlaneStatus`` service."""

    def __init__(self, address: str) -> None:
        self._channel = grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)])
        self._stub = status_pb2_grpc.ControlPlaneStatusStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def state(self) -> MeshState | None:
        """None while the control plane does not answer."""
        try:
            reply = self._stub.ListProxies(
                status_pb2.ListProxiesRequest(), timeout=STATUS_TIMEOUT
            )
        except grpc.RpcError:
            return None
        proxies = {}
        for p in reply.proxies:
            if not p.node_id:
                continue  # connected, no request yet
            acked = {
                SHORT_TYPES.get(t.type_url.rpartition("/")[2], t.type_url): t.acked_version
                for t in p.resources
            }
            proxies[p.node_id] = ProxyState(p.node_id, bool(p.in_sync), acked)
        return MeshState(int(reply.mesh_generation), reply.mesh_error, proxies)

    def wait(
        self,
        settled: Callable[[MeshState], bool],
        timeout: float,
        describe: Callable[[MeshState | None], str],
    ) -> MeshState:
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            state = self.state()
            if state is not None and settled(state):
                return state
            time.sleep(POLL)
        raise MeshNotSettled(describe(state))


def admin_get(admin: str, path: str, timeout: float = 2.0) -> str:
    with _NO_PROXY.open(f"http://{admin}{path}", timeout=timeout) as response:
        body: bytes = response.read()
        return body.decode("utf-8", errors="replace")


def upstream_hosts(admin: str) -> set[str] | None:
    """Every endpoint a sidecar holds now, in any cluster (``/clusters``); None if it does not
    answer. The instances' addresses are unique, so this needs no cluster name."""
    try:
        text = admin_get(admin, "/clusters")
    except (OSError, urllib.error.URLError):
        return None
    hosts = set()
    for line in text.splitlines():
        parts = line.split("::")
        if len(parts) == 4:
            hosts.add(parts[1])
    return hosts


def sum_stats(admin: str, names: re.Pattern[str]) -> int:
    """The sum of a sidecar's ``/stats`` whose whole name matches ``names``."""
    total = 0
    for line in admin_get(admin, "/stats").splitlines():
        key, _, value = line.partition(": ")
        if names.fullmatch(key):
            total += int(value)
    return total
