"""xDS type URLs and the resource record the cache and the streams share."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from google.protobuf import any_pb2
from google.protobuf.message import Message

from control_plane.xds import pgv

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"

# Listed in the order a client depends on them: LDS → RDS, CDS → EDS.
ALL_TYPES = (LISTENER, ROUTE, CLUSTER, ENDPOINT)
# For these a state-of-the-world response always carries every resource the client sees; a
# resource missing from it is deleted (xDS spec). RDS and EDS are only ever asked for by name.
WILDCARD_TYPES = frozenset({LISTENER, CLUSTER})

# A push after a mesh edit goes in this order, so that a client never holds a reference to
# something it has not received yet: clusters before the routes that use them (xDS spec,
# "eventual consistency considerations").
_PUSH_ORDER = {CLUSTER: 0, ENDPOINT: 1, LISTENER: 2, ROUTE: 3}


def push_order(type_url: str) -> int:
    return _PUSH_ORDER.get(type_url, len(_PUSH_ORDER))


SHORT_NAMES = {LISTENER: "LDS", ROUTE: "RDS", CLUSTER: "CDS", ENDPOINT: "EDS"}


@dataclass(frozen=True, slots=True)
class Resource:
    """One named resource, packed once, with a version derived from its content."""

    name: str
    version: str
    packed: any_pb2.Any

    @classmethod
    def of(cls, name: str, message: Message) -> Resource:
        """Raises ``ConfigError`` if ``message`` breaks one of Envoy's validation rules."""
        pgv.check(message, f"{message.DESCRIPTOR.name}[{name}]")
        packed = any_pb2.Any()
        packed.Pack(message, deterministic=True)
        return cls(name=name, version=content_version(packed.value), packed=packed)


def content_version(*parts: bytes | str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]
