"""Shared builders for the control plane tests: a small mesh and requests as clients send them."""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2

from control_plane.mesh import Mesh, parse_mesh_text
from control_plane.xds.resources import ViewKey, build_view
from control_plane.xds.snapshot import Snapshot

MESH_YAML = """
services:
  greeter:
    protocol: grpc
    port: 50051
    endpoints: [127.0.0.1:50061, {address: 127.0.0.1:50062, weight: 3}]
    depends_on: [quotes]
    routes:
      - match: {prefix: /helloworld.Greeter/}
        timeout: 2s
        split: {greeter: 90, greeter-canary: 10}
  greeter-canary:
    endpoints: [127.0.0.1:50063]
  quotes:
    endpoints: [127.0.0.1:50071]
"""


def mesh(text: str = MESH_YAML) -> Mesh:
    return parse_mesh_text(text)


def snapshot(text: str = MESH_YAML, key: ViewKey | None = None) -> Snapshot:
    return Snapshot.build(build_view(mesh(text), key or ViewKey()))


def node(node_id: str = "n1", **metadata: str) -> base_pb2.Node:
    meta = struct_pb2.Struct()
    meta.update(metadata)
    return base_pb2.Node(id=node_id, metadata=meta)


def sotw(
    type_url: str,
    names: list[str] | None = None,
    version: str = "",
    nonce: str = "",
    error: str | None = None,
) -> discovery_pb2.DiscoveryRequest:
    request = discovery_pb2.DiscoveryRequest(
        type_url=type_url, resource_names=names or [], version_info=version,
        response_nonce=nonce, node=node(),
    )
    if error is not None:
        request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return request


def delta(
    type_url: str,
    subscribe: list[str] | None = None,
    unsubscribe: list[str] | None = None,
    nonce: str = "",
    error: str | None = None,
    initial: dict[str, str] | None = None,
) -> discovery_pb2.DeltaDiscoveryRequest:
    request = discovery_pb2.DeltaDiscoveryRequest(
        type_url=type_url, resource_names_subscribe=subscribe or [],
        resource_names_unsubscribe=unsubscribe or [], response_nonce=nonce,
        initial_resource_versions=initial or {}, node=node(),
    )
    if error is not None:
        request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return request
