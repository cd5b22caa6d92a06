"""``pilotfish.status.v1.ControlPlaneStatus``: which proxies are connected and are they in sync."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from control_plane.proxyless import ignored_by_proxyless
from control_plane.xds.cache import SnapshotCache
from control_plane.xds.server import ConnectedProxy, ProxyRegistry
from pilotfish.gen.pilotfish.status.v1 import status_pb2, status_pb2_grpc


class StatusServicer(status_pb2_grpc.ControlPlaneStatusServicer):  # type: ignore[misc]
    def __init__(
        self, cache: SnapshotCache, registry: ProxyRegistry, mesh_error: Callable[[], str | None]
    ) -> None:
        self._cache = cache
        self._registry = registry
        self._mesh_error = mesh_error

    async def ListProxies(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        return status_pb2.ListProxiesResponse(
            proxies=[self._proxy_status(p) for p in self._registry.proxies()],
            mesh_generation=self._cache.generation,
            mesh_error=self._mesh_error() or "",
            proxyless_ignored=ignored_by_proxyless(self._cache.mesh),
        )

    def _proxy_status(self, proxy: ConnectedProxy) -> Any:
        since = timestamp_pb2.Timestamp()
        since.FromNanoseconds(int(proxy.connected_since * 1e9))
        message = status_pb2.ProxyStatus(stream_kind=proxy.kind, connected_since=since)
        if proxy.peer is not None:
            message.spiffe_id = proxy.peer.spiffe_id.uri
            message.certificate_expires.FromNanoseconds(int(proxy.peer.not_after * 1e9))
        if proxy.identity is None:
            return message  # connected, but no request yet
        message.node_id = proxy.identity.node_id
        message.service = proxy.identity.service
        message.namespace = proxy.identity.namespace
        message.admin_address = proxy.identity.admin_address
        types = proxy.protocol.status(self._cache.snapshot(proxy.identity.view))
        for t in types:
            message.resources.add(
                type_url=t.type_url,
                acked_version=t.acked_version,
                sent_version=t.sent_version,
                last_nack_version=t.nacked_version,
                last_nack_message=t.nack_message,
                in_sync=t.in_sync,
                current_version=t.current_version,
                added=t.diff.added,
                removed=t.diff.removed,
                changed=t.diff.changed,
            )
        message.in_sync = all(t.in_sync for t in types)
        return message
