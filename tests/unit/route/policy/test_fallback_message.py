"""A static gRPC fallback that answers OK carries a message: base64 bytes, or JSON."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2

from pilotfish.config.errors import ConfigError
from pilotfish.config.fields import Node
from pilotfish.config.route_policy import FallbackTrigger
from pilotfish.config.route_policy_yaml import parse_route_policy
from sidecar.route.policy.fallback import Fallback
from sidecar.route.policy.reply import LocalReply

ROUTE = "services.greeter.routes[0]"
SERVING = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


def descriptor_set(tmp_path: Path) -> Path:
    """What ``protoc --include_imports -o health.pb health.proto`` writes."""
    files = descriptor_pb2.FileDescriptorSet()
    health_pb2.DESCRIPTOR.CopyToProto(files.file.add())
    path = tmp_path / "health.pb"
    path.write_bytes(files.SerializeToString())
    return path


def response_of(text: str) -> bytes | None:
    policy = parse_route_policy(Node(ROUTE, yaml.safe_load(f"fallback: {{response: {text}}}")))
    assert policy.fallback is not None and policy.fallback.response is not None
    return policy.fallback.response.grpc_response


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        response_of(text)
    return str(info.value)


def test_base64_message_makes_an_ok() -> None:
    encoded = "CAE="  # HealthCheckResponse{status: SERVING}
    policy = parse_route_policy(
        Node(
            ROUTE,
            yaml.safe_load(f"fallback: {{response: {{grpc_response: {{base64: {encoded}}}}}}}"),
        )
    )
    assert policy.fallback is not None and policy.fallback.response is not None
    assert policy.fallback.response.grpc_status == 0
    assert policy.fallback.response.grpc_response == SERVING.SerializeToString()


def test_json_through_a_descriptor_set(tmp_path: Path) -> None:
    path = descriptor_set(tmp_path)
    text = (
        "{grpc_status: ok, grpc_response: {json: {status: SERVING},"
        f" type: grpc.health.v1.HealthCheckResponse, descriptor_set: '{path}'}}}}"
    )
    assert response_of(text) == SERVING.SerializeToString()
    as_text = text.replace("{status: SERVING}", """'{"status": "SERVING"}'""")
    assert response_of(as_text) == SERVING.SerializeToString()


def test_the_reply_is_headers_a_length_prefixed_message_and_trailers() -> None:
    policy = parse_route_policy(
        Node(ROUTE, yaml.safe_load("fallback: {response: {grpc_response: {base64: CAE=}}}"))
    )
    assert policy.fallback is not None
    reply = Fallback(policy.fallback).decide(FallbackTrigger.CIRCUIT_OPEN, grpc=True)
    assert isinstance(reply, LocalReply)
    headers, frame, trailers = reply.grpc_message_parts()
    assert (b"x-pilotfish-response-flags", b"FB") in headers
    assert not any(name == b"grpc-status" for name, _ in headers)
    assert frame == b"\x00\x00\x00\x00\x02" + SERVING.SerializeToString()
    assert trailers == [(b"grpc-status", b"0")]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{grpc_status: ok}", f"{ROUTE}.fallback.response.grpc_status: an OK needs a response"),
        ("{grpc_status: 0}", f"{ROUTE}.fallback.response.grpc_status: an OK needs a response"),
        (
            "{grpc_status: unavailable, grpc_response: {base64: CAE=}}",
            f"{ROUTE}.fallback.response.grpc_response: a message goes only with grpc_status ok",
        ),
        ("{grpc_response: {}}", f"{ROUTE}.fallback.response.grpc_response: exactly one of"),
        (
            "{grpc_response: {base64: 'not base64!'}}",
            f"{ROUTE}.fallback.response.grpc_response.base64: expected base64",
        ),
        (
            "{grpc_response: {base64: CAE=, type: x.Y}}",
            f"{ROUTE}.fallback.response.grpc_response.type: only with json",
        ),
        (
            "{grpc_response: {json: {}, type: x.Y}}",
            f"{ROUTE}.fallback.response.grpc_response.descriptor_set: required field",
        ),
        (
            "{grpc_response: {json: {}, type: x.Y, descriptor_set: /nonexistent.pb}}",
            f"{ROUTE}.fallback.response.grpc_response.descriptor_set: cannot read",
        ),
    ],
)
def test_errors_name_the_field(text: str, message: str) -> None:
    assert error_of(text).startswith(message)


def test_json_errors_name_the_field(tmp_path: Path) -> None:
    path = descriptor_set(tmp_path)
    base = "{grpc_response: {json: JSON, type: TYPE, descriptor_set: '" + str(path) + "'}}"
    field = f"{ROUTE}.fallback.response.grpc_response"
    wrong_type = base.replace("JSON", "{}").replace("TYPE", "grpc.health.v1.Nope")
    assert error_of(wrong_type).startswith(f"{field}.type: no message type grpc.health.v1.Nope")
    typo = base.replace("JSON", "{statu: SERVING}").replace(
        "TYPE", "grpc.health.v1.HealthCheckResponse"
    )
    assert error_of(typo).startswith(f"{field}.json: not a valid grpc.health.v1.HealthCheckResp")
    (tmp_path / "junk.pb").write_bytes(b"\xff\xff\xff")
    junk = base.replace(str(path), str(tmp_path / "junk.pb")).replace("JSON", "{}")
    assert "is not a FileDescriptorSet" in error_of(junk.replace("TYPE", "x.Y"))
