"""A protobuf message written in config: as base64 bytes, or as JSON with a descriptor set.

A static gRPC fallback that answers OK must carry a response message (a unary OK without one is
an invalid response to grpcio, which hands the application ``None``). The message is given as
``{base64: ...}`` (the serialized bytes) or as ``{json: ..., type: pkg.Message,
descriptor_set: file.pb}`` where the file is a ``FileDescriptorSet`` the user built (``protoc
--include_imports --descriptor_set_out``). JSON is encoded once, when the config is read, and
travels on as bytes: the sidecar never needs the descriptors.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

from pilotfish.config.fields import Node

MAX_MESSAGE_BYTES = 64 * 1024
"""A fallback answers from memory on every failing request: keep it small."""


def parse_grpc_message(node: Node) -> bytes:
    node.mapping({"base64", "json", "type", "descriptor_set"})
    if node.has("base64") == node.has("json"):
        raise node.error("exactly one of base64, json is required")
    if node.has("base64"):
        data = _from_base64(node.get("base64"))
        for key in ("type", "descriptor_set"):
            if node.has(key):
                raise node.get(key).error("only with json")
    else:
        data = _from_json(node)
    if len(data) > MAX_MESSAGE_BYTES:
        raise node.error(f"the message is {len(data)} bytes; at most {MAX_MESSAGE_BYTES}")
    return data


def _from_base64(node: Node) -> bytes:
    text = node.as_str()
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise node.error("expected base64 (the serialized protobuf message)") from None


def _from_json(node: Node) -> bytes:
    # The protobuf runtime (4 MB resident) only for a message written as JSON: the sidecar
    # never needs it otherwise.
    from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
    from google.protobuf.message import DecodeError

    type_name = node.require("type").as_str()
    path_node = node.require("descriptor_set")
    path = Path(path_node.as_str())
    try:
        descriptors = descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())
    except OSError as exc:
        raise path_node.error(f"cannot read {path}: {exc.strerror}") from None
    except DecodeError:
        raise path_node.error(f"{path} is not a FileDescriptorSet (protoc -o)") from None
    pool = descriptor_pool.DescriptorPool()
    try:
        for file in descriptors.file:
            pool.Add(file)
        descriptor = pool.FindMessageTypeByName(type_name)
    except KeyError:
        raise node.get("type").error(f"no message type {type_name} in {path}") from None
    except TypeError as exc:  # a file whose imports are missing from the set
        raise path_node.error(f"{path}: {exc} (build it with --include_imports)") from None
    message = message_factory.GetMessageClass(descriptor)()
    value = node.require("json").value
    try:
        if isinstance(value, str):
            json_format.Parse(value, message)
        else:
            # YAML gave a mapping already; a round trip through JSON text rejects what JSON
            # cannot hold (dates, non-string keys) with json_format's own message.
            json_format.Parse(json.dumps(value), message)
    except (json_format.ParseError, TypeError, ValueError) as exc:
        raise node.get("json").error(f"not a valid {type_name}: {exc}") from None
    data: bytes = message.SerializeToString(deterministic=True)
    return data
