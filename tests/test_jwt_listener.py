"""JWT on a real sidecar in front of a real grpcio app: valid, missing, bad signature, expired,
wrong audience, a key rotated in the JWKS (served over HTTP), a claim forwarded as a header,
and an authorization rule on claims."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from tests.support import GrpcServer, identity, running_sidecar, simple_config
from tests.unit.security.test_jwt_authn import EC_KEY, OTHER_EC_KEY, RSA_KEY, jwk, jwks, sign
from tests.unit.security.test_jwt_filter import jwks_server


class App:
    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []

        def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
            self.metadata.append(dict(context.invocation_metadata()))
            return request

        handler = grpc.unary_unary_rpc_method_handler(
            echo, request_deserializer=identity, response_serializer=identity
        )
        self.server = GrpcServer("test.Echo", {"Echo": handler})


@contextmanager
def guarded(
    jwks_url: str, authorization: dict[str, Any] | None = None
) -> Iterator[tuple[str, App]]:
    app = App()
    listener: dict[str, Any] = {
        "jwt": {
            "providers": {
                "idp": {
                    "issuer": "https://issuer.example",
                    "audiences": ["orders"],
                    "jwks": {"uri": jwks_url, "min_refetch": "0s"},
                    "forward_claims": {"sub": "x-user"},
                }
            }
        }
    }
    if authorization is not None:
        listener["authorization"] = authorization
    try:
        with running_sidecar(simple_config([app.server.address], extra_listener=listener)) as sc:
            yield sc.address, app
    finally:
        app.server.stop()


def call(
    address: str, token: str | None, extra: tuple[tuple[str, str], ...] = ()
) -> grpc.StatusCode:
    metadata = ((("authorization", f"Bearer {token}"),) if token else ()) + extra
    with grpc.insecure_channel(address) as channel:
        echo = channel.unary_unary(
            "/test.Echo/Echo", request_serializer=identity, response_deserializer=identity
        )
        try:
            echo(b"x", metadata=metadata, timeout=10)
        except grpc.RpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK


def test_tokens_are_checked_and_claims_forwarded() -> None:
    with jwks_server() as server:
        server.body = jwks(jwk(EC_KEY, "e1", "ES256"), jwk(RSA_KEY, "r1", "RS256")).encode()
        with guarded(server.url) as (address, app):
            ok = sign(EC_KEY, "e1", "ES256", sub="alice")
            assert call(address, ok, (("x-user", "admin"),)) == grpc.StatusCode.OK
            assert app.metadata[-1]["x-user"] == "alice"  # the client's copy was replaced
            assert call(address, sign(RSA_KEY, "r1", "RS256")) == grpc.StatusCode.OK

            unauthenticated = grpc.StatusCode.UNAUTHENTICATED
            assert call(address, None) == unauthenticated
            assert call(address, sign(OTHER_EC_KEY, "e1", "ES256")) == unauthenticated
            assert (
                call(address, sign(EC_KEY, "e1", "ES256", exp=time.time() - 3600))
                == unauthenticated
            )
            assert call(address, sign(EC_KEY, "e1", "ES256", aud="billing")) == unauthenticated
            assert len(app.metadata) == 2

            # The provider rotates its keys: a token with the new key id triggers a fetch.
            requests_before = server.requests
            server.body = jwks(jwk(OTHER_EC_KEY, "e2", "ES256")).encode()
            assert call(address, sign(OTHER_EC_KEY, "e2", "ES256")) == grpc.StatusCode.OK
            assert server.requests == requests_before + 1
            assert call(address, sign(EC_KEY, "e1", "ES256")) == unauthenticated  # retired


def test_authorization_on_claims() -> None:
    rules = {"allow": [{"when": {"claims": {"scope": ["orders.read"]}}}]}
    with jwks_server() as server:
        server.body = jwks(jwk(EC_KEY, "e1", "ES256")).encode()
        with guarded(server.url, rules) as (address, app):
            allowed = sign(EC_KEY, "e1", "ES256", scope=["orders.read", "x"])
            assert call(address, allowed) == grpc.StatusCode.OK
            denied = sign(EC_KEY, "e1", "ES256", scope=["orders.write"])
            assert call(address, denied) == grpc.StatusCode.PERMISSION_DENIED
            assert len(app.metadata) == 1
