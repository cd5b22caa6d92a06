"""Helpers shared by the xDS translation modules: unpacking, durations, strict field checks,
and reading our own metadata (``filter_metadata["pilotfish"]``)."""

from __future__ import annotations

from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2
from google.protobuf.message import Message

from pilotfish.config.errors import ConfigError
from pilotfish.config.fields import Node

METADATA_KEY = "pilotfish"
_PARTS_PER_PERCENT = {
    percent_pb2.FractionalPercent.HUNDRED: 1,
    percent_pb2.FractionalPercent.TEN_THOUSAND: 100,
    percent_pb2.FractionalPercent.MILLION: 10_000,
}


def type_name(packed: any_pb2.Any) -> str:
    type_url: str = packed.type_url
    return type_url.rpartition("/")[2]


def unpack(path: str, packed: any_pb2.Any, message: Message) -> None:
    expected = message.DESCRIPTOR.full_name
    if type_name(packed) != expected or not packed.Unpack(message):
        raise ConfigError(path, f"expected {expected}, got {type_name(packed) or 'nothing'}")


def seconds(duration: duration_pb2.Duration) -> float:
    return float(duration.seconds + duration.nanos / 1e9)


def unsupported(message: Message, path: str, supported: set[str]) -> None:
    """Reject any set field that is not understood, naming it."""
    for field, _ in message.ListFields():
        if field.name not in supported:
            raise ConfigError(f"{path}.{field.name}", "not supported")


def percent(fraction: percent_pb2.FractionalPercent, path: str) -> float:
    """A FractionalPercent as a percentage (0-100)."""
    parts = _PARTS_PER_PERCENT.get(fraction.denominator)
    if parts is None:
        raise ConfigError(f"{path}.denominator", "not supported")
    return min(100.0, float(fraction.numerator) / parts)


def _plain(value: struct_pb2.Value) -> Any:
    """A Struct value as YAML would give it: whole numbers as ints (Structs only hold doubles)."""
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return {k: _plain(v) for k, v in value.struct_value.fields.items()}
    if kind == "list_value":
        return [_plain(v) for v in value.list_value.values]
    if kind == "number_value":
        number = value.number_value
        return int(number) if float(number).is_integer() else number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    return None


class OurMetadata:
    """The ``pilotfish`` struct of a resource's metadata, read key by key as YAML ``Node``s,
    so the mesh file's own parsers check it; unknown keys are rejected."""

    def __init__(self, metadata: base_pb2.Metadata, path: str, allowed: set[str]) -> None:
        self.path = f"{path}.metadata.filter_metadata.{METADATA_KEY}"
        struct = metadata.filter_metadata.get(METADATA_KEY)
        self.values: dict[str, Any] = (
            {k: _plain(v) for k, v in struct.fields.items()} if struct is not None else {}
        )
        for key in self.values:
            if key not in allowed:
                raise ConfigError(f"{self.path}.{key}", "not supported")

    def has(self, key: str) -> bool:
        return self.values.get(key) is not None

    def node(self, key: str) -> Node:
        return Node(f"{self.path}.{key}", self.values.get(key))
