"""JWT at the I/O edge: JWKS served by a real HTTP server on loopback, or read from a file."""

from __future__ import annotations

import asyncio
import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pilotfish.config.security import JwksSource, JwtProvider
from sidecar.security.jwt_authn import JwtError, JwtFailure
from sidecar.security.jwt_filter import JwtAuthenticator
from tests.unit.security.test_jwt_authn import (
    EC_KEY,
    ISSUER,
    OTHER_EC_KEY,
    T0,
    Clock,
    jwk,
    jwks,
    sign,
)


class JwksServer:
    def __init__(self) -> None:
        self.body = b"{}"
        self.requests = 0
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests += 1
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(owner.body)))
                self.end_headers()
                self.wfile.write(owner.body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"


@contextmanager
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer()
    thread = threading.Thread(target=server.httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
        thread.join(5)


def provider(source: JwksSource) -> JwtProvider:
    return JwtProvider("idp", ISSUER, ("orders",), source)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_keys_rotated_at_the_url_are_fetched_on_an_unknown_key_id() -> None:
    async def scenario() -> None:
        clock = Clock()
        with jwks_server() as server:
            server.body = jwks(jwk(EC_KEY, "old", "ES256")).encode()
            source = JwksSource(uri=server.url, refresh=300, min_refetch=30)
            auth = JwtAuthenticator([provider(source)], clock=clock)
            assert (await auth.authenticate(bearer(sign(EC_KEY, "old", "ES256")))) is not None
            assert server.requests == 1

            # The provider rotates; a token signed with the new key triggers one fetch...
            server.body = jwks(jwk(OTHER_EC_KEY, "new", "ES256")).encode()
            clock.now += 31
            verified = await auth.authenticate(bearer(sign(OTHER_EC_KEY, "new", "ES256")))
            assert verified is not None and verified.claims["sub"] == "u-1"
            assert server.requests == 2

            # ...but made-up key ids do not hammer the provider: at most one fetch per 30 s.
            for _ in range(5):
                with pytest.raises(JwtError) as info:
                    await auth.authenticate(bearer(sign(EC_KEY, "made-up", "ES256")))
                assert info.value.failure is JwtFailure.UNKNOWN_KEY
            assert server.requests == 2
            clock.now += 300  # the periodic refresh
            await auth.authenticate(bearer(sign(OTHER_EC_KEY, "new", "ES256")))
            assert server.requests == 3

    asyncio.run(scenario())


def test_a_broken_url_keeps_the_last_good_keys() -> None:
    async def scenario() -> None:
        clock = Clock()
        with jwks_server() as server:
            server.body = jwks(jwk(EC_KEY, "k", "ES256")).encode()
            auth = JwtAuthenticator([provider(JwksSource(uri=server.url, refresh=60))], clock=clock)
            await auth.authenticate(bearer(sign(EC_KEY, "k", "ES256")))
            server.body = b"<html>oops</html>"
            clock.now += 61
            assert await auth.authenticate(bearer(sign(EC_KEY, "k", "ES256", exp=T0 + 900)))
            assert auth.fetchers[0].cache.errors == 1

    asyncio.run(scenario())


def test_file_source_missing_token_and_optional_providers(tmp_path: Path) -> None:
    async def scenario() -> None:
        path = tmp_path / "jwks.json"
        path.write_text(jwks(jwk(EC_KEY, "k", "ES256")))
        required = JwtAuthenticator([provider(JwksSource(file=str(path)))], clock=Clock())
        assert await required.authenticate(bearer(sign(EC_KEY, "k", "ES256")))
        with pytest.raises(JwtError) as info:
            await required.authenticate({})
        assert info.value.failure is JwtFailure.MISSING
        optional = JwtAuthenticator(
            [provider(JwksSource(file=str(path)))], required=False, clock=Clock()
        )
        assert await optional.authenticate({}) is None
        with pytest.raises(JwtError) as info:  # a bad token is refused even when optional
            await optional.authenticate(bearer(sign(OTHER_EC_KEY, "k", "ES256")))
        assert info.value.failure is JwtFailure.BAD_SIGNATURE

    asyncio.run(scenario())
