"""Small builders shared by the xDS resource modules."""

from __future__ import annotations

from google.protobuf import any_pb2, duration_pb2, struct_pb2
from google.protobuf.message import Message

# Our own typed config lives under this key of `metadata.filter_metadata` (Cluster, Route,
# Listener); see docs/mesh-reference.md, "What Envoy has no field for".
METADATA_KEY = "pilotfish"


def pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message, deterministic=True)
    return packed


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def struct(values: dict[str, object]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s
